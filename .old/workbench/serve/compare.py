"""Simulated vs measured serving: the `vllm bench serve` metrics side by side with their errors."""

from __future__ import annotations

from typing import Any

import pandas as pd

KEYS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "mean_e2el_ms", "request_throughput", "output_throughput", "total_token_throughput")


def compare_serving(simulated: Any, measured: Any, keys: tuple[str, ...] = KEYS) -> pd.DataFrame:
    """One row per metric: simulated, measured, error = simulated / measured − 1 (NaN where one lacks it).

    Takes two `Result`s (or their metrics dicts) of the same serving job."""
    s = getattr(simulated, "metrics", simulated)
    m = getattr(measured, "metrics", measured)
    rows = []
    for k in keys:
        a, b = s.get(k), m.get(k)
        err = (float(a) / float(b) - 1.0) if a is not None and b not in (None, 0) else float("nan")
        rows.append({"metric": k, "simulated": a, "measured": b, "error": err})
    return pd.DataFrame(rows).set_index("metric")
