"""`workbench bench serve`: drive an OpenAI-compatible server with traffic; vllm bench serve metrics."""

from __future__ import annotations

import argparse
from typing import Any

from workbench.commands import Command, emit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000 (ours, vLLM, SGLang)")
    p.add_argument("--traffic", required=True,
                   help="concurrency=16,isl=1024,osl=1024,requests=320 | rate=4,burstiness=1,dataset=conversation,"
                        "requests=1000,seed=0 | trace=FILE")
    p.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft=200,tpot=50")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None, help="a checkpoint directory whose tokenizer cuts prompts to exact lengths")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (plain OpenAI servers)")
    p.add_argument("--save-requests", metavar="FILE", default=None, help="write the per-request rows (CSV)")
    p.add_argument("--out", default=None, help="also write the benchmark record (workbench.bench.record: machine, "
                   "command, summary = the metrics, rows = the requests) here")
    p.add_argument("--machine", default=None, help="the machine's name in the --out record (default: the host name)")
    p.add_argument("--no-initial-test", action="store_true",
                   help="do not send the first request once on its own before the clock starts (vllm bench serve's "
                        "initial single prompt test run)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from workbench.serve import bench

    if args.out:
        from workbench.io import check_output

        check_output(args.out, "--out")  # before the traffic runs
    tok = None
    if args.tokenizer:
        from workbench.serve.tokenizer import TextTokenizer

        tok = TextTokenizer(args.tokenizer)
    res = bench.run(args.url, args.traffic, slo=args.slo, model=args.model, endpoint=args.endpoint,
                    api_key=args.api_key, ignore_eos=not args.no_ignore_eos, progress=not args.no_progress,
                    tokenizer=tok, initial_test=not args.no_initial_test)
    if args.save_requests:
        df = res.requests.copy()
        df["itl"] = df["itl"].map(json.dumps)
        df.to_csv(args.save_requests, index=False)
    if args.out:
        from workbench.bench.record import write

        write(record(res, args), args.out)
    emit({"meta": res.meta, "metrics": res.metrics}, args.json, res.table())
    return 0 if res.metrics["completed"] else 1


def record(res: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The run as the one benchmark record (`workbench.bench.record`) with `workbench.bench.machine`'s machine
    block: summary = the `vllm bench serve` metrics and the run's settings (url, model, traffic, endpoint, SLOs;
    failures by reason as `failures_<reason>`), flattened; rows = the per-request rows (seconds)."""
    from workbench.bench.machine import machine
    from workbench.bench.record import flat
    from workbench.bench.record import record as make

    command = f"workbench bench serve --url {args.url} --traffic {args.traffic}"
    command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("slo", args.slo), ("model", args.model),
                                                                    ("endpoint", args.endpoint),
                                                                    ("tokenizer", args.tokenizer)) if v)
    if args.no_ignore_eos:
        command += " --no-ignore-eos"
    summary = flat({**res.metrics, **{k: v for k, v in res.meta.items() if k not in res.metrics}})
    return make("serve", res.requests.to_dict("records"), summary, command, machine=machine(args.machine))


COMMANDS = [Command("bench", "serve", "traffic benchmark of an OpenAI-compatible server (vllm bench serve metrics)",
                    add_arguments, run)]
