"""The verbs a notebook needs, on one page: build a Job, simulate it, run it, compare, calibrate.

Everything here is light to import; each verb imports its engine when first called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workbench.core.job import Job

if TYPE_CHECKING:
    import pandas as pd

    from workbench.core.stream import RunHandle
    from workbench.models.spec import ModelSpec
    from workbench.result import Result
    from workbench.topology.model import Cluster


def load_cluster(spec: Any) -> Cluster:
    """A Cluster from a preset spec (`aws-p5:nodes=2`), a YAML/JSON file or a Cluster."""
    from workbench.topology.presets import load_cluster as _load

    return _load(spec)


def load_model(spec: Any) -> ModelSpec:
    """A ModelSpec from a preset (`llama3-8b`), an inline spec (`gpt:layers=4,hidden=128`), an HF config.json."""
    from workbench.models.presets import load_model as _load

    return _load(spec)


def _job(job: Job | None, kwargs: dict[str, Any]) -> Job:
    if job is None:
        return Job.create(**kwargs)
    if kwargs:
        raise TypeError("give either a Job or the fields of one (cluster=, model=, plan=, workload=), not both")
    if not isinstance(job, Job):
        raise TypeError(f"expected a workbench.Job, got {type(job).__name__} (build one with wb.Job.create)")
    return job


def resolve(job: Job) -> Job:
    """The job with its plan completed (a training plan's missing fields chosen by the plan search)."""
    if job.kind == "training" and not job.plan.complete:
        from workbench.plan.search import resolve_job

        return resolve_job(job)  # type: ignore[no-any-return]
    return job


def simulate(job: Job | None = None, **fields: Any) -> Result:
    """Predict a job: a `Result` (events, memory, links, metrics) with `result.job` the completed job."""
    from workbench.core.engines import simulator

    j = resolve(_job(job, fields))
    return simulator(j.kind)(j)


def start(job: Job | None = None, **options: Any) -> RunHandle:
    """Run a job for real; returns a live handle at once (`updates()`, `subscribe()`, `wait()`, `cancel()`).

    Options are the runner's (e.g. `hosts=`, `timeout=`); the job's own fields say what to run.
    """
    from workbench.core.engines import runner

    if job is None or not isinstance(job, Job):
        raise TypeError("wb.start(job): build the job with wb.Job.create(cluster, model, plan, workload)")
    return runner(job.kind)(job, **options)


def run(job: Job, **options: Any) -> Result:
    """Run a job to the end and return the measured `Result` (raises `RunFailed` naming the rank)."""
    return start(job, **options).wait()


def search(job: Job | None = None, *, top: int | None = None, **fields: Any) -> pd.DataFrame:
    """Every candidate plan of a job, evaluated and ranked (fixed fields of the job's plan kept)."""
    from workbench.core.engines import searcher

    j = _job(job, fields)
    return searcher(j.kind)(j, top=top)  # type: ignore[no-any-return]


def _kind(r: Any) -> str:
    return str(r.job.kind) if getattr(r, "job", None) is not None else "training"


def compare(simulated: Result, measured: Result, by: Any = ("kind", "op")) -> pd.DataFrame:
    """A prediction beside a measurement: per-step seconds by kind/op with the error in percent
    (training), or the `vllm bench serve` metrics side by side with their errors (serving)."""
    if _kind(measured) == "serving" or _kind(simulated) == "serving":
        from workbench.serve.compare import compare_serving

        return compare_serving(simulated, measured)
    from workbench.comparison import compare as _compare

    return _compare(simulated, measured, by=by)


def calibrate(measured: Result | list[Result], cluster: Cluster | None = None) -> Any:
    """Fit the simulator to a measured run at the level of its parts, never its end-to-end numbers.

    Training: the cluster with its compute and link parameters fitted (returns a Cluster).
    Serving: the job with its per-step host cost and rate factor fitted from the engine's steps
    (returns the calibrated Job); a list of runs of the same serving job is fitted as one measurement
    (`workbench.serve.calibrate.pool_runs`: on a machine that drifts, runs spread over time)."""
    if isinstance(measured, (list, tuple)):
        from workbench.errors import WorkbenchError
        from workbench.serve.calibrate import calibrate_job

        runs = list(measured)
        if not runs or any(_kind(r) != "serving" for r in runs):
            raise WorkbenchError("calibrate: a list of runs must hold one or more measured serving Results "
                                 "(pass one Result for a training run)")
        if any(r.job != runs[0].job for r in runs[1:]):
            raise WorkbenchError("calibrate: the runs are of different jobs (cluster, model, plan or traffic differ); "
                                 "pool only repeats of one job")
        return calibrate_job(runs[0].job, runs)[0]
    if _kind(measured) == "serving":
        from workbench.serve.calibrate import calibrate_job

        return calibrate_job(measured.job, measured)[0]
    from workbench.calibration.run import from_run

    base = cluster if cluster is not None else (measured.job.cluster if measured.job is not None else None)
    if base is None:
        raise TypeError("calibrate: the measured Result carries no job; pass cluster=")
    return from_run(base, measured)
