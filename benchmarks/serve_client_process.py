"""The traffic client in the server's process against the client in a process of its own, one server.

    python benchmarks/serve_client_process.py --machine cpu2-vm
    python benchmarks/serve_client_process.py --machine h200 --device cuda:0 --model-shape 1b

One colocated server on the calibration's random Llama (`serve_calibrate.server_setup`); at each concurrency of
`--levels`, closed-loop traffic from a client running in a thread of the server's process (as serving runs did
before `workbench.serve.client`) and from the client process, alternated `--repeats` times. Per run: the vllm
bench serve metrics, the server process's CPU per second of the run (`server_cores`: in-process, the client's
event loop is counted in it) and the client's own (`client_cores`). Baseline and change in the same run; the
table gives each level's medians and the ratio client process / in-process.
Writes benchmarks/results/serve-client-process-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
METRICS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "server_cores", "client_cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machine", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-shape", default="tiny", choices=("tiny", "1b"))
    ap.add_argument("--levels", default="2,6,10,16")
    ap.add_argument("--lengths", default="isl=48,osl=16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    import pandas as pd
    from serve_calibrate import server_setup

    from workbench.serve import bench
    from workbench.serve.service import served

    model, spec = server_setup(args.device, args.model_shape)
    levels = [int(x) for x in args.levels.split(",")]
    rows: list[dict[str, Any]] = []
    t_begin = time.time()
    with served(str(model), **spec) as (svc, drive):
        drive(f"concurrency=4,{args.lengths},requests=16")  # warm-up
        for rep in range(args.repeats):
            for c in levels:
                traffic = f"concurrency={c},{args.lengths},requests={max(24, 6 * c)}"
                for where in ("in-process", "client process"):
                    c0, t0 = time.process_time(), time.thread_time()
                    if where == "in-process":
                        res = asyncio.run(bench.run_async(svc.url, traffic, progress=False, tokenizer=svc.app.tok))
                        client = time.thread_time() - t0 - res.meta["prompts_cpu_s"]
                    else:
                        res = drive(traffic)
                        client = res.meta["client_cpu_s"] - res.meta["prompts_cpu_s"]
                    cpu = time.process_time() - c0 - (res.meta["prompts_cpu_s"] if where == "in-process" else 0.0)
                    m, d = res.metrics, max(float(res.metrics["duration"]), 1e-9)
                    rows.append({"repeat": rep, "concurrency": c, "client": where, "failed": m["failed"],
                                 **{k: float(m[k]) for k in METRICS[:3]}, "server_cores": cpu / d,
                                 "client_cores": client / d})
                    print(json.dumps(rows[-1]), flush=True)
    df = pd.DataFrame(rows)
    med = df.groupby(["concurrency", "client"])[list(METRICS)].median().unstack("client")
    table = []
    for c in levels:
        row: dict[str, Any] = {"concurrency": c}
        for k in METRICS:
            a, b = med.loc[c, (k, "in-process")], med.loc[c, (k, "client process")]
            row |= {f"{k} in-process": a, f"{k} client process": b, f"{k} ratio": b / a if a else float("nan")}
        table.append(row)
    import torch

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    record = {"machine": args.machine, "command": "python benchmarks/serve_client_process.py " + " ".join(sys.argv[1:]),
              "platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu, "model_shape": args.model_shape,
              "lengths": args.lengths, "wall_s": time.time() - t_begin, "rows": rows, "table": table}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-client-process-{args.machine}.json").write_text(json.dumps(record, indent=1, default=float))
    lines = [f"# The traffic client in the server's process against a process of its own, on {args.machine}", "",
             f"`{record['command']}`", "",
             f"{record['platform']}, {record['cpus']} CPUs{', ' + gpu if gpu else ''}; random-weight Llama "
             f"({args.model_shape}), one colocated server; closed loop `{args.lengths}`, 6 requests per unit of "
             f"concurrency (at least 24); each level's medians over {args.repeats} alternated runs of each client.",
             "", "| concurrency | metric | in-process | client process | ratio |", "|---|---|---|---|---|"]
    for r in table:
        for k in METRICS:
            lines.append(f"| {r['concurrency']} | {k} | {r[f'{k} in-process']:.4g} | "
                         f"{r[f'{k} client process']:.4g} | {r[f'{k} ratio']:.2f} |")
    (out / f"serve-client-process-{args.machine}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
