"""Calibrate the serving simulator from a measured serving run, at the level of engine steps.

The run's `compute` events are the engine's steps (tokens and sequences in the batch, seconds).
The simulator prices the same steps with its worker cost (`WorkerCost.step_seconds`); a least-squares
line `measured = s + k · simulated` gives a per-step host cost `s` (the plan's `scheduler_us`:
Python scheduling, batch building, sampling) and a rate factor `k` (the node's compute and memory
rates divided by `k`). End-to-end metrics (TTFT, TPOT, throughput) are never fitted: they are
what the calibrated simulator then predicts, at other load levels too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError


def steps(measured: Any) -> pd.DataFrame:
    """The engine steps of a measured serving run: tokens, seqs, seconds (worker rank 0)."""
    ev = measured.events
    s = ev[(ev["kind"] == "compute") & ev["op"].isin(["prefill", "decode"]) & (ev["rank"] == 0)]
    if s.empty or "batch_tokens" not in s.columns:
        raise WorkbenchError("measured: the Result has no engine steps (a serving run's Result is needed)")
    return pd.DataFrame({"tokens": s["batch_tokens"].astype(float), "seqs": s["batch_seqs"].astype(float),
                         "seconds": (s["end"] - s["start"]).astype(float)}).reset_index(drop=True)


def fit(job: Any, measured: Any) -> dict[str, float]:
    """{'scheduler_us', 'rate_factor', 'r2'} from the measured steps against the simulator's price of them."""
    from workbench.sim.serve import workers

    st = steps(measured)
    plan = job.plan.with_(replicas=1)
    cost = workers(job.cluster, job.model, plan)[0].cost
    sim = np.asarray(cost.step_seconds(st["tokens"].to_numpy(), 0.0, 0.0, st["seqs"].to_numpy(), False), float)
    sim = sim - plan.scheduler_us * 1e-6
    A = np.stack([np.ones_like(sim), sim], axis=1)
    (s, k), *_ = np.linalg.lstsq(A, st["seconds"].to_numpy(), rcond=None)
    if k <= 0:  # the steps do not grow with their work here: all of it is per-step cost
        s, k = float(st["seconds"].median()), 1.0
    pred = s + k * sim
    y = st["seconds"].to_numpy()
    r2 = 1.0 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    return {"scheduler_us": max(float(s), 0.0) * 1e6, "rate_factor": float(k), "r2": r2, "steps": float(len(st))}


def calibrate_job(job: Any, measured: Any) -> tuple[Any, dict[str, float]]:
    """The job with its cluster's rates and its plan's per-step cost fitted from `measured`."""
    from workbench.calibration.run import _with_specs

    f = fit(job, measured)
    spec = job.cluster.nodes[0].gpu_spec
    k = f["rate_factor"]
    specs = {f"{p}_tflops": v / k for p, v in spec.peak_tflops} | {"memory_GBps": spec.memory_GBps / k}
    cluster = _with_specs(job.cluster, **specs)
    plan = job.plan.with_(scheduler_us=f["scheduler_us"], replicas=1)
    return job.with_cluster(cluster).with_plan(plan), f
