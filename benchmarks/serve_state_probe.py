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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PLAN = "tp=1,replicas=1,max_seqs=64,max_tokens=256,block=16,prefix_caching=false,cuda_graph=false,chunked_prefill=true"
SPEC = {"page_size": 16, "max_batched_tokens": 256, "max_seqs": 64, "threads": 1}


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
    from workbench.serve.checkpoints import random_llama
    from workbench.serving import Serving

    gpu = args.device.startswith("cuda")
    shape = (dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192) if gpu
             else dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768))
    dtype = "bfloat16" if gpu else "float32"
    model = Path(f"/tmp/wb-state-probe-{dtype}")
    if not (model / "model.safetensors").is_file():
        random_llama(model, **shape, dtype=dtype, device="cuda" if gpu else "cpu")
    spec = SPEC | ({"device": args.device, "dtype": dtype} if gpu else {})
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
