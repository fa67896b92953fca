"""The one loop: predict → run → compare → calibrate → predict again, as a library function.

`workbench demo`, `workbench run train` and the quickstart notebook all call `loop(job)`; the
overhead baseline (telemetry off, or alternating) is part of it, so every door measures the same
way.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.core.job import Job

if TYPE_CHECKING:
    import pandas as pd

    from workbench.core.stream import Update
    from workbench.result import Result


@dataclass
class LoopResult:
    """Everything one turn of the loop produced. `summary()` is the flat dict the CLI prints as JSON."""

    job: Job
    measured: Result
    predicted: Result | None = None
    comparison: pd.DataFrame | None = None
    calibrated: Any = None  # the calibrated Cluster
    recalibrated: Result | None = None  # the prediction on the calibrated cluster
    baseline: Result | None = None  # the telemetry-overhead baseline run
    overhead: str = "none"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        if self.job.kind == "serving":
            return self._serving_summary()
        from workbench.comparison import per_step, step_error_pct

        m = self.measured.metrics
        out: dict[str, Any] = {k: m.get(k) for k in (
            "losses", "step_seconds", "events", "updates", "updates_per_s", "telemetry_cost_pct", "ranks", "backend",
            "p2p", "plan", "model", "params", "tokens_per_s", "tflops_per_gpu", "mfu", "devices", "cluster",
            "step_seconds_all")}
        out |= {"telemetry_overhead_pct": None, "step_seconds_off": None, "sim_step_seconds": None,
                "sim_error_pct_before": None, "sim_error_pct_after": None}
        if self.baseline is not None:
            bm = self.baseline.metrics
            out["overhead_method"] = self.overhead
            if self.overhead == "ab":  # alternate steps of one run: odd steps on, even steps off
                times = bm["step_seconds_all"]
                out["step_seconds_off"] = statistics.median(times[2::2]) if len(times) > 2 else None
                out["step_seconds_on"] = statistics.median(times[3::2]) if len(times) > 3 else None
                out["telemetry_overhead_pct"] = bm["telemetry_overhead_pct"]
            else:
                off = bm["step_seconds"]
                out["step_seconds_off"] = off
                out["telemetry_overhead_pct"] = (m["step_seconds"] - off) / off * 100
            out["step_seconds_all_overhead_run"] = bm["step_seconds_all"]
            out["losses_match_without_telemetry"] = (bm["losses"][: len(m["losses"])]
                                                     == m["losses"][: len(bm["losses"])])
        if self.predicted is not None:
            out["sim_step_seconds"] = float(self.predicted.metrics["step_seconds"])
            out["sim_error_pct_before"] = step_error_pct(self.predicted, self.measured)
        if self.recalibrated is not None:
            out["sim_step_seconds_after"] = float(self.recalibrated.metrics["step_seconds"])
            out["sim_error_pct_after"] = step_error_pct(self.recalibrated, self.measured)
            out["calibrated_specs"] = dict(self.calibrated.nodes[0].specs)
        if self.notes:
            out["sim_note"] = "; ".join(self.notes)
        r = self.measured
        out["memory_peak_bytes_per_rank"] = (r.memory.groupby(["rank", "category"])["bytes"].max()
                                             .groupby("rank").sum().astype(int).tolist() if not r.memory.empty else [])
        t = per_step(r, ("kind",))
        kind = dict(zip(t["kind"], t["seconds"]))
        out["compute_seconds_per_step"] = float(kind.get("compute", 0.0))
        out["comm_seconds_per_step"] = float(kind.get("collective", 0.0) + kind.get("transfer", 0.0))
        return out


    def _serving_summary(self) -> dict[str, Any]:
        m = self.measured.metrics
        out: dict[str, Any] = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None}
        for label, sim in (("before", self.predicted), ("after", self.recalibrated)):
            if sim is None:
                continue
            for k in ("mean_ttft_ms", "mean_tpot_ms", "output_throughput"):
                a, b = sim.metrics.get(k), m.get(k)
                out[f"sim_{k}_{label}"] = a
                out[f"sim_error_pct_{k}_{label}"] = (a / b - 1) * 100 if a is not None and b else None
        if isinstance(self.calibrated, dict):
            out["calibrated"] = self.calibrated
        if self.notes:
            out["sim_note"] = "; ".join(self.notes)
        return out


def _serving_loop(job: Job, *, simulate: bool, calibrate: bool, on_update: Callable[[Update], None] | None,
                  **run_options: Any) -> LoopResult:
    """The loop for a serving job: serve its traffic for real, predict it, compare the `vllm bench serve`
    metrics, calibrate the simulator on the engine's steps and predict again."""
    from workbench import api

    handle = api.start(job, **run_options)
    for u in handle.updates():
        if on_update is not None:
            on_update(u)
    measured = handle.wait()
    out = LoopResult(job=job, measured=measured)
    if not simulate:
        return out
    try:
        from workbench.serve.calibrate import calibrate_job
        from workbench.serve.compare import compare_serving

        out.predicted = api.simulate(job)
        out.comparison = compare_serving(out.predicted, measured)
        if calibrate:
            cal_job, fitted = calibrate_job(job, measured)
            out.calibrated = fitted
            out.recalibrated = api.simulate(cal_job)
    except Exception as exc:  # noqa: BLE001 - the measured numbers stand even if the simulator cannot model it
        out.notes.append(f"simulation failed: {type(exc).__name__}: {exc}")
    return out


def loop(job: Job, *, simulate: bool = True, calibrate: bool = True, overhead: str = "none",
         on_update: Callable[[Update], None] | None = None, **run_options: Any) -> LoopResult:
    """Predict `job`, run it for real, compare, calibrate on the run and predict again (training or serving).

    `overhead`: "none", "off"/"separate" (a second run with telemetry off) or "ab" (one run alternating
    telemetry per step, ≥ 30 steps) measures what watching costs. `on_update` sees every live
    update of the main run. A prediction the simulator cannot make is recorded as a note; the
    measured numbers stand.
    """
    from workbench import api
    from workbench.comparison import compare

    if job.kind == "serving":
        return _serving_loop(job, simulate=simulate, calibrate=calibrate, on_update=on_update, **run_options)
    overhead = "off" if overhead == "separate" else overhead
    if overhead not in ("none", "off", "ab"):
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"overhead: {overhead!r} is not none, off or ab")
    baseline = None
    if overhead != "none":
        mode: bool | str = "ab" if overhead == "ab" else False
        steps = max(job.workload.steps, 30) if mode == "ab" else job.workload.steps
        baseline = api.run(job.with_workload(telemetry=mode, steps=steps), **run_options)
    handle = api.start(job.with_workload(telemetry=True), **run_options)
    for u in handle.updates():
        if on_update is not None:
            on_update(u)
    measured = handle.wait()
    out = LoopResult(job=measured.job or job, measured=measured, baseline=baseline, overhead=overhead)
    if not simulate:
        return out
    try:
        out.predicted = api.simulate(out.job)
        out.comparison = compare(out.predicted, measured)
        if calibrate:
            out.calibrated = api.calibrate(measured)
            out.recalibrated = api.simulate(out.job.with_cluster(out.calibrated))
    except Exception as exc:  # noqa: BLE001 - the run's numbers stand even if the simulator cannot model it
        out.notes.append(f"simulation failed: {type(exc).__name__}: {exc}")
    return out
