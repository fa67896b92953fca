"""`workbench simulate serve`: serve a traffic with a plan on a cluster, request by request."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit

KEYS = ("completed", "failed", "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
        *(f"{s}_{lat}_ms" for lat in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "std", "p99")),
        "peak_kv_usage", "kv_capacity_tokens", "preemptions", "prefix_cache_hit_rate", "num_gpus", "goodput_per_gpu",
        "output_throughput_per_gpu", "duration_s", "sim_seconds")


def serve_args(p: argparse.ArgumentParser, plan: bool = True) -> None:
    p.add_argument("--cluster", required=True, help="preset with options (aws-p5en:nodes=2), or YAML/JSON")
    p.add_argument("--model", required=True, help="preset (llama3.1-70b), config.json path, or gpt:layers=..")
    if plan:
        p.add_argument("--plan", default="", help="e.g. tp=8,max_seqs=256,precision=fp8 or "
                       "prefill_workers=1,prefill_tp=8,decode_workers=1,decode_tp=8 (unset keys: vLLM's defaults)")
    p.add_argument("--traffic", required=True, help="concurrency=16,isl=1024,osl=1024,requests=320 | "
                   "rate=4,burstiness=1,dataset=conversation,requests=1000,seed=0 | trace=FILE")
    p.add_argument("--slo", default="", help="targets in ms, e.g. ttft=2000,tpot=100 (for request_goodput)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _args(p: argparse.ArgumentParser) -> None:
    serve_args(p)
    p.add_argument("--trace", help="also write a Perfetto/Chrome trace of the steps, transfers and requests here")
    p.add_argument("--requests-csv", help="write one row per request (arrival, queue, TTFT, TPOT, E2E) to this CSV")


def _text(m: dict) -> str:
    lines = [f"completed {m['completed']} (failed {m['failed']}) in {m['duration_s']:.1f} s simulated, "
             f"on {m['num_gpus']} GPUs; simulated in {m['sim_seconds']:.3f} s",
             f"throughput   {m['request_throughput']:.2f} req/s   goodput {m['request_goodput']:.2f} req/s   "
             f"output {m['output_throughput']:,.0f} tok/s   total {m['total_token_throughput']:,.0f} tok/s",
             f"{'':10s} {'mean':>10s} {'median':>10s} {'p99':>10s}  (ms)"]
    for lat in ("ttft", "tpot", "itl", "e2el"):
        lines.append(f"{lat.upper():10s} {m[f'mean_{lat}_ms']:10.1f} {m[f'median_{lat}_ms']:10.1f} {m[f'p99_{lat}_ms']:10.1f}")
    lines.append(f"KV cache     peak {100 * m['peak_kv_usage']:.1f} % of {m['kv_capacity_tokens']:,} tokens per worker, "
                 f"{m['preemptions']} preemptions, prefix-cache hits {100 * m['prefix_cache_hit_rate']:.1f} %")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from workbench.sim.serve import requests, simulate_serving

    res = simulate_serving(args.cluster, args.model, args.plan, args.traffic, args.slo or None)
    m = {k: res.metrics[k] for k in KEYS if k in res.metrics}
    emit(m, args.json, _text(m))
    if args.requests_csv:
        requests(res).to_csv(args.requests_csv, index=False)
    if args.trace:
        res.to_perfetto(args.trace)
    return 0


COMMANDS = [Command("simulate", "serve", "simulate serving a traffic (vllm bench serve metrics, per request, KV, links)",
                    _args, _run)]
