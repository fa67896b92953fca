"""Benchmarks of the simulator itself: a registry other modules extend.

`BENCHES` maps a name to a function returning a dict of measured numbers (keys end in
`_us`, `_ms`, `_s` or `_per_s`); `workbench bench sim` runs them all and merges the dicts.
Another module adds its own with `register("name")(fn)`; modules named `workbench/sim/bench_*.py`
are imported by `run_all` so their registrations take effect.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

BENCHES: dict[str, Callable[[], dict[str, Any]]] = {}


def register(name: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    def deco(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        BENCHES[name] = fn
        return fn
    return deco


def median_call_us(fn: Callable[[], object], repeat: int = 2000) -> float:
    """Median wall time of one call, in µs (timed in batches of 10)."""
    samples = []
    for _ in range(max(repeat // 10, 1)):
        t = time.perf_counter()
        for _ in range(10):
            fn()
        samples.append((time.perf_counter() - t) / 10 * 1e6)
    return statistics.median(samples)


@register("collective_closed_form")
def bench_collective() -> dict[str, Any]:
    """Closed-form collective per call: a fresh size every call (no memo hit), on a 128-node cluster, for
    a TP group (8 GPUs of one node), a DP group (one GPU per node, 128 nodes) and the whole cluster."""
    from workbench.sim.collectives import collective
    from workbench.topology import load_cluster

    c = load_cluster("aws-p5:nodes=128")
    groups = {"tp8": c.gpus[:8], "dp128": c.gpus[::8], "all1024": None}
    out: dict[str, Any] = {}
    counter = [0]
    per_group = {}
    for name, grp in groups.items():
        collective(c, "all_reduce", 1 << 20, grp)  # build the group's shape once

        def call(grp=grp) -> None:  # type: ignore[no-untyped-def]
            counter[0] += 1
            collective(c, "all_reduce", (1 << 20) + counter[0], grp)
        per_group[name] = median_call_us(call)
    cached = median_call_us(lambda: collective(c, "all_reduce", 1 << 20, groups["dp128"]))  # baseline: memo hit
    out["collective_closed_form_us"] = max(per_group.values())
    out["collective_closed_form_by_group_us"] = per_group
    out["collective_closed_form_memo_hit_us"] = cached
    return out


@register("flow_all_to_all")
def bench_flows() -> dict[str, Any]:
    """Flow-level all-to-all, 1 MiB per pair, on aws-p5 with 128 nodes (1024 GPUs) and smaller sizes."""
    from workbench.sim.flows import all_to_all_flows, flow_graph, simulate
    from workbench.topology import load_cluster

    out: dict[str, Any] = {}
    scaling = []
    for nodes in (16, 32, 64, 128):
        c = load_cluster(f"aws-p5:nodes={nodes}")
        t = time.perf_counter()
        flow_graph(c)
        prep = time.perf_counter() - t
        simulate(c, all_to_all_flows(c, 1 << 20))  # JIT compile (first call) and warm caches
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            res = simulate(c, all_to_all_flows(c, 1 << 20))
            runs.append(time.perf_counter() - t)
        scaling.append({"gpus": c.num_gpus, "flows": res.flows, "classes": len(res.classes),
                        "seconds": statistics.median(runs), "graph_prep_s": prep,
                        "simulated_makespan_s": res.makespan, "max_utilisation": res.max_utilisation()})
    out["flow_all_to_all_1024_s"] = scaling[-1]["seconds"]
    out["flow_all_to_all_scaling"] = scaling
    # baseline: the same kernel without flow classes (every flow on its own: exact max-min), 64 GPUs
    c = load_cluster("aws-p5:nodes=8")
    fs = all_to_all_flows(c, 1 << 20)
    simulate(c, fs, aggregate=False)
    t = time.perf_counter()
    exact = simulate(c, fs, aggregate=False)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    agg = simulate(c, fs)
    out["flow_all_to_all_64_baseline"] = {
        "flows": len(fs), "exact_s": t_exact, "classes_s": time.perf_counter() - t,
        "exact_makespan_s": exact.makespan, "classes_makespan_s": agg.makespan}
    return out


def run_all(names: list[str] | None = None) -> dict[str, Any]:
    """Run the registered benchmarks (all, or `names`) and merge their results."""
    import importlib
    import os
    import pkgutil
    import platform

    import workbench.sim as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("bench_"):
            importlib.import_module(f"workbench.sim.{info.name}")
    out: dict[str, Any] = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                                       "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}}
    for name, fn in BENCHES.items():
        if names and name not in names:
            continue
        out.update(fn())
    return out
