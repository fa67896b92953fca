"""What recording the native engine's collectives costs: an A/B of profiled steps against their neighbours.

    python3 benchmarks/native_comm_overhead.py --out benchmarks/results/native-comm-overhead-cpu.json

For each plan (default dp=2 with FSDP2, tp=2 with DTensor + SP, pp=2 with 1F1B; gloo on CPU ranks) three
runs of the same job with telemetry on: the comm sampler every 2nd step (`WORKBENCH_COMM_EVERY=2`: odd steps
run under `torch.profiler`) as it runs by default (the ops' shapes recorded on the first sample only), the
same with shapes on every sample (`WORKBENCH_COMM_REUSE_SHAPES=0`), and the sampler off (the control). In each run every odd step's time is
divided by the mean of its two even neighbours (drift in the machine's load cancels); the median of those
ratios − 1 is the extra time of a profiled step, and the control's the noise of the pairing. Spread over
the steps between samples it is the overhead: at one in 10 (the least gap), and at the gap the sampler's
default 2 % budget picks from that extra time. CPU seconds of the ranks and the load average are written
beside each run, since the box is shared.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "llama3-8b:layers=2,hidden=128,heads=4,kv_heads=2,head_dim=32,ffn=344,vocab=1024,seq=64"
PLANS = ("dp=2,zero=1,mbs=2,gbs=8", "tp=2,mbs=2,gbs=4", "pp=2,mbs=1,gbs=4")
DEFAULT_EVERY = 10
BUDGET_PCT = 2.0  # the sampler's default budget (workbench.runner.native: comm_budget_pct)


def paired(times: list[float], odd: bool = True) -> list[float]:
    """t_i / mean(t_{i-1}, t_{i+1}) for odd (or even) i ≥ 3 with both neighbours (steps 0–2 are warm-up)."""
    return [times[i] / ((times[i - 1] + times[i + 1]) / 2) for i in range(3, len(times) - 1) if (i % 2 == 1) == odd]


def one(plan: str, every: int, steps: int, model: str, reuse: bool = True) -> dict[str, Any]:
    from workbench.runner import run_train

    os.environ["WORKBENCH_COMM_EVERY"] = str(every)
    os.environ["WORKBENCH_COMM_BUDGET_PCT"] = "0"  # a fixed one step in `every`
    os.environ["WORKBENCH_COMM_REUSE_SHAPES"] = "1" if reuse else "0"
    load0 = os.getloadavg()[0]
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = run_train(model=model, plan=plan, steps=steps, timeout=600)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    times = list(r.metrics["step_seconds_all"])
    ev = r.events
    comm = ev[ev["kind"] != "compute"]
    sampled = sorted(int(s) for s in comm["step"].unique())
    ratios = paired(times)
    return {"plan": plan, "comm_every": every, "steps": steps, "step_s_median": statistics.median(times[1:]),
            "odd_vs_neighbours_pct": (statistics.median(ratios) - 1) * 100 if ratios else None,
            "pairs": len(ratios), "sampled_steps": len(sampled),
            "comm_events_per_sampled_step_per_rank": len(comm) / max(len(sampled), 1) / r.metrics["ranks"],
            "comm_ops": ",".join(sorted(set(comm["op"]))), "groups": ",".join(sorted(set(comm["group"]))),
            "telemetry_cost_pct": r.metrics.get("telemetry_cost_pct"),
            "ranks_cpu_s": (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime), "wall_s": wall,
            "load_before": load0, "load_after": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/native-comm-overhead-cpu.json")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--plans", default=";".join(PLANS), help="plans separated by ';'")
    a = ap.parse_args()
    import json

    from workbench.bench.record import record

    rows, summary = [], {}
    for plan in a.plans.split(";"):
        control = one(plan, 0, a.steps, a.model)
        shaped = one(plan, 2, a.steps, a.model, reuse=False)
        profiled = one(plan, 2, a.steps, a.model)
        extra = profiled["odd_vs_neighbours_pct"] - control["odd_vs_neighbours_pct"]
        extra_shaped = shaped["odd_vs_neighbours_pct"] - control["odd_vs_neighbours_pct"]
        rows += [control | {"mode": "control"}, shaped | {"mode": "profiled every 2nd step, shapes every time"},
                 profiled | {"mode": "profiled every 2nd step (shapes on the first)"}]
        key = plan.split(",")[0].replace("=", "")
        summary[f"{key}_profiled_step_with_shapes_extra_pct"] = round(extra_shaped, 1)
        gap = max(DEFAULT_EVERY, math.ceil(max(extra, 0.0) / BUDGET_PCT))  # what the sampler's budget picks
        summary[f"{key}_profiled_step_extra_pct"] = round(extra, 1)
        summary[f"{key}_overhead_at_every_{DEFAULT_EVERY}_pct"] = round(extra / DEFAULT_EVERY, 2)
        summary[f"{key}_budget_gap_steps"] = gap
        summary[f"{key}_overhead_at_budget_gap_pct"] = round(extra / gap, 2)
        summary[f"{key}_step_s"] = round(control["step_s_median"], 4)
        print(f"{plan:>24}: step {control['step_s_median'] * 1e3:7.1f} ms, profiled step {extra:+.1f} % "
              f"(with shapes {extra_shaped:+.1f} %) "
              f"(control {control['odd_vs_neighbours_pct']:+.1f} %); at 1 in {DEFAULT_EVERY}: "
              f"{extra / DEFAULT_EVERY:+.2f} %; the {BUDGET_PCT:g} % budget samples 1 in {gap}: {extra / gap:+.2f} %; "
              f"{profiled['comm_events_per_sampled_step_per_rank']:.0f} events per profiled step per rank "
              f"({profiled['comm_ops']})", flush=True)
    summary["model"] = a.model
    cmd = "python3 benchmarks/native_comm_overhead.py " + " ".join(sys.argv[1:])
    rec = record("native_comm_overhead", rows, summary, cmd.strip())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
