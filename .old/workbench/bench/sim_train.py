"""Benchmarks of the training simulator, registered into `workbench.bench.sim` (`workbench bench sim`)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from workbench.bench.record import Measured
from workbench.bench.sim import register

ONE_T_CLUSTER = "dgx-h100:nodes=384"
ONE_T_PLAN = "tp=8,pp=64,dp=6,ep=1,cp=1,sp=1,vpp=1,zero=1,recompute=full,mbs=1,gbs=3072,precision=bf16,offload=0"
PLAN_KEYS = ("tp", "pp", "dp", "cp", "vpp", "mbs", "zero", "recompute", "offload", "step_seconds", "mfu")


@register("train")
def bench_train() -> Measured:
    """`train_eval_ms`: median time to evaluate one plan of Megatron's 1T GPT on 3072 H100s (tp=8, pp=64, dp=6,
    512 micro-batches), each call with a fresh `TrainContext` (no per-plan cache carried over; the cluster
    object and the network model's group shapes persist, as in a notebook); `train_eval_warm_ms` the same
    with one context kept (the baseline: what the caches give). `search_plans_per_s`: a full search of every
    plan for the same model, cluster and gbs=3072 (candidates per second, rejected included), over up to 2
    forked processes; `search_plans_per_s_1proc` the same in one process, and per CPU-second of that process
    (`search_plans_per_cpu_s_1proc`: the rate of an unshared core, as the machine may be busy;
    `train_load_average_1min` says how busy it was)."""
    import os

    from workbench.models import load_model
    from workbench.plan import parse_plan
    from workbench.plan.search import search_plans
    from workbench.sim.train import TrainContext, evaluate
    from workbench.topology import load_cluster

    load_before = os.getloadavg()[0]
    cluster = load_cluster(ONE_T_CLUSTER)
    model = load_model("gpt-1t")
    plan = parse_plan(ONE_T_PLAN)
    evaluate(TrainContext(cluster, model), None, plan)  # JIT-compile the schedule, warm the network model
    cold, cold_cpu = [], []
    for _ in range(30):
        t, c = time.perf_counter(), time.process_time()
        evaluate(TrainContext(cluster, model), None, plan)
        cold.append((time.perf_counter() - t) * 1e3)
        cold_cpu.append((time.process_time() - c) * 1e3)
    ctx = TrainContext(cluster, model)
    warm = []
    for _ in range(30):
        t = time.perf_counter()
        evaluate(ctx, None, plan)
        warm.append((time.perf_counter() - t) * 1e3)
    workers = min(os.cpu_count() or 1, 2)
    t = time.perf_counter()
    df = search_plans(cluster, 3072, model, workers=workers)
    seconds = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    one = search_plans(cluster, 3072, model, workers=1)
    seconds_1, cpu_1 = time.perf_counter() - t, time.process_time() - cpu
    assert one.iloc[0]["step_seconds"] == df.iloc[0]["step_seconds"]
    best = df.iloc[0]
    summary = {
        "train_eval_ms": statistics.median(cold),
        "train_eval_cpu_ms": statistics.median(cold_cpu),  # CPU time of the same calls (busy-machine check)
        "train_load_average_1min": load_before,
        "train_eval_warm_ms": statistics.median(warm),
        "search_plans_per_s": df.attrs["evaluated"] / seconds,
        "search_workers": workers,
        "search_plans_per_s_1proc": one.attrs["evaluated"] / seconds_1,
        "search_plans_per_cpu_s_1proc": one.attrs["evaluated"] / cpu_1,  # one core's rate when it is not shared
    }
    common: dict[str, Any] = {"model": "gpt-1t", "cluster": ONE_T_CLUSTER}
    rows = [
        {"bench": "train_eval", **common, "plan": ONE_T_PLAN, "context": "fresh", "calls": len(cold),
         "median_ms": summary["train_eval_ms"], "median_cpu_ms": summary["train_eval_cpu_ms"]},
        {"bench": "train_eval", **common, "plan": ONE_T_PLAN, "context": "kept", "calls": len(warm),
         "median_ms": summary["train_eval_warm_ms"]},
    ]
    for w, frame, secs in ((workers, df, seconds), (1, one, seconds_1)):
        rows.append({"bench": "search_train", **common, "gbs": 3072, "workers": w,
                     "evaluated": frame.attrs["evaluated"], "fitting": frame.attrs["fitting"], "seconds": secs,
                     "plans_per_s": frame.attrs["evaluated"] / secs,
                     **{f"best_{k}": (v.item() if hasattr(v, "item") else v) for k, v in best.items() if k in PLAN_KEYS}})
    return Measured(summary, rows)
