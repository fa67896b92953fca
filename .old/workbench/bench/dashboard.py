"""The live dashboard's benchmark (`workbench bench dashboard`): smooth, and the notebook stays responsive?

`measure(rate, seconds, steps)` runs inside a real Jupyter kernel (so every redraw is
serialised and published as comm messages, as in JupyterLab; `run_in_kernel` starts one) and
measures:

- redraw cost against events already seen: the wall time of one redraw (taking one new update
  and redrawing every panel it changed) after N events (synthetic 8-rank training telemetry;
  shows the cost does not grow with the run's length);
- a synthetic stream at `rate` updates/s for `seconds`: updates taken, redraws per second,
  mean redraw time;
- responsiveness: while a real training run (2 CPU ranks over gloo, `steps` steps) streams into
  an attached dashboard, how late 10 ms sleeps of the kernel's main thread wake up (p50 / p99 /
  max, ms); the baseline is the same run with no dashboard, measured in the same call.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pandas as pd

from workbench.bench.record import Measured

RANKS = 8
MARKER = "BENCH-JSON "


def _show(widget: Any) -> None:
    from IPython.display import display

    display(widget)


def step_update(cluster: Any, links: list[str], step: int, steps: int, t0: float) -> tuple[Any, float]:
    """One synthetic step of 8-rank training telemetry (forward, backward, a data-parallel all-reduce)."""
    from workbench.core.stream import Update

    ev, mem, lk, t_end = [], [], [], t0
    for r in range(RANKS):
        t = t0
        for op, kind, dur, nbytes in (("forward", "compute", 0.010, 0), ("backward", "compute", 0.020, 0),
                                      ("all_reduce", "collective", 0.004 + 0.001 * (r % 3), 64 << 20)):
            ev.append({"rank": r, "device": cluster.gpus[r], "kind": kind, "op": op, "bytes": nbytes,
                       "links": (), "start": t, "end": t + dur, "group": "dp", "step": step})
            if nbytes:
                lk.append({"link": links[r], "start": t, "end": t + dur, "GBps": nbytes / dur / 1e9,
                           "utilisation": nbytes / dur / 1e9 / 450.0})
            t += dur
        t_end = max(t_end, t)
        for cat, b in (("weights", 2e9), ("optimizer", 8e9), ("activations", 1e9 + 1e7 * step)):
            mem.append({"rank": r, "category": cat, "bytes": b, "time": t})
    return Update(pd.DataFrame(ev), pd.DataFrame(mem), pd.DataFrame(lk), step + 1, steps,
                  (step + 1) / steps, t_end), t_end


def redraw_cost(cluster: Any, links: list[str], marks: tuple[int, ...] = (10, 100, 400, 1000)) -> list[dict[str, Any]]:
    """Median redraw milliseconds after `mark` steps' events were pushed (no automatic redraws)."""
    from workbench.widgets.dashboard import Dashboard

    dash = Dashboard(cluster, max_fps=1e-3)  # no automatic redraws: each one is timed below
    _show(dash)
    t, seen, step, rows = 0.0, 0, 0, []
    for mark in (RANKS * 3 * n for n in marks):
        while seen < mark:
            u, t = step_update(cluster, links, step, 2000, t)
            dash.push(u)
            seen += len(u.events)
            step += 1
        dash.flush()
        times = []
        for _ in range(5):  # one new update, then one redraw of everything it changed
            u, t = step_update(cluster, links, step, 2000, t)
            dash.push(u)
            step += 1
            t1 = time.perf_counter()
            dash.flush()
            times.append(time.perf_counter() - t1)
        rows.append({"bench": "redraw", "events_seen": mark, "redraw_ms": 1e3 * float(np.median(times))})
    return rows


def stream(cluster: Any, links: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """A synthetic stream at `rate` updates/s through `attach()`, for `seconds`."""
    from workbench.core.stream import RunHandle
    from workbench.result import Result
    from workbench.widgets.dashboard import Dashboard

    handle = RunHandle(steps=int(rate * seconds))
    dash = Dashboard(cluster, max_fps=10)
    _show(dash)
    dash.attach(handle)

    def feed() -> None:
        t = 0.0
        for s in range(handle.steps):
            u, t = step_update(cluster, links, s, handle.steps, t)
            handle._emit(u)
            time.sleep(1.0 / rate)
        handle._finish(result=Result())

    t0 = time.perf_counter()
    threading.Thread(target=feed, daemon=True).start()
    dash.wait(timeout=seconds * 5 + 30)
    wall = time.perf_counter() - t0
    st = dash.stats()
    return {"bench": "stream", "rate_asked": rate, "seconds": wall, "updates": st["updates"],
            "updates_per_s": st["updates"] / wall, "redraws": st["renders"],
            "redraws_per_s": st["renders"] / wall, "mean_redraw_ms": st["mean_render_ms"]}


def _lateness(handle: Any) -> dict[str, Any]:
    late = []
    while not handle.done:
        t1 = time.perf_counter()
        time.sleep(0.01)
        late.append(time.perf_counter() - t1 - 0.01)
    a = 1e3 * np.array(late or [0.0])
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "samples": len(late)}


def responsiveness(steps: int) -> list[dict[str, Any]]:
    """Main-thread lateness during a real 2-rank CPU run, without (baseline) and with a dashboard."""
    import workbench as wb
    from workbench.topology import discover
    from workbench.widgets.dashboard import Dashboard

    local = discover(cpu_ranks=2)
    job = wb.Job.create(local, "gpt:layers=2,hidden=128,heads=4,vocab=256,seq=64", "dp=2", steps=steps)
    h = wb.start(job)
    base = _lateness(h)
    r0 = h.wait(300)
    dash = Dashboard(local, max_fps=10)
    _show(dash)
    h = wb.start(job)
    dash.attach(h)
    with_dash = _lateness(h)
    r1 = dash.wait(300)
    assert r1 is not None
    st = dash.stats()
    return [{"bench": "responsiveness", "dashboard": False, "steps": steps, **base,
             "step_seconds": r0.metrics.get("step_seconds"), "run_updates_per_s": r0.metrics.get("updates_per_s")},
            {"bench": "responsiveness", "dashboard": True, "steps": steps, **with_dash,
             "step_seconds": r1.metrics.get("step_seconds"), "run_updates_per_s": r1.metrics.get("updates_per_s"),
             "redraws": st["renders"], "mean_redraw_ms": st["mean_render_ms"]}]


def measure(rate: float, seconds: float, steps: int) -> Measured:
    """All three parts, in the calling kernel; the summary holds the headline numbers."""
    from workbench.topology import preset

    cluster = preset("dgx-h100", nodes=1)
    links = [lk.name for lk in cluster.graph.links if lk.kind == "nvlink"]
    redraw = redraw_cost(cluster, links)
    st = stream(cluster, links, rate, seconds)
    resp = responsiveness(steps)
    summary = {f"redraw_ms_at_{r['events_seen']}_events": r["redraw_ms"] for r in redraw}
    summary |= {"stream_updates_per_s": st["updates_per_s"], "stream_redraws_per_s": st["redraws_per_s"],
                "stream_mean_redraw_ms": st["mean_redraw_ms"],
                "lateness_p99_ms_baseline": resp[0]["p99_ms"], "lateness_p99_ms_with_dashboard": resp[1]["p99_ms"]}
    return Measured(summary, [*redraw, st, *resp])


def kernel_main(rate: float, seconds: float, steps: int) -> None:
    """What `run_in_kernel` executes: `measure`, printed as one marked JSON line."""
    m = measure(rate, seconds, steps)
    print(MARKER + json.dumps({"summary": m.summary, "rows": m.rows}, default=float))


def run_in_kernel(rate: float, seconds: float, steps: int, timeout: float = 600.0) -> Measured:
    """Start a fresh python3 Jupyter kernel, run `kernel_main` there, and return what it measured."""
    from workbench.errors import WorkbenchError, require

    km = require("jupyter_client.manager", "notebook")
    code = (f"from workbench.bench.dashboard import kernel_main\n"
            f"kernel_main({float(rate)!r}, {float(seconds)!r}, {int(steps)!r})\n")
    manager, client = km.start_new_kernel(kernel_name="python3")
    lines: list[str] = []
    try:
        def keep(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                lines.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                lines.append("\n".join(msg["content"]["traceback"]))

        reply = client.execute_interactive(code, timeout=timeout, output_hook=keep)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    text = "".join(lines)
    found = [ln for ln in text.splitlines() if ln.startswith(MARKER)]
    if reply["content"]["status"] != "ok" or not found:
        raise WorkbenchError(f"bench dashboard: the kernel failed:\n{text[-3000:]}")
    out = json.loads(found[-1][len(MARKER):])
    return Measured(out["summary"], out["rows"])
