"""`workbench simulate train` and `workbench search train`: one training step, and plan search."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, help="preset with options (dgx-h100:nodes=384), 'local', or YAML/JSON")
    p.add_argument("--model", required=True,
                   help="preset (llama3-405b:seq=131072), config.json path, or gpt:layers=..,hidden=..,heads=..,vocab=..,seq=..")
    p.add_argument("--json", action="store_true", help="print JSON")


def _sim_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--plan", required=True, help="e.g. tp=8,pp=64,dp=6,gbs=3072,recompute=full (left-out fields are chosen)")
    p.add_argument("--trace", help="also write a Perfetto/Chrome trace of the step's events here")


def _fmt_text(m: dict) -> str:
    mem = m["memory_GiB_per_gpu"]
    plan = ",".join(f"{k}={v}" for k, v in m["plan"].items())
    lines = [
        f"plan            {plan}",
        f"step            {m['step_seconds']:.4f} s   {m['tokens_per_s']:,.0f} tokens/s",
        f"per GPU         {m['tflops_per_gpu']:.1f} TFLOP/s (with recompute)   MFU {100 * m['mfu']:.1f} %",
        f"memory per GPU  {mem['total']:.2f} GiB of {m['memory_capacity_GiB']:.1f} GiB  -> "
        + ("fits" if m["fits"] else "DOES NOT FIT"),
        "  " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total"),
        "time (critical stage), seconds:",
    ]
    lines += [f"  {k:16s} {v:10.4f}" for k, v in m["breakdown_seconds"].items() if v > 0]
    lines += [f"uncertain       {u}" for u in m.get("uncertain", [])]
    return "\n".join(lines)


def _uncertain(args: argparse.Namespace, plan: dict) -> list[str]:
    """What the model is unsure of for this plan (borrowed or extrapolated curves, assumed balance, ...)."""
    from workbench.models.presets import load_model
    from workbench.plan.search import plan_uncertainty
    from workbench.plan.spec import parse_plan
    from workbench.sim.train import TrainContext
    from workbench.topology.presets import load_cluster

    return plan_uncertainty(TrainContext(load_cluster(args.cluster), load_model(args.model)), parse_plan(plan))


def _simulate(args: argparse.Namespace) -> int:
    from workbench.plan.search import estimate_train, simulate_train

    res = None
    if args.trace:  # the events are only built when they are written
        res = simulate_train(args.cluster, args.model, args.plan)
        m = res.metrics
    else:
        m = estimate_train(args.cluster, args.model, args.plan).to_metrics()
    m["uncertain"] = _uncertain(args, m["plan"])
    emit(m, args.json, _fmt_text(m))
    if res is not None:  # results first, then the trace
        res.to_perfetto(args.trace)
    if not m["fits"]:
        import sys

        print(f"error: plan does not fit in memory ({m['memory_GiB_per_gpu']['total']:.1f} GiB per GPU > "
              f"{m['memory_capacity_GiB']:.1f} GiB); try more pp/tp, zero=3, recompute=full or a smaller mbs",
              file=sys.stderr)
        return 1
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--gbs", type=int, required=True, help="global batch in sequences")
    p.add_argument("--top", type=int, default=10, help="show the best K plans (default 10)")
    p.add_argument("--fix", default="", help="fields not to vary, e.g. tp=8,recompute=full")
    p.add_argument("--csv", help="write every candidate (rejected ones with their reason) to this CSV")


def _search(args: argparse.Namespace) -> int:
    from workbench.plan.search import search_plans
    from workbench.plan.spec import parse_plan

    fixed = {k: v for k, v in parse_plan(args.fix).to_dict().items() if v is not None} if args.fix else None
    df = search_plans(args.cluster, args.gbs, args.model, fixed=fixed)
    if args.csv:
        df.to_csv(args.csv, index=False)
    top = df.head(args.top)
    attrs = dict(df.attrs)
    out = {"evaluated": attrs["evaluated"], "fitting": attrs["fitting"], "rejected": attrs["rejected"],
           "seconds": attrs["seconds"], "plans_per_s": attrs["plans_per_s"],
           "top": top.to_dict(orient="records")}
    cols = ["rank", "tp", "pp", "dp", "cp", "ep", "vpp", "mbs", "zero", "recompute", "offload", "step_seconds",
            "tokens_per_s", "mfu", "memory_GiB"]
    text = (f"{attrs['evaluated']} plans evaluated in {attrs['seconds']:.2f} s ({attrs['plans_per_s']:.0f}/s), "
            f"{attrs['fitting']} valid and fitting\n" + top[[c for c in cols if c in top]].to_string(index=False))
    emit(out, args.json, text)
    return 0


def _published_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--only", action="append", default=None, help="a row of the table (repeatable)")
    p.add_argument("--ablate", action="append", default=[], metavar="STACK=CHANGES",
                   help="change a software stack's fields for its rows, e.g. megatron-2021=attention=flash:dp_overlap=1")


def _published(args: argparse.Namespace) -> int:
    from workbench.errors import WorkbenchError
    from workbench.plan.validation import compare_published

    changes = {}
    for a in args.ablate:
        stack, eq, rest = a.partition("=")
        if not eq or not rest:
            raise WorkbenchError(f"--ablate: expected STACK=field=value[:field=value], got {a[:60]!r}")
        changes[stack] = rest
    df = compare_published(args.only, stack_changes=changes or None)
    err = df["error"]
    mape = float(err.abs().mean())
    summary = {"rows": len(df), "mape": mape, "max_abs_error_dense": float(
        err[df["kind"] == "dense"].abs().max()) if (df["kind"] == "dense").any() else None,
        "optimistic": int((err > 0).sum()), "pessimistic": int((err < 0).sum())}
    cols = ["name", "gpus", "stack", "metric", "published", "predicted", "error"]
    text = (df[cols].assign(error=(100 * err).round(1)).to_string(index=False)
            + f"\nMAPE {100 * mape:.1f} %, {summary['optimistic']} optimistic / "
              f"{summary['pessimistic']} pessimistic")
    emit({"summary": summary, "rows": df.to_dict(orient="records")}, args.json, text)
    return 0


COMMANDS = [
    Command("simulate", "train", "simulate one sharded training step (time, MFU, memory per GPU)", _sim_args, _simulate),
    Command("simulate", "published", "the training simulator beside published end-to-end results (validation, never fitted)",
            _published_args, _published),
    Command("search", "train", "rank every valid training plan for a cluster, model and global batch", _search_args,
            _search),
]
