"""Predicted vs published serving throughput (`datasets/validation/serving_published.csv`): validation only.

Each row is simulated as published — one worker of `tp` GPUs on a DGX-style node of the row's GPU,
`requests` requests of fixed lengths all queued at t=0 (TensorRT-LLM's maximum-throughput setting) —
and the predicted output tokens/s is set beside the measured one. Nothing here feeds back into the model.
"""

from __future__ import annotations

import pandas as pd

CLUSTER = {"H100-SXM": "dgx-h100:nodes=1", "H200": "dgx-h100:nodes=1,gpu=H200"}


def validation_table(requests: int = 1000) -> pd.DataFrame:
    """One row per published measurement: measured and predicted output tok/s and the error."""
    from workbench.data import read_csv
    from workbench.sim.serve import simulate_serving

    rows = []
    for r in read_csv("validation/serving_published.csv").itertuples():
        n = max(requests, 4 * 64) if int(r.isl) < 2000 else requests
        traffic = f"rate=inf,isl={int(r.isl)},osl={int(r.osl)},requests={n}"
        plan = f"{r.sim_plan},replicas=1"
        res = simulate_serving(CLUSTER[str(r.gpu)], str(r.model), plan, traffic)
        m = res.metrics
        pred = float(m["output_throughput"])
        rows.append({"model": r.model, "gpu": r.gpu, "tp": int(r.tp), "isl": int(r.isl), "osl": int(r.osl),
                     "measured_tok_s": float(r.measured_output_tok_s), "predicted_tok_s": pred,
                     "error": pred / float(r.measured_output_tok_s) - 1.0, "mean_tpot_ms": m["mean_tpot_ms"],
                     "peak_kv_usage": m["peak_kv_usage"], "preemptions": m["preemptions"], "source": r.source})
    return pd.DataFrame(rows)
