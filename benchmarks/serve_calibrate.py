"""Serving simulator vs the real server on this machine: calibrate on one load level, predict another.

    python benchmarks/serve_calibrate.py --machine cpu2-vm

Measures the server (colocated, CPU) at two closed-loop concurrencies, calibrates the simulator on
the first run's engine steps (`workbench.serve.calibrate`: per-step host cost + a rate factor, no
end-to-end metric fitted), and compares the simulator with both runs before and after.
Writes benchmarks/results/serve-calibration-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLAN = "tp=1,replicas=1,max_seqs=64,max_tokens=256,block=16,prefix_caching=false,cuda_graph=false,chunked_prefill=true"
KEYS = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machine", required=True)
    ap.add_argument("--levels", default="2,6", help="closed-loop concurrencies: calibrate on the first")
    ap.add_argument("--lengths", default="isl=48,osl=16,requests=24")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    import workbench as wb
    from workbench.serve.calibrate import calibrate_job
    from workbench.serve.checkpoints import random_llama
    from workbench.serve.compare import compare_serving
    from workbench.serving import Serving

    model = Path("/tmp/wb-serve-calib")
    if not (model / "model.safetensors").is_file():
        random_llama(model, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, dtype="float32")
    levels = [int(x) for x in args.levels.split(",")]
    jobs, measured = [], []
    for c in levels:
        job = wb.Job.create("local", str(model / "config.json"), plan=PLAN,
                            workload=Serving(traffic=f"concurrency={c},{args.lengths}"))
        r = wb.start(job, checkpoint=str(model), page_size=16, max_batched_tokens=256, max_seqs=64,
                     threads=1).wait(timeout=900)
        jobs.append(job)
        measured.append(r)
    cal_job, fitted = calibrate_job(jobs[0], measured[0])
    rows = []
    for job, r, c in zip(jobs, measured, levels):
        before = compare_serving(wb.simulate(job), r, KEYS)
        after = compare_serving(wb.simulate(cal_job.with_workload(traffic=job.workload.traffic)), r, KEYS)
        for k in KEYS:
            rows.append({"concurrency": c, "role": "calibrated on" if c == levels[0] else "predicted",
                         "metric": k, "measured": after.loc[k, "measured"],
                         "sim_before": before.loc[k, "simulated"], "error_before": before.loc[k, "error"],
                         "sim_after": after.loc[k, "simulated"], "error_after": after.loc[k, "error"]})
        print(json.dumps(rows[-3:], default=float), flush=True)
    meta = {"machine": args.machine, "platform": platform.platform(), "cpus": os.cpu_count(),
            "command": "python benchmarks/serve_calibrate.py " + " ".join(sys.argv[1:]), "plan": PLAN,
            "fitted": fitted, "load_average": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-calibration-{args.machine}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                                          default=float))
    lines = [f"# Serving simulator vs the real server on {args.machine}", "", f"`{meta['command']}`", "",
             f"{meta['platform']}, {meta['cpus']} CPUs, load average at the end {meta['load_average']}; "
             f"random Llama (hidden 256, 4 layers), colocated CPU worker, closed loop `{args.lengths}`; "
             f"simulator plan `{PLAN}` on the `local` cluster.", "",
             f"Fitted on the first level's engine steps: scheduler_us = {fitted['scheduler_us']:.0f}, "
             f"rate factor = {fitted['rate_factor']:.3g} (R² of the step fit {fitted['r2']:.2f}, "
             f"{fitted['steps']:.0f} steps).", "",
             "| concurrency | role | metric | measured | sim before | error before | sim after | error after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['role']} | {r['metric']} | {r['measured']:.4g} | {r['sim_before']:.4g} "
                     f"| {r['error_before']:+.1%} | {r['sim_after']:.4g} | {r['error_after']:+.1%} |")
    (out / f"serve-calibration-{args.machine}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
