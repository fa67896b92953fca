"""Benchmarks of the simulator itself (`workbench bench sim`): a registry other modules extend.

`BENCHES` maps a name to a function returning `Measured(summary, rows)`: summary keys end in
their unit (`_us`, `_ms`, `_s`, `_per_s`), rows hold the measurements behind them with a
`bench` column. Add one with `@register("name")` in a module named `workbench/bench/sim_*.py`
(or, for older code, `workbench/sim/bench_*.py`): `discover()` imports those so their
registrations take effect.
"""

from __future__ import annotations

import importlib
import pkgutil
import statistics
import time
from collections.abc import Callable
from typing import Any

from workbench.bench.record import Measured
from workbench.errors import WorkbenchError

Bench = Callable[[], Measured]
BENCHES: dict[str, Bench] = {}


def register(name: str) -> Callable[[Bench], Bench]:
    def deco(fn: Bench) -> Bench:
        BENCHES[name] = fn
        return fn
    return deco


def discover() -> dict[str, Bench]:
    """Import every module that registers simulator benchmarks; the registry afterwards."""
    import workbench.bench as bench_pkg
    import workbench.sim as sim_pkg

    for pkg, prefix in ((bench_pkg, "sim_"), (sim_pkg, "bench_")):
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith(prefix):
                importlib.import_module(f"{pkg.__name__}.{info.name}")
    return BENCHES


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
def bench_collective() -> Measured:
    """Closed-form collective per call: a fresh size every call (no memo hit), on a 128-node cluster, for
    a TP group (8 GPUs of one node), a DP group (one GPU per node, 128 nodes) and the whole cluster;
    the baseline is the same call answered from the memo."""
    from workbench.sim.collectives import collective
    from workbench.topology import load_cluster

    c = load_cluster("aws-p5:nodes=128")
    groups = {"tp8": c.gpus[:8], "dp128": c.gpus[::8], "all1024": None}
    counter = [0]
    rows: list[dict[str, Any]] = []
    per_call: dict[str, float] = {}
    for name, grp in groups.items():
        collective(c, "all_reduce", 1 << 20, grp)  # build the group's shape once

        def call(grp: Any = grp) -> None:
            counter[0] += 1
            collective(c, "all_reduce", (1 << 20) + counter[0], grp)
        per_call[name] = median_call_us(call)
        rows.append({"bench": "collective_closed_form", "group": name, "memo_hit": False, "us_per_call": per_call[name]})
    cached = median_call_us(lambda: collective(c, "all_reduce", 1 << 20, groups["dp128"]))
    rows.append({"bench": "collective_closed_form", "group": "dp128", "memo_hit": True, "us_per_call": cached})
    return Measured({"collective_closed_form_us": max(per_call.values()),
                     "collective_closed_form_memo_hit_us": cached}, rows)


@register("flow_all_to_all")
def bench_flows() -> Measured:
    """Flow-level all-to-all, 1 MiB per pair, on aws-p5 with 128 nodes (1024 GPUs) and smaller sizes; the
    baseline is the same kernel without flow classes (every flow on its own: exact max-min) on 64 GPUs."""
    from workbench.sim.flows import all_to_all_flows, flow_graph, simulate
    from workbench.topology import load_cluster

    rows: list[dict[str, Any]] = []
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
        rows.append({"bench": "flow_all_to_all", "gpus": c.num_gpus, "flows": res.flows, "classes": len(res.classes),
                     "seconds": statistics.median(runs), "graph_prep_s": prep,
                     "simulated_makespan_s": res.makespan, "max_utilisation": res.max_utilisation()})
    c = load_cluster("aws-p5:nodes=8")
    fs = all_to_all_flows(c, 1 << 20)
    simulate(c, fs, aggregate=False)
    t = time.perf_counter()
    exact = simulate(c, fs, aggregate=False)
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    agg = simulate(c, fs)
    t_agg = time.perf_counter() - t
    for how, secs, res in (("exact", t_exact, exact), ("classes", t_agg, agg)):
        rows.append({"bench": "flow_all_to_all_64_baseline", "gpus": c.num_gpus, "how": how, "flows": len(fs),
                     "seconds": secs, "simulated_makespan_s": res.makespan})
    biggest = max((r for r in rows if r["bench"] == "flow_all_to_all"), key=lambda r: r["gpus"])
    return Measured({"flow_all_to_all_1024_s": biggest["seconds"]}, rows)


def run(names: list[str] | None = None) -> Measured:
    """Run the registered benchmarks (all, or `names`): their summaries merged, their rows concatenated."""
    known = discover()
    bad = sorted(set(names or ()) - set(known))
    if bad:
        raise WorkbenchError(f"--only: unknown benchmark(s) {bad} (known: {', '.join(known)})")
    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name, fn in known.items():
        if names and name not in names:
            continue
        part = fn()
        summary.update(part.summary)
        rows += [{"bench": name, **r} for r in part.rows]
    return Measured(summary, rows)
