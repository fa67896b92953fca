"""`workbench bench dashboard`: is the live dashboard smooth, and does it leave the notebook responsive?

Runs inside a real Jupyter kernel (so every redraw is serialised and published as comm
messages, as in JupyterLab) and measures:

- `redraw_ms_by_events`: the wall time of one redraw (taking one new update and redrawing
  every panel it changed) after N events were seen (synthetic 8-rank training telemetry;
  shows the cost does not grow with the run's length);
- `stream`: a synthetic stream at `--rate` updates/s for `--seconds`: updates taken, redraws
  per second, mean redraw time;
- `responsiveness`: while a real `start_train` run (2 CPU ranks over gloo) streams into an
  attached dashboard, how late 10 ms sleeps of the kernel's main thread wake up (p50 / p99 /
  max, ms) — the baseline is the same run with no dashboard, measured in the same command.
"""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit

_KERNEL_CODE = r'''
import json, threading, time
import numpy as np, pandas as pd
from workbench.result import Result
from workbench.runner.stream import RunHandle, Update
from workbench.topology import preset
from workbench.widgets.dashboard import Dashboard

RANKS = 8
CLUSTER = preset("dgx-h100", nodes=1)
LINKS = [lk.name for lk in CLUSTER.graph.links if lk.kind == "nvlink"]

def step_update(step, steps, t0):
    ev, mem, links, t_end = [], [], [], t0
    for r in range(RANKS):
        t = t0
        for op, kind, dur, nbytes in (("forward", "compute", 0.010, 0), ("backward", "compute", 0.020, 0),
                                      ("all_reduce", "collective", 0.004 + 0.001 * (r % 3), 64 << 20)):
            ev.append({"rank": r, "device": CLUSTER.gpus[r], "kind": kind, "op": op, "bytes": nbytes,
                       "links": (), "start": t, "end": t + dur, "group": "dp", "step": step})
            if nbytes:
                links.append({"link": LINKS[r], "start": t, "end": t + dur, "GBps": nbytes / dur / 1e9,
                              "utilisation": nbytes / dur / 1e9 / 450.0})
            t += dur
        t_end = max(t_end, t)
        for cat, b in (("weights", 2e9), ("optimizer", 8e9), ("activations", 1e9 + 1e7 * step)):
            mem.append({"rank": r, "category": cat, "bytes": b, "time": t})
    return Update(pd.DataFrame(ev), pd.DataFrame(mem), pd.DataFrame(links), step + 1, steps,
                  (step + 1) / steps, t_end), t_end

out = {}
# 1. redraw cost against events already seen
dash = Dashboard(CLUSTER, max_fps=1e-3)  # no automatic redraws: each one is timed below
display(dash)
t, seen, by_events, step = 0.0, 0, {}, 0
for mark in (RANKS * 3 * n for n in (10, 100, 400, 1000)):
    while seen < mark:
        u, t = step_update(step, 2000, t)
        dash.push(u); seen += len(u.events); step += 1
    dash.flush()
    times = []
    for _ in range(5):  # one new update, then one redraw of everything it changed
        u, t = step_update(step, 2000, t)
        dash.push(u); step += 1
        t1 = time.perf_counter(); dash.flush(); times.append(time.perf_counter() - t1)
    by_events[mark] = 1e3 * float(np.median(times))
out["redraw_ms_by_events"] = by_events

# 2. a synthetic stream at RATE updates/s through attach()
handle = RunHandle(steps=int(RATE * SECONDS))
dash = Dashboard(CLUSTER, max_fps=10)
display(dash)
dash.attach(handle)
def feed():
    t = 0.0
    for s in range(handle.steps):
        u, t = step_update(s, handle.steps, t)
        handle._emit(u)
        time.sleep(1.0 / RATE)
    handle._finish(result=Result())
t0 = time.perf_counter()
threading.Thread(target=feed, daemon=True).start()
dash.wait(timeout=SECONDS * 5 + 30)
wall = time.perf_counter() - t0
st = dash.stats()
out["stream"] = {"rate_asked": RATE, "seconds": wall, "updates": st["updates"],
                 "updates_per_s": st["updates"] / wall, "redraws": st["renders"],
                 "redraws_per_s": st["renders"] / wall, "mean_redraw_ms": st["mean_render_ms"]}

# 3. responsiveness of the main thread during a real run, with and without a dashboard
from workbench.runner import start_train
from workbench.topology import discover
local = discover(cpu_ranks=2)
def lateness(handle):
    late = []
    while not handle.done:
        t1 = time.perf_counter(); time.sleep(0.01); late.append(time.perf_counter() - t1 - 0.01)
    a = 1e3 * np.array(late)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "samples": int(len(a))}
job = dict(cluster=local, model="gpt:layers=2,hidden=128,heads=4,vocab=256,seq=64", plan="dp=2", steps=STEPS)
h = start_train(**job)
base = lateness(h); r0 = h.wait(300)
dash = Dashboard(local, max_fps=10)
display(dash)
h = start_train(**job)
dash.attach(h)
with_dash = lateness(h); r1 = dash.wait(300)
out["responsiveness"] = {"steps": STEPS, "baseline": base, "with_dashboard": with_dash,
                         "run_updates_per_s": r1.metrics.get("updates_per_s"),
                         "dashboard": dash.stats(),
                         "step_seconds_baseline": r0.metrics.get("step_seconds"),
                         "step_seconds_with_dashboard": r1.metrics.get("step_seconds")}
print("BENCH-JSON " + json.dumps(out))
'''


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=20.0, help="updates per second of the synthetic stream")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the synthetic stream runs")
    p.add_argument("--steps", type=int, default=40, help="training steps of each real run")
    p.add_argument("--out", help="also write the JSON here (e.g. benchmarks/results/dashboard-<machine>.json)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run(args: argparse.Namespace) -> int:
    import json
    import os
    import platform

    from workbench.errors import WorkbenchError, require

    if args.rate <= 0 or args.seconds <= 0 or args.steps < 1:
        raise WorkbenchError("--rate and --seconds must be positive and --steps at least 1")
    km = require("jupyter_client.manager", "notebook")
    code = f"RATE, SECONDS, STEPS = {float(args.rate)!r}, {float(args.seconds)!r}, {int(args.steps)!r}\n" + _KERNEL_CODE
    manager, client = km.start_new_kernel(kernel_name="python3")
    lines: list[str] = []
    try:
        def keep(msg: dict) -> None:
            if msg["msg_type"] == "stream":
                lines.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                lines.append("\n".join(msg["content"]["traceback"]))

        reply = client.execute_interactive(code, timeout=600, output_hook=keep)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    text = "".join(lines)
    found = [ln for ln in text.splitlines() if ln.startswith("BENCH-JSON ")]
    if reply["content"]["status"] != "ok" or not found:
        raise WorkbenchError(f"bench dashboard: the kernel failed:\n{text[-3000:]}")
    out = json.loads(found[-1][len("BENCH-JSON "):])
    out["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "processor": platform.machine()}
    out["command"] = f"workbench bench dashboard --rate {args.rate:g} --seconds {args.seconds:g} --steps {args.steps}"
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    if args.json:
        emit(out, True)
        return 0
    ev = out["redraw_ms_by_events"]
    emit({
        "redraw ms by events seen": ", ".join(f"{k}: {v:.1f}" for k, v in ev.items()),
        "stream updates/s, redraws/s": f"{out['stream']['updates_per_s']:.1f}, {out['stream']['redraws_per_s']:.1f}",
        "main-thread lateness p99 ms (no dashboard / dashboard)":
            f"{out['responsiveness']['baseline']['p99_ms']:.1f} / {out['responsiveness']['with_dashboard']['p99_ms']:.1f}",
    }, False)
    return 0


COMMANDS = [Command("bench", "dashboard", "benchmark the live dashboard in a real kernel (redraw cost, "
                    "updates/s, notebook responsiveness during a run)", _args, _run)]
