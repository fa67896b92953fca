"""Real training with the native engine on this host's GPUs, against the simulator before and after
calibrating it from microbenchmarks measured here (issue 19). One JSON with every number.

    python3 benchmarks/native_train.py --out OUT [--sweeps OUT] [--model SPEC] [--steps 16]

For each plan (one GPU eager and compiled; with two or more GPUs dp=2 FSDP, tp=2 with sequence
parallelism, pp=2 1F1B) it runs the job for real with telemetry alternating per step (`ab`: the
overhead comes from interleaved steps of one run), and reports step time and MFU with telemetry
on, the overhead, updates/s, and the simulator's step time on the catalogue machine (before) and
on the machine calibrated from `gemm.csv` (benchmarks/gemm_sweep.py --model) and
`nccl-<op>.txt` (benchmarks/nccl_sweep.py) found in --sweeps (after). A compiled run that fails
is retried eager, so a plan always reports what torch could do here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

MODEL = "llama3-8b:layers=16,hidden=2048,heads=16,kv_heads=4,head_dim=128,ffn=8192,vocab=32000,seq=2048"


CPU_MODEL = "llama3-8b:layers=4,hidden=256,heads=8,kv_heads=4,head_dim=32,ffn=688,vocab=2048,seq=128"


def plans(gpus: int, cpu: bool = False) -> list[tuple[str, str, bool]]:
    """(name, plan, compile) for this many GPUs (or, with `cpu`, the CPU-rank plans of the issue)."""
    if cpu:
        return [("cpu-dp2", "dp=2,mbs=4,gbs=16", False), ("cpu-tp2", "tp=2,mbs=4,gbs=8", False),
                ("cpu-pp2", "pp=2,mbs=2,gbs=8", False), ("cpu-dp2-tp2", "dp=2,tp=2,mbs=4,gbs=16", False)]
    out = [("1gpu-compiled", "dp=1,mbs=8,gbs=8", True)]
    if gpus >= 2:
        out += [("dp2-fsdp", "dp=2,zero=1,mbs=8,gbs=16", True), ("tp2-sp", "tp=2,sp=1,mbs=8,gbs=8", False),
                ("pp2-1f1b", "pp=2,mbs=2,gbs=16", True), ("tp2-sp-compiled", "tp=2,sp=1,mbs=8,gbs=8", True),
                ("tp2-nosp", "tp=2,sp=0,mbs=8,gbs=8", False), ("pp2-interleaved", "pp=2,vpp=2,mbs=2,gbs=16", True)]
    return out + [("1gpu-eager", "dp=1,mbs=8,gbs=8", False)]


DEFAULT = ("1gpu-compiled", "dp2-fsdp", "tp2-sp", "pp2-1f1b", "1gpu-eager", "cpu-dp2", "cpu-tp2", "cpu-pp2",
           "cpu-dp2-tp2")


def on_off(r: Any) -> tuple[float, float]:
    """Median step seconds with telemetry on (odd steps) and off (even), warm-up steps 0-1 left out."""
    t = r.metrics["step_seconds_all"]
    on = [x for i, x in enumerate(t) if i >= 2 and i % 2 == 1]
    off = [x for i, x in enumerate(t) if i >= 2 and i % 2 == 0]
    return (statistics.median(on) if on else float("nan"), statistics.median(off) if off else float("nan"))


def sized(cluster: Any, world: int) -> Any:
    node = cluster.nodes[0]
    return dataclasses.replace(cluster, nodes=(dataclasses.replace(node, gpus=world),))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweeps", default=None, help="folder with gemm.csv and nccl-<op>.txt (default: --out)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--only", default=None, help="comma-separated plan names to run")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--cpu", action="store_true", help="CPU ranks over gloo (calibrated from the run itself)")
    ap.add_argument("--profile", default="", help="comma-separated plan names to profile one step of (rank 0)")
    ap.add_argument("--report", action="store_true", help="only recompute the simulated columns of OUT/native.json")
    args = ap.parse_args()
    if args.report:
        rep = resimulate(Path(args.out) / "native.json", Path(args.sweeps or args.out))
        (Path(args.out) / "native.json").write_text(json.dumps(rep, indent=1, default=str))
        print(table(rep))
        return 0
    if args.cpu and args.model == MODEL:
        args.model = CPU_MODEL
    import pandas as pd
    import torch

    from workbench.calibration.nccl_tests import read_nccl_tests
    from workbench.calibration.run import from_sweeps
    from workbench.core.job import Job, Training
    from workbench.errors import RunFailed
    from workbench.models.presets import load_model
    from workbench.runner.launcher import runnable_plan, start_job
    from workbench.topology import discover

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweeps = Path(args.sweeps or args.out)
    gpus = 4 if args.cpu else torch.cuda.device_count()
    host = discover(cpu_ranks=4) if args.cpu else discover()
    model = load_model(args.model)
    gemm = pd.read_csv(sweeps / "gemm.csv") if (sweeps / "gemm.csv").exists() else None
    nccl_files = sorted(sweeps.glob("nccl-*.txt"))
    nccl = (pd.concat([read_nccl_tests(f, f.stem.removeprefix("nccl-")) for f in nccl_files], ignore_index=True)
            if nccl_files else None)
    report: dict[str, Any] = {
        "machine": {"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)] if not args.cpu else [],
                    "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "cluster": host.name},
        "model": model.name, "params": None, "command": " ".join(sys.argv), "calibration": {}, "plans": []}
    calibrated: dict[int, Any] = {}
    for world in ([] if args.cpu else sorted({1, min(gpus, 2)})):
        try:
            cal = from_sweeps(sized(host, world), gemm, nccl if world > 1 else None, ranks=world)
            calibrated[world] = cal
            report["calibration"][str(world)] = dict(cal.nodes[0].specs)
        except Exception as exc:  # noqa: BLE001 - report and go on with the catalogue
            report["calibration"][str(world)] = {"error": f"{type(exc).__name__}: {exc}"}
    chosen = plans(gpus, args.cpu)
    if args.only:
        chosen = [p for p in chosen if p[0] in args.only.split(",")]
    else:
        chosen = [p for p in chosen if p[0] in DEFAULT]
    compile_ok = True
    for name, plan, comp in chosen:
        world = 1
        for part in plan.split(","):
            k, v = part.split("=")
            if k in ("dp", "tp", "pp"):
                world *= int(v)
        cluster = sized(host, world)
        row: dict[str, Any] = {"name": name, "plan": plan, "world": world}
        for attempt in ([comp, False] if comp and not name.endswith("-compiled") else [comp]):
            if attempt and not compile_ok:
                continue
            wl = Training(steps=args.steps, backend="gloo" if args.cpu else "nccl", telemetry="ab", lr=3e-4,
                          compile=attempt)
            job = Job.create(cluster, model, plan, wl)
            t0 = time.time()
            try:
                env = {"WORKBENCH_PROFILE": str(out / f"profile-{name}.txt")} if name in args.profile.split(",") else None
                res = start_job(job, timeout=args.timeout, env=env).wait()
            except RunFailed as exc:
                row.setdefault("failures", []).append({"compile": attempt, "error": str(exc)[-3000:]})
                print(f"{name} compile={attempt}: FAILED {exc}", flush=True)
                if attempt and name == "1gpu-compiled":
                    compile_ok = False
                continue
            m = res.metrics
            on, off = on_off(res)
            flops = m["tflops_per_gpu"] * m["step_seconds"]  # TFLOP per GPU per step
            peak = cluster.gpu_spec(cluster.gpus[0]).peak(m["plan"]["precision"])
            report["params"] = m["params"]
            row |= {"compile": attempt, "wall_s": round(time.time() - t0, 1), "losses": m["losses"],
                    "step_seconds_on": on, "step_seconds_off": off, "step_seconds_all": m["step_seconds_all"],
                    "mfu_on": flops / on / peak, "tflops_per_gpu_on": flops / on,
                    "telemetry_overhead_pct": m["telemetry_overhead_pct"], "updates_per_s": m["updates_per_s"],
                    "events": m["events"], "run_plan": m["plan"], "tokens_per_s_on": m["tokens_per_s"] * m["step_seconds"] / on}
            row["job"] = dataclasses.replace(job, plan=runnable_plan(job)).to_dict()
            simulate_row(row, job, calibrated.get(world), res if args.cpu else None)
            print(f"{name} compile={attempt}: step {on:.4f} s (off {off:.4f}), MFU {row['mfu_on']:.3f}, "
                  f"overhead {row['telemetry_overhead_pct']}, sim before {row.get('sim_error_pct_before')}, "
                  f"after {row.get('sim_error_pct_after')}", flush=True)
            break
        report["plans"].append(row)
        (out / "native.json").write_text(json.dumps(report, indent=1, default=str))
    print(table(report))
    return 0


def simulate_row(row: dict[str, Any], job: Any, calibrated: Any, measured: Any = None) -> None:
    """Add the simulator's step time on the catalogue machine (before) and on `calibrated` (after; with a
    measured CPU-rank run, the cluster fitted from that run) to a plan's row, and the errors (%), priced with
    the software stack the run used (`workbench.calibration.native_runs.stack_of`)."""
    from workbench.calibration.native_runs import stack_of
    from workbench.core.engines import simulator
    from workbench.runner.launcher import runnable_plan

    on = row["step_seconds_on"]
    full = dataclasses.replace(job, plan=runnable_plan(job))
    # the software stack the run used (torch-native, or torch-native-eager without torch.compile)
    full = dataclasses.replace(full, plan=dataclasses.replace(full.plan, stack=stack_of(full)))
    row["sim_stack"] = full.plan.stack
    sim = simulator("training")
    try:
        before = sim(full)
        row["sim_step_seconds_before"] = float(before.metrics["step_seconds"])
        row["sim_error_pct_before"] = (row["sim_step_seconds_before"] - on) / on * 100
        row["sim_breakdown_before"] = before.metrics["breakdown_seconds"]
        if measured is not None:  # CPU ranks: fitted from the run's own spans (workbench.calibration.run.from_run)
            from workbench.calibration.run import from_run

            calibrated = from_run(full.cluster, measured)
            row["calibrated_specs"] = dict(calibrated.nodes[0].specs)
        if calibrated is not None:
            after = sim(full.with_cluster(calibrated))
            row["sim_step_seconds_after"] = float(after.metrics["step_seconds"])
            row["sim_error_pct_after"] = (row["sim_step_seconds_after"] - on) / on * 100
            row["sim_breakdown_after"] = after.metrics["breakdown_seconds"]
    except Exception as exc:  # noqa: BLE001 - the measured numbers stand
        row["sim_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()


def resimulate(path: Path, sweeps: Path) -> dict[str, Any]:
    """Recompute calibration and the simulated columns of a saved native.json (no GPU needed)."""
    import pandas as pd

    from workbench.calibration.nccl_tests import read_nccl_tests
    from workbench.calibration.run import from_sweeps
    from workbench.core.job import Job
    from workbench.topology.spec import from_dict

    report = json.loads(path.read_text())
    gemm = pd.read_csv(sweeps / "gemm.csv") if (sweeps / "gemm.csv").exists() else None
    files = sorted(sweeps.glob("nccl-*.txt"))
    nccl = pd.concat([read_nccl_tests(f, f.stem.removeprefix("nccl-")) for f in files], ignore_index=True) if files else None
    report["calibration"] = {}
    for row in report["plans"]:
        if "job" not in row or "step_seconds_on" not in row:
            continue
        job = Job.from_dict(row["job"])
        world = row["world"]
        cal = from_sweeps(job.cluster, gemm, nccl if world > 1 else None, ranks=world)
        report["calibration"][str(world)] = dict(cal.nodes[0].specs)
        for k in [k for k in row if k.startswith("sim_")]:
            del row[k]
        simulate_row(row, job, cal)
    _ = from_dict
    return report


def table(report: dict[str, Any]) -> str:
    """The before/after table as markdown."""
    lines = ["| plan | compile | step s (telemetry on) | MFU | overhead % | updates/s | sim before % | sim after % |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["plans"]:
        if "step_seconds_on" not in r:
            lines.append(f"| {r['name']} | failed | | | | | | |")
            continue

        def f(x: Any, fmt: str) -> str:
            return format(x, fmt) if isinstance(x, (int, float)) else "—"

        lines.append(f"| {r['name']} ({r['plan']}) | {r['compile']} | {f(r['step_seconds_on'], '.4f')} | "
                     f"{f(r['mfu_on'], '.3f')} | {f(r['telemetry_overhead_pct'], '+.1f')} | {f(r['updates_per_s'], '.0f')} | "
                     f"{f(r.get('sim_error_pct_before'), '+.1f')} | {f(r.get('sim_error_pct_after'), '+.1f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
