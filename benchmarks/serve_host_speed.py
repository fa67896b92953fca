"""How steady the host's speed is under a host-bound serving step: the same step thousands of times, and where a
slow one's time goes.

    python benchmarks/serve_host_speed.py --machine cpu2-vm
    python benchmarks/serve_host_speed.py --machine h200 --device cuda:0

The calibration's random Llama (`serve_calibrate.server_setup`; 1B on a GPU) in this process with a paged KV cache
(`serve_step_profile.Steps`), its graphed pieces captured (`workbench.serve.graphs.PieceGraphs`). A mixed step
(`--decodes` decodes at a context of 48 + one 48-token prefill chunk: its attention runs eagerly between the pieces,
so the step is as fast as the host enqueues it) alternates with a prefill chunk alone, `--steps` times. Reports
each kind's median and 10th/90th percentiles, the mixed steps' time series (S: more than 1.25× the median) and,
from `torch.profiler` over 300 more mixed steps each in its own range, each host op's time in the slow steps
against the fast ones: one op slower says a code path, all of them alike says the host ran slower.
Writes benchmarks/results/serve-host-speed-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machine", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--profiled", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    import torch
    from serve_step_profile import Steps
    from torch.profiler import ProfilerActivity, profile, record_function

    from workbench.serve.graphs import PieceGraphs
    from workbench.serve.model import Batch

    gpu = args.device.startswith("cuda")
    st = Steps(args.device, "1b" if gpu else "tiny", ((args.decodes, 1, 48), (0, 1, 48)), 48)
    pieces = PieceGraphs(st.model, st.kv, st.spare, args.decodes + 48)
    pieces.capture_all()

    def run(it: Any) -> float:
        t0 = time.perf_counter()
        pieces.run(Batch.build(it, st.page_size, st.model.device)).argmax(-1).tolist()
        return (time.perf_counter() - t0) * 1e3

    mixed, alone = st.items(args.decodes, 1, 48), st.items(0, 1, 48)
    for _ in range(20):
        run(mixed), run(alone)
    series: list[tuple[str, float]] = [("alone" if i % 4 == 0 else "mixed", run(alone if i % 4 == 0 else mixed))
                                       for i in range(args.steps)]
    kinds = {k: [w for kk, w in series if kk == k] for k in ("mixed", "alone")}
    stats = {k: {"median_ms": statistics.median(v), "p10_ms": pct(v, 0.1), "p90_ms": pct(v, 0.9), "steps": len(v)}
             for k, v in kinds.items()}
    med = stats["mixed"]["median_ms"]
    marks = "".join("S" if w > 1.25 * med else "f" for k, w in series if k == "mixed")

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    walls: list[float] = []
    with profile(activities=acts) as prof:
        for i in range(args.profiled):
            with record_function(f"STEP{i}"):
                walls.append(run(mixed))
    events = list(prof.events())
    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.name.startswith("STEP"))
    starts = [r[0] for r in ranges]
    per: dict[str, collections.Counter[str]] = {r[2]: collections.Counter() for r in ranges}
    for e in events:
        if e.name.startswith("STEP") or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        j = bisect.bisect_right(starts, e.time_range.start) - 1
        if j >= 0 and e.time_range.start <= ranges[j][1]:
            per[ranges[j][2]][e.name] += e.time_range.end - e.time_range.start
    pmed = statistics.median(walls)
    slow = [f"STEP{i}" for i, w in enumerate(walls) if w > 1.25 * pmed]
    fast = [f"STEP{i}" for i, w in enumerate(walls) if w < 1.1 * pmed]
    ops = []
    if slow and fast:
        for op in set().union(*per.values()):
            s, f = statistics.median(per[k][op] for k in slow), statistics.median(per[k][op] for k in fast)
            ops.append({"op": op[:80], "slow_us": s, "fast_us": f, "ratio": s / f if f else float("nan")})
        ops.sort(key=lambda r: -(r["slow_us"] - r["fast_us"]))
    record = {"machine": args.machine, "command": "python benchmarks/serve_host_speed.py " + " ".join(sys.argv[1:]),
              "platform": platform.platform(), "cpus": os.cpu_count(),
              "gpu": torch.cuda.get_device_name(0) if gpu else None, "decodes": args.decodes, "stats": stats,
              "series": marks, "profiled": {"median_ms": pmed, "slow": len(slow), "fast": len(fast),
                                            "ops": ops[:15]}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-host-speed-{args.machine}.json").write_text(json.dumps(record, indent=1))
    ratios = [r["ratio"] for r in ops[:15] if r["ratio"] == r["ratio"]]
    lines = [f"# A host-bound serving step, thousands of times, on {args.machine}", "", f"`{record['command']}`", "",
             f"{record['platform']}, {record['cpus']} CPUs{', ' + record['gpu'] if gpu else ''}. Mixed step: "
             f"{args.decodes} decodes + one 48-token chunk through the graphed pieces (attention eager); alone: the "
             "chunk alone. Milliseconds per step (synchronised).", "",
             "| step | steps | median | p10 | p90 |", "|---|---|---|---|---|"]
    for k, s in stats.items():
        lines.append(f"| {k} | {s['steps']} | {s['median_ms']:.2f} | {s['p10_ms']:.2f} | {s['p90_ms']:.2f} |")
    lines += ["", f"Mixed steps in order, S = over 1.25× their median ({marks.count('S')} of {len(marks)}):", "",
              "```", *[marks[i:i + 100] for i in range(0, len(marks), 100)], "```", "",
              f"Profiled ({args.profiled} mixed steps, profiler on: median {pmed:.2f} ms): {len(slow)} slow (> 1.25× "
              f"the median), {len(fast)} fast (< 1.1×); the host ops whose time grew most, median per step (µs); "
              f"their slow/fast ratios {min(ratios, default=float('nan')):.2f}-{max(ratios, default=float('nan')):.2f}.",
              "", "| host op | slow | fast | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['slow_us']:.0f} | {r['fast_us']:.0f} | {r['ratio']:.2f} |" for r in ops[:15]]
    (out / f"serve-host-speed-{args.machine}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
