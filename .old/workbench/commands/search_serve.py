"""`workbench search serve`: the serving configuration with the best goodput per GPU under SLOs."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit
from workbench.commands.simulate_serve import serve_args


def _args(p: argparse.ArgumentParser) -> None:
    serve_args(p, plan=False)
    p.add_argument("--top", type=int, default=10, help="show the best K configurations (default 10)")
    p.add_argument("--requests", type=int, default=300, help="requests simulated per configuration (default 300)")
    p.add_argument("--csv", help="write every candidate (rejected ones with their reason) to this CSV")


def _run(args: argparse.Namespace) -> int:
    from workbench.sim.serve_search import search_serving

    df = search_serving(args.cluster, args.model, args.traffic, args.slo or None, requests=max(args.requests, 1))
    if args.csv:
        df.to_csv(args.csv, index=False)
    top = df.head(max(args.top, 1))
    a = dict(df.attrs)
    out = {"evaluated": a["evaluated"], "meeting_slo": a["ok"], "seconds": a["seconds"],
           "configs_per_s": a["configs_per_s"], "requests_per_config": a["requests"],
           "top": top.to_dict(orient="records")}
    cols = ["plan", "gpus", "goodput_per_gpu", "request_goodput", "output_throughput", "mean_ttft_ms", "mean_tpot_ms",
            "ok", "reason"]
    text = (f"{a['evaluated']} configurations in {a['seconds']:.2f} s ({a['configs_per_s']:.0f}/s), {a['ok']} meet the "
            f"SLO\n" + top[cols].to_string(index=False))
    emit(out, args.json, text)
    return 0


COMMANDS = [Command("search", "serve", "rank serving configurations by goodput per GPU under TTFT/TPOT SLOs", _args,
                    _run)]
