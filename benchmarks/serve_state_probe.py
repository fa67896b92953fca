"""Does a short engine probe before a serving run tell how fast that run's steps will be?

Alternates closed-loop runs at two concurrencies; before each run, two probes (a fixed small sweep of the real
worker's steps, `measure_steps` over batches 1, 4, 8 of 16-token prompts, 16 tokens out, summed periods), and one
after. One JSON line per run: the probes, the run's mean TTFT / TPOT and its engine steps' mean period.

    python benchmarks/serve_state_probe.py                                    # the tiny model on CPU
    python benchmarks/serve_state_probe.py --device cuda:0 --cluster dgx-h100:nodes=1,gpu=H200   # the 1.2 B model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_calibrate import PLAN, server_setup  # noqa: E402  (the calibration's model, plan and worker spec)


def probe(model: str, **spec: Any) -> float:
    from workbench.serve.microbench import measure_steps

    df = measure_steps(model, batches=(1, 4, 8), prompts=(16,), output=16, **spec)
    return float(df["period"].dropna().sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cluster", default="local")
    ap.add_argument("--levels", default="2,6,2,6,2,6")
    args = ap.parse_args()

    import workbench as wb
    from workbench.serve.calibrate import steps
    from workbench.serving import Serving

    model, spec = server_setup(args.device, "1b" if args.device.startswith("cuda") else "tiny")
    for c in (int(x) for x in args.levels.split(",")):
        before = [probe(str(model), **spec) for _ in range(2)]
        job = wb.Job.create(args.cluster, str(model / "config.json"), plan=PLAN,
                            workload=Serving(traffic=f"concurrency={c},isl=48,osl=16,requests=24"))
        r = wb.start(job, checkpoint=str(model), **spec).wait(timeout=900)
        period = steps(r, job)["period"].dropna()
        print(json.dumps({"concurrency": c, "probe_before_s": before, "probe_after_s": probe(str(model), **spec),
                          "mean_ttft_ms": r.metrics["mean_ttft_ms"], "mean_tpot_ms": r.metrics["mean_tpot_ms"],
                          "step_mean_ms": float(period.mean()) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
