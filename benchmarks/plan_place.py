"""Planner speed and predicted gains: `python benchmarks/plan_place.py [--out FILE] [--repeat N]`.

Times `workbench.plan.place` on the issue's target (32 GPUs of 3 kinds: RTX 3090, RTX 4090, A100 on
10 GbE; a 126-layer model, Llama-3 405B) and on the notebook's cases, each in a fresh process
state (caches cleared) and warm, and records the predicted throughput of the planner's placement
against the uniform and memory-proportional splits, by the planner's closed form and by the serving
simulator (`workbench.sim.serve_placement`). Baseline in the same run: the time of one closed-form
prediction of the uniform split (the unit the search repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("mixed3-32 (3090+4090+A100, 10GbE)", "datasets/clusters/mixed3-32.yaml", "llama3-405b", "concurrency=64,isl=1024,osl=256"),
    ("mixed-32 (3090+A100, 10GbE)", "datasets/clusters/mixed-32.yaml", "llama3-70b", "concurrency=256,isl=1024,osl=256"),
    ("mixed-32 (3090+A100, 10GbE)", "datasets/clusters/mixed-32.yaml", "kimi-k2", "concurrency=32,isl=1024,osl=256"),
]


def _clear() -> None:
    from workbench.plan import place, placement, stage_cost

    stage_cost.layer_costs.cache_clear()
    place._params.cache_clear()
    placement.supported_precisions.cache_clear()


def _x(g: float | None) -> str:
    return f"x{g:.2f}" if g else "(baseline does not fit)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/place-cpu2.json"))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    from workbench.models.presets import load_model
    from workbench.plan.place import (
        Options,
        _Ctx,
        _evaluate,
        baseline_uniform,
        parse_slo,
        parse_traffic,
        place,
    )
    from workbench.topology.presets import load_cluster

    import_s = time.perf_counter() - t0
    rows = []
    for label, cluster, model, traffic in CASES:
        place(cluster, model, "throughput", traffic)  # first call: imports, dataset reads
        cold, warm, cpu = [], [], []
        for _ in range(args.repeat):
            _clear()
            rc = place(cluster, model, "throughput", traffic)
            cold.append(rc.planner_seconds)
            cpu.append(rc.search["planner_cpu_seconds"])
        for _ in range(args.repeat):
            r = place(cluster, model, "throughput", traffic)
            warm.append(r.planner_seconds)
        sim = place(cluster, model, "throughput", traffic, simulate=True).simulated or {}
        ctx = _Ctx(load_cluster(cluster), load_model(model), parse_traffic(traffic), Options())
        bp = baseline_uniform(ctx)
        t1 = time.perf_counter()
        _evaluate(ctx, bp, parse_slo(None), rows=False)
        one_eval = time.perf_counter() - t1
        p = r.predicted
        rows.append({
            "case": label, "cluster": cluster, "model": model, "layers": ctx.model.layers,
            "gpus": ctx.cluster.num_gpus, "gpu_kinds": len(ctx.cluster.gpu_models()), "traffic": traffic,
            "planner_seconds_cold_median": statistics.median(cold), "planner_seconds_cold_max": max(cold),
            "planner_seconds_warm_median": statistics.median(warm),
            "planner_cpu_seconds_cold_median": statistics.median(cpu),
            "baseline_one_prediction_seconds": one_eval,
            "candidates": r.search["candidates"], "dp_solves": r.search["dp_solves"],
            "gap_to_fluid_bound": r.search["gap"],
            "predicted": {k: p[k] for k in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "gpus_used")},
            "baselines": {n: {k: b.get(k) for k in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "fits")}
                          for n, b in r.baselines.items()},
            "gain_vs_uniform": r.to_dict()["throughput_gain"]["uniform"],
            "gain_vs_memory_proportional": r.to_dict()["throughput_gain"]["memory_proportional"],
            "serving_simulator": {n: {k: v.get(k) for k in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "error",
                                                              "traffic") if k in v} for n, v in sim.items()},
            "placement": [f"r{s['replica']} L{s['layers'][0]}-{s['layers'][1]} {s['gpu']} tp{s['tp']} {s['precision']}"
                          + (f" offload {s['offload_weights']:.0%}" if s["offload_weights"] else "") for s in r.stages],
        })
        print(f"{label:38s} {model:12s} cold {statistics.median(cold):.3f} s (cpu {statistics.median(cpu):.3f} s)  warm "
              f"{statistics.median(warm):.3f} s  {p['output_throughput']:8.1f} tok/s  gain vs uniform "
              f"{_x(rows[-1]['gain_vs_uniform'])}, vs memory-proportional {_x(rows[-1]['gain_vs_memory_proportional'])}")
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                       "processor": platform.processor() or platform.machine(),
                       "load_average_1m_at_end": os.getloadavg()[0]},
           "command": "python benchmarks/plan_place.py", "import_seconds": import_s, "repeat": args.repeat,
           "target": "32 GPUs of 3 kinds, 126-layer model: <= 1 s on 2 cores", "cases": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
