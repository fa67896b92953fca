"""Compare a simulated `Result` with a measured one: time per step by event kind and op, and the error.

Both results use the shared schema. Events are aligned by `kind` and (normalised) `op`, and
by `rank` when asked; times are seconds **per step** (the measured run's first step, a
warm-up, is left out when there are more; a kind is averaged over the steps that recorded it,
as the native engine records its collectives on sampled steps), so a one-step simulation lines
up with a many-step run. The step row compares the results' `step_seconds` metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from workbench.core.ops import normalise_op
from workbench.errors import WorkbenchError
from workbench.result import Result


def _steps(r: Result) -> list[int]:
    ev = r.events
    if "step" in ev.columns and ev["step"].notna().any():
        steps = sorted(int(s) for s in ev["step"].dropna().unique())
        return steps[1:] if len(steps) > 1 and r.source == "run" else steps
    return []


def stages_of(r: Result, ev: pd.DataFrame | None = None) -> pd.Series:
    """The pipeline stage of each event's rank, from the result's job layout (the one rank order)."""
    ev = r.events if ev is None else ev
    if r.job is None:
        raise WorkbenchError("by: 'stage' needs results that carry their job (result.job)")
    layout = r.job.layout
    return ev["rank"].astype(int).map(layout.stage_of)


def per_step(r: Result, by: Sequence[str] = ("kind", "op")) -> pd.DataFrame:
    """Seconds and count per step for each group of `by` (ranks averaged unless `rank` is in `by`)."""
    ev = r.events
    if ev.empty:
        return pd.DataFrame(columns=[*by, "seconds", "count"])
    steps = _steps(r)
    if steps:
        ev = ev[ev["step"].isin(steps)]
    n_steps = max(len(steps), 1) if steps else max(int(r.metrics.get("steps", 1) or 1), 1)
    ev = ev.assign(op=ev["op"].map(normalise_op), seconds=ev["end"] - ev["start"], count=1.0)
    if steps:  # a kind recorded on some steps only (the native engine samples its collectives) per step it was in
        per_kind = ev["kind"].map(ev.groupby("kind")["step"].nunique()).astype(float)
        ev = ev.assign(seconds=ev["seconds"] / per_kind, count=1.0 / per_kind)
    if "stage" in by:
        ev = ev.assign(stage=stages_of(r, ev))
    keys = list(dict.fromkeys([*by, "rank"]))
    per_rank = ev.groupby(keys, as_index=False).agg(seconds=("seconds", "sum"), count=("count", "sum"))
    if not steps:
        per_rank[["seconds", "count"]] = per_rank[["seconds", "count"]] / n_steps
    if "rank" in by:
        return per_rank
    return per_rank.groupby(list(by), as_index=False)[["seconds", "count"]].mean()


def compare(simulated: Result, measured: Result, by: Sequence[str] = ("kind", "op")) -> pd.DataFrame:
    """Per-step seconds of `simulated` vs `measured` for each kind/op (and rank when `by` has it).

    Columns: the `by` keys, `sim_seconds`, `measured_seconds`, `error_pct` ((sim − measured) /
    measured × 100), `sim_count`, `measured_count`; then one row per kind (`op` = "*") and a
    `step` row from the `step_seconds` metrics.
    """
    bad = [b for b in by if b not in ("kind", "op", "rank", "stage")]
    if bad:
        raise WorkbenchError(f"by: {bad} (align by kind, op, rank and stage)")
    s, m = per_step(simulated, by), per_step(measured, by)
    t = s.merge(m, on=list(by), how="outer", suffixes=("_sim", "_measured")).fillna(0.0)
    t = t.rename(columns={"seconds_sim": "sim_seconds", "seconds_measured": "measured_seconds",
                          "count_sim": "sim_count", "count_measured": "measured_count"})
    rows = [t]
    if "op" in by and "kind" in by and "rank" not in by:
        k = t.groupby("kind", as_index=False)[["sim_seconds", "measured_seconds", "sim_count", "measured_count"]].sum()
        rows.append(k.assign(op="*"))
    ss, ms = simulated.metrics.get("step_seconds"), measured.metrics.get("step_seconds")
    if ss is not None and ms is not None:
        rows.append(pd.DataFrame([{"kind": "step", "op": "step", "sim_seconds": float(ss), "measured_seconds": float(ms),
                                   "sim_count": 1.0, "measured_count": 1.0}]))
    out = pd.concat(rows, ignore_index=True)
    out["error_pct"] = (out["sim_seconds"] - out["measured_seconds"]) / out["measured_seconds"].where(
        out["measured_seconds"] > 0) * 100
    cols = [c for c in (*by, "sim_seconds", "measured_seconds", "error_pct", "sim_count", "measured_count") if c in out]
    return out[cols].reset_index(drop=True)


def step_error_pct(simulated: Result, measured: Result) -> float:
    """(simulated − measured) / measured step time, in percent."""
    ss, ms = float(simulated.metrics["step_seconds"]), float(measured.metrics["step_seconds"])
    return (ss - ms) / ms * 100.0
