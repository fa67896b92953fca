"""`workbench plan place`: place a model's layers on a mixed cluster (or evaluate a placement file)."""

from __future__ import annotations

import argparse
from typing import Any

from workbench.commands import Command, emit


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, help="preset (mixed:nodes=4), or a YAML/JSON cluster file")
    p.add_argument("--model", required=True, help="preset (llama3-70b, kimi-k2), or a config.json path")
    p.add_argument("--objective", default="throughput", choices=("throughput", "latency", "cost"))
    p.add_argument("--traffic", default="", help="concurrency=64,isl=1024,osl=256 (closed loop) or rate=4,isl=..,osl=..")
    p.add_argument("--slo", default="", help="mean limits in ms, e.g. ttft=2000,tpot=100")
    p.add_argument("--precisions", default="bf16",
                   help="allowed weight formats in order of preference, e.g. bf16,int8 (first that fits a stage)")
    p.add_argument("--kv-precision", default="", help="KV cache format (default bf16; fp16 where bf16 is missing)")
    p.add_argument("--no-offload", action="store_true", help="never keep weights in host memory or on NVMe")
    p.add_argument("--host-gb", type=float, default=0.0, help="host memory per node in GB (default datasets/placement.csv)")
    p.add_argument("--nvme-gb", type=float, default=0.0, help="NVMe per node in GB (default datasets/placement.csv)")
    p.add_argument("--prices", default="", help="USD per GPU-hour for --objective cost, e.g. RTX-3090=0.2,A100-80GB=1.3 "
                                                "(default: the GPU's TDP at the electricity price)")
    p.add_argument("--max-replicas", type=int, default=0, help="at most this many replicas (default: one per TP group)")
    p.add_argument("--placement", help="evaluate this placement file instead of planning one")
    p.add_argument("--simulate", action="store_true",
                   help="also run the placement (and the baselines) through the serving simulator")
    p.add_argument("--out", help="write the placement (YAML, or JSON by extension) here")
    p.add_argument("--json", action="store_true", help="print JSON")


def _options(args: argparse.Namespace) -> Any:
    from workbench.errors import WorkbenchError
    from workbench.options import parse_options
    from workbench.plan.place import Options

    prices: list[tuple[str, float]] = []
    if args.prices:
        for k, v in parse_options(args.prices, "prices", "RTX-3090=0.2,A100-80GB=1.3").items():
            try:
                prices.append((k, float(v)))
            except ValueError:
                raise WorkbenchError(f"prices.{k}: cannot read {v!r} as USD per hour") from None
    if args.max_replicas < 0:
        raise WorkbenchError(f"max-replicas: must be >= 0, got {args.max_replicas}")
    return Options(precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()),
                   kv_precision=args.kv_precision, offload=not args.no_offload, host_GB=args.host_gb,
                   nvme_GB=args.nvme_gb, prices=tuple(prices), max_replicas=args.max_replicas)


def _fmt(d: dict[str, Any]) -> str:
    p = d["predicted"]
    lines = [f"objective {d.get('objective', 'evaluate')}   traffic "
             + ",".join(f"{k}={v}" for k, v in d["traffic"].items()), "stages:"]
    for s in d["stages"]:
        off = f"  offload {s['offload_weights']:.0%} of weights" if s["offload_weights"] else ""
        lines.append(f"  {s['stage']:>3} r{s['replica']} layers {s['layers'][0]:>3}-{s['layers'][1]:<3} {s['gpu']:<10} "
                     f"tp={s['tp']} {s['precision']}/{s['kv_precision']}  {','.join(s['devices'])}{off}")
    lines.append("memory per device (GiB used / capacity):")
    row = []
    for dv in d["devices"]:
        row.append(f"{dv['device']} {dv['memory_GiB']:.1f}/{dv['capacity_GiB']:.1f}")
        if len(row) == 4:
            lines.append("  " + "   ".join(row))
            row = []
    if row:
        lines.append("  " + "   ".join(row))

    def fig(q: dict[str, Any]) -> str:
        if q.get("error"):
            return "does not fit: " + q["error"]
        return (f"{q['output_throughput'] or 0:10.1f} tok/s   TTFT {q['mean_ttft_ms'] or float('inf'):9.1f} ms   "
                f"TPOT {q['mean_tpot_ms'] or float('inf'):8.2f} ms   {q['gpus_used']} GPUs"
                + ("" if q.get("fits") else "   DOES NOT FIT"))

    lines.append("predicted (" + p["fidelity"] + "):")
    lines.append(f"  planner              {fig(p)}")
    for name, b in d.get("baselines", {}).items():
        lines.append(f"  {name:<20} {fig(b)}")
    if "simulated" in d:
        lines.append("serving simulator (workbench.sim.serve_placement):")
        for name, x in d["simulated"].items():
            if x.get("error") or x.get("output_throughput") is None:
                lines.append(f"  {name:<20} not simulated: {x.get('error', '')}")
            else:
                lines.append(f"  {name:<20} {x['output_throughput']:10.1f} tok/s   TTFT {x['mean_ttft_ms']:9.1f} ms   "
                             f"TPOT {x['mean_tpot_ms']:8.2f} ms")
    if "search" in d:
        s = d["search"]
        lines.append(f"search: {s['candidates']} candidates, {s['dp_solves']} DP solves, gap to the fluid bound "
                     f"{s['gap']:.1%}, {d['planner_seconds']:.3f} s")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from workbench.plan.place import evaluate, parse_traffic, place
    from workbench.plan.placement import Placement

    opts = _options(args)
    if args.placement:
        pl = Placement.load(args.placement)
        ev = evaluate(args.cluster, args.model, pl, args.traffic, opts, args.slo)
        out = {"objective": "evaluate", "traffic": parse_traffic(args.traffic).to_dict(), **ev}
        if args.simulate:
            from workbench.plan.place import crosscheck

            out["simulated"] = {"planner": crosscheck(args.cluster, args.model, pl, args.traffic)}
    else:
        res = place(args.cluster, args.model, args.objective, args.traffic, args.slo, opts, simulate=args.simulate)
        out = res.to_dict()
        pl = res.placement
    if args.out:
        pl.save(args.out)
    emit(out, args.json, _fmt(out))
    return 0 if out["predicted"]["fits"] else 1


COMMANDS = [Command("plan", "place", "place a model's layers on a mixed-GPU cluster (stages, TP, precision, offload)",
                    _args, _run)]
