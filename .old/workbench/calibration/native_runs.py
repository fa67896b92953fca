"""Re-predict measured training runs from the microbenchmarks recorded beside them (validation).

A results folder written by `benchmarks/native_train.py` holds `native.json` (each plan's job and its
measured step time), `gemm.csv` (`benchmarks/gemm_sweep.py`) and `nccl-<op>.txt`
(`benchmarks/nccl_sweep.py`). For every measured plan this simulates the recorded job on the catalogue
machine (before calibration) and on the machine calibrated from the sweeps only (after), and reports
both beside the measured step time. The measured step times are never fitted to: they are what the
predictions are checked against.

    python -m workbench.calibration.native_runs benchmarks/results/h200x2-native [--stack modern] [--changes :host=none]

The software stack is the one that ran: `torch-native` for the native engine (PyTorch's FSDP2, DTensor,
pipelining, blocks compiled), `torch-native-eager` for its runs without torch.compile; `--stack NAME` prices the same jobs with another stack (e.g. `modern`, the default before
the native stack existed) to show what the stack's terms do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

NATIVE_STACK = "torch-native"


def _sweeps(folder: Path) -> tuple[Any, Any]:
    import pandas as pd

    from workbench.calibration.nccl_tests import read_nccl_tests

    gemm = pd.read_csv(folder / "gemm.csv") if (folder / "gemm.csv").exists() else None
    files = sorted(folder.glob("nccl-*.txt"))
    nccl = (pd.concat([read_nccl_tests(f, f.stem.removeprefix("nccl-")) for f in files], ignore_index=True)
            if files else None)
    return gemm, nccl


def stack_of(job: Any) -> str:
    """The software stack a recorded job ran with: for the native engine `torch-native` (each block under
    torch.compile) or `torch-native-eager` (without the compiler), else the plan's."""
    wl = job.workload
    if getattr(wl, "engine", None) == "native":
        return NATIVE_STACK if getattr(wl, "compile", False) else NATIVE_STACK + "-eager"
    return str(job.plan.stack or "modern")


def validate_runs(folder: str | Path, stack: str | None = None, changes: str = "") -> Any:
    """A DataFrame, one row per measured plan: name, run, compile, plan, stack, measured, before and after
    (seconds per step), their errors (% of measured; negative = the simulator is too fast) and the
    after-calibration breakdown (ms). `changes` (e.g. ":host=none") is appended to each plan's stack: one
    term switched off on the stack each run used."""
    import pandas as pd

    from workbench.calibration.run import from_sweeps
    from workbench.core.engines import simulator
    from workbench.core.job import Job
    from workbench.sim.train_stack import load_stack

    folder = Path(folder)
    path = folder / "native.json"
    if not path.is_file():
        raise WorkbenchError(f"folder: {str(folder)[:200]!r} has no native.json (give a folder written by "
                             "benchmarks/native_train.py, e.g. benchmarks/results/h200x2-native)")
    if stack is not None or changes:
        load_stack((stack or NATIVE_STACK) + changes)  # an unknown stack or field fails here, naming the known ones
    report = json.loads(path.read_text())
    gemm, nccl = _sweeps(folder)
    if gemm is None and nccl is None:
        raise WorkbenchError(f"folder: {str(folder)[:200]!r} has neither gemm.csv nor nccl-<op>.txt to calibrate from")
    sim = simulator("training")
    cal_cache: dict[tuple[str, int], Any] = {}
    rows = []
    for r in report.get("plans", []):
        if "job" not in r or "step_seconds_on" not in r:
            continue
        job = Job.from_dict(r["job"])
        st = (stack or stack_of(job)) + changes
        job = dataclasses.replace(job, plan=dataclasses.replace(job.plan, stack=st))
        world = int(r["world"])
        key = (job.cluster.name, world)
        if key not in cal_cache:
            cal_cache[key] = from_sweeps(job.cluster, gemm, nccl if world > 1 else None, ranks=world)
        before = sim(job)
        after = sim(job.with_cluster(cal_cache[key]))
        meas = float(r["step_seconds_on"])
        b, a = float(before.metrics["step_seconds"]), float(after.metrics["step_seconds"])
        rows.append({
            "name": r["name"], "run": int(r.get("run", 1)), "compile": bool(r.get("compile")), "plan": r["plan"],
            "stack": st, "measured_s": meas, "before_s": b, "after_s": a,
            "error_before_pct": (b - meas) / meas * 100, "error_after_pct": (a - meas) / meas * 100,
            "breakdown_after_ms": {k: round(v * 1e3, 2) for k, v in after.metrics["breakdown_seconds"].items() if v},
        })
    return pd.DataFrame(rows)


def markdown(df: Any) -> str:
    """The table as markdown (the breakdown left out)."""
    lines = ["| plan | run | compile | stack | measured s | sim before s | error before | sim after s | error after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        lines.append(f"| {r.name} ({r.plan}) | {r.run} | {'yes' if r.compile else 'no'} | {r.stack} | "
                     f"{r.measured_s:.4f} | {r.before_s:.4f} | {r.error_before_pct:+.1f} % | {r.after_s:.4f} | "
                     f"{r.error_after_pct:+.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("folder", help="a folder written by benchmarks/native_train.py")
    ap.add_argument("--stack", default=None, help="price every plan with this software stack (default: the one that ran)")
    ap.add_argument("--changes", default="", help="appended to each plan's stack, e.g. ':host=none' (one term off)")
    ap.add_argument("--breakdown", action="store_true", help="also print each plan's after-calibration breakdown (ms)")
    args = ap.parse_args(argv)
    try:
        df = validate_runs(args.folder, args.stack, args.changes)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(df))
    if args.breakdown:
        for r in df.itertuples(index=False):
            print(f"{r.name} (run {r.run}): {r.breakdown_after_ms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
