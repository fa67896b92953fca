"""Headless tests of the live Dashboard and the static result figures (no browser, no run).

Updates are synthetic but shaped like the runner's stream: Result-schema events with
`group` and `step`, memory samples per rank and category, link rows keyed by the
cluster's real link names.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly")
pytest.importorskip("ipywidgets")

from workbench.core.stream import RunHandle, Update  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.live import replay_updates  # noqa: E402
from workbench.result import Result  # noqa: E402
from workbench.topology import preset  # noqa: E402
from workbench.viz import results as vr  # noqa: E402
from workbench.widgets.dashboard import Dashboard  # noqa: E402

CLUSTER = preset("dgx-a100", nodes=1)
RANKS = 4


def _step_rows(step: int, t0: float, scale: float = 1.0) -> tuple[list[dict], list[dict], list[dict], float]:
    """One training step on RANKS ranks: forward/backward compute, an all-reduce, a send."""
    ev, mem, links = [], [], []
    t_end = t0
    for r in range(RANKS):
        dev = CLUSTER.gpus[r]
        fwd = 0.010 * scale * (1 + 0.1 * r)
        bwd = 0.020 * scale
        ar = 0.004 * scale * (1 + 0.5 * (step % 2))
        t = t0
        for op, kind, dur, nbytes in (("forward", "compute", fwd, 0), ("backward", "compute", bwd, 0),
                                      ("all_reduce", "collective", ar, 64 << 20),
                                      ("send", "transfer", 0.001 * scale, 1 << 20)):
            path = CLUSTER.path(dev, CLUSTER.gpus[(r + 1) % RANKS])
            ev.append({"rank": r, "device": dev, "kind": kind, "op": op, "bytes": nbytes,
                       "links": tuple(lk.name for lk in path.links) if nbytes else (),
                       "start": t, "end": t + dur, "group": "dp", "step": step})
            if nbytes:
                for lk in path.links:
                    gbps = nbytes / dur / 1e9
                    links.append({"link": lk.name, "start": t, "end": t + dur, "GBps": gbps,
                                  "utilisation": gbps / lk.GBps})
            t += dur
        t_end = max(t_end, t)
        for cat, b in (("weights", 2e9), ("grads", 2e9), ("optimizer", 8e9), ("activations", 1e9 * (1 + step))):
            mem.append({"rank": r, "category": cat, "bytes": b, "time": t})
    return ev, mem, links, t_end


def synthetic_updates(steps: int = 6, scale: float = 1.0) -> list[Update]:
    out, t = [], 0.0
    for s in range(steps):
        ev, mem, links, t = _step_rows(s, t, scale)
        out.append(Update(pd.DataFrame(ev), pd.DataFrame(mem), pd.DataFrame(links), s + 1, steps, (s + 1) / steps, t))
    return out


def synthetic_result(steps: int = 6, scale: float = 1.0, source: str = "run") -> Result:
    ups = synthetic_updates(steps, scale)
    return Result(events=pd.concat([u.events for u in ups], ignore_index=True),
                  memory=pd.concat([u.memory for u in ups], ignore_index=True),
                  links=pd.concat([u.links for u in ups], ignore_index=True),
                  metrics={"step_time_s": ups[-1].t / steps}, source=source,
                  fidelity="measured" if source == "run" else "closed-form")


def _points(fig) -> int:
    return sum(len(t.x) if t.x is not None else 0 for t in fig.data)


# ------------------------------------------------------------------ static figures
def test_static_figures_from_result():
    res = synthetic_result()
    pred = synthetic_result(steps=1, scale=0.8, source="sim")
    tl = vr.timeline_figure(res, prediction=pred)
    names = [t.name for t in tl.data]
    assert {"compute", "collective", "transfer"} <= set(names)
    assert "predicted compute" in names
    # 6 steps × 4 ranks × 2 compute events, 3 points per segment
    compute = next(t for t in tl.data if t.name == "compute")
    assert len(compute.x) == 6 * RANKS * 2 * 3
    # the single predicted step is tiled under all 6 measured steps
    pc = next(t for t in tl.data if t.name == "predicted compute")
    assert len(pc.x) == 6 * RANKS * 2 * 3
    assert np.nanmin(np.asarray(pc.y, float)) == pytest.approx(vr.PREDICTION_OFFSET)

    lb = vr.link_bandwidth_figure(res, top=3)
    assert len(lb.data) == 3 and all(len(t.x) > 1 for t in lb.data)

    mem = vr.memory_figure(res, cluster=CLUSTER)
    cats = {t.name for t in mem.data}
    assert {"weights", "grads", "optimizer", "activations", "capacity"} <= cats
    cap = next(t for t in mem.data if t.name == "capacity")
    assert list(cap.y) == [CLUSTER.gpu_spec("n0.g0").memory_GB] * RANKS
    act = next(t for t in mem.data if t.name == "activations")
    assert list(act.y) == [6.0] * RANKS  # peak is the last step: 1 GB × (1 + 5)

    lat = vr.latency_figure(res, prediction=pred)
    p50 = next(t for t in lat.data if t.name == "p50")
    assert set(p50.x) == {"forward", "backward", "all_reduce", "send"}
    ar = list(p50.x).index("all_reduce")
    p99 = next(t for t in lat.data if t.name == "p99")
    assert p99.y[ar] > p50.y[ar]  # all-reduce alternates 4 ms / 6 ms
    assert p99.y[ar] == pytest.approx(6.0, rel=0.02)


def test_latency_table_and_utilisation():
    res = synthetic_result(steps=4)
    tab = vr.latency_table(res.events).set_index("op")
    assert tab.loc["all_reduce", "count"] == 4 * RANKS
    assert tab.loc["all_reduce", "p50"] == pytest.approx(0.005)
    util = vr.link_utilisation(res.links)
    assert util and all(0 <= u <= 1 for u in util.values())
    assert set(util) <= {lk.name for lk in CLUSTER.graph.links}


def test_perfetto_export(tmp_path):
    import json

    res = synthetic_result(steps=2)
    trace = json.loads(res.to_perfetto(tmp_path / "t.json").read_text())["traceEvents"]
    assert sum(1 for e in trace if e["ph"] == "X") == len(res.events)


# ------------------------------------------------------------------ live dashboard
def test_push_updates_changes_traces():
    pred = synthetic_result(steps=1, scale=0.8, source="sim")
    dash = Dashboard(CLUSTER, prediction=pred, max_fps=1000)
    figs = dash.figures()
    assert set(figs) == {"topology", "links", "memory", "latency", "timeline"}
    before = {k: _points(f) for k, f in figs.items()}
    topo_before = [list(t.x or ()) for t in figs["topology"].data]
    ups = synthetic_updates(4)
    for u in ups[:2]:
        dash.push(u)
    dash.flush()
    mid = _points(figs["timeline"])
    for u in ups[2:]:
        dash.push(u)
    dash.flush()
    after = {k: _points(f) for k, f in figs.items()}
    assert after["timeline"] > mid > before["timeline"] == 0
    assert after["links"] > 0 and after["memory"] > 0 and after["latency"] > 0
    assert [list(t.x or ()) for t in figs["topology"].data] != topo_before  # links recoloured
    assert dash._bar.value == pytest.approx(1.0)
    assert "step 4/4" in dash._status.value
    # memory shows the latest sample: activations 1 GB × (1 + 3)
    act = next(t for t in figs["memory"].data if t.name == "activations")
    assert list(act.y) == [4.0] * RANKS
    # the predicted p50 markers appear next to the measured ones
    lat = figs["latency"].data
    assert lat[2].name == "predicted p50" and len(lat[2].x) == 4


def test_push_is_throttled():
    dash = Dashboard(None, max_fps=5)
    ups = synthetic_updates(40, scale=0.01)
    t0 = time.perf_counter()
    for u in ups:
        dash.push(u)
    elapsed = time.perf_counter() - t0
    assert dash.updates_pushed == 40
    assert dash.renders <= 1 + elapsed * 5 + 1
    dash.flush()
    assert sum(len(t.x) for t in dash.figures()["timeline"].data[:4]) == 40 * RANKS * 4 * 3


def test_replay_result():
    res = synthetic_result(steps=5)
    dash = Dashboard(CLUSTER, max_fps=1000)
    dash.replay(res, frames=7)
    assert dash.updates_pushed == 7
    assert _points(dash.figures()["timeline"]) == len(res.events) * 3
    assert dash._bar.value == pytest.approx(1.0)
    assert "step 5/5" in dash._status.value
    ups = list(replay_updates(res, 7))
    assert sum(len(u.events) for u in ups) == len(res.events)
    assert sum(len(u.links) for u in ups) == len(res.links)
    assert [u.step for u in ups] == sorted(u.step for u in ups)


def test_replay_in_background_then_wait():
    res = synthetic_result(steps=3)
    dash = Dashboard(None, max_fps=20)
    dash.replay(res, frames=10, fps=50, block=False)
    assert dash.wait(timeout=30) is None
    assert _points(dash.figures()["timeline"]) == len(res.events) * 3


def _feed(handle: RunHandle, ups: list[Update], dt: float, fail: bool = False) -> None:
    from workbench.runner.errors import RunFailed

    for u in ups:
        time.sleep(dt)
        handle._emit(u)
    if fail:
        handle._finish(error=RunFailed(1, "synthetic failure"))
    else:
        handle._finish(result=synthetic_result(steps=len(ups)))


def test_attach_follows_a_stream_at_10_updates_per_second():
    ups = synthetic_updates(40, scale=0.01)
    handle = RunHandle(steps=40)
    dash = Dashboard(CLUSTER, prediction=synthetic_result(1, 0.008, "sim"), max_fps=10)
    dash.attach(handle)
    feeder = threading.Thread(target=_feed, args=(handle, ups, 0.025), daemon=True)
    feeder.start()
    seen = []
    for _ in range(300):  # the render thread redraws while updates stream
        seen.append(_points(dash.figures()["timeline"]))
        if handle.done:
            break
        time.sleep(0.01)
    result = dash.wait(timeout=30)
    assert isinstance(result, Result)
    assert len(set(seen)) > 2, "the timeline should have been redrawn several times during the stream"
    assert sum(len(t.x) for t in dash.figures()["timeline"].data[:4]) == 40 * RANKS * 4 * 3
    assert dash.updates_pushed == 40
    assert dash.renders <= 40 / (0.025 * 10) + 2  # at most max_fps=10 redraws a second, plus the last
    assert dash.stats()["mean_render_ms"] > 0  # how fast: `workbench bench dashboard` (a benchmark, not a test)


def test_attach_reports_run_failure():
    from workbench.runner.errors import RunFailed

    handle = RunHandle(steps=3)
    dash = Dashboard(None).attach(handle)
    threading.Thread(target=_feed, args=(handle, synthetic_updates(2), 0.01, True), daemon=True).start()
    with pytest.raises(RunFailed, match="rank 1"):
        dash.wait(timeout=30)
    assert dash._bar.bar_style == "danger"
    assert "error" in dash._status.value


def test_wait_times_out_on_a_stuck_stream():
    handle = RunHandle(steps=3)
    dash = Dashboard(None).attach(handle, timeout=0.3)
    with pytest.raises(TimeoutError):
        dash.wait(timeout=10)


def test_bad_arguments_name_the_field():
    with pytest.raises(WorkbenchError, match="max_fps"):
        Dashboard(None, max_fps=0)
    with pytest.raises(WorkbenchError, match="frames"):
        Dashboard(None).replay(synthetic_result(1), frames=0)


def _sim_like(prediction: Result) -> Result:
    """A prediction shaped like simulate_train's: one step, rank 0 only, no `step` column."""
    ev = prediction.events
    ev = ev[(ev["rank"] == 0) & (ev["step"] == 0)].drop(columns=["step"])
    return Result(events=ev, metrics=prediction.metrics, source="sim")


def test_one_rank_one_step_prediction_is_drawn_under_every_rank_and_step():
    measured = synthetic_result(steps=3)
    pred = _sim_like(synthetic_result(steps=1, scale=0.8, source="sim"))
    aligned = vr.align_prediction(pred.events, measured.events)
    assert sorted(aligned["rank"].unique()) == list(range(RANKS))
    assert len(aligned) == len(pred.events) * RANKS * 3
    m0 = measured.events.groupby("step")["start"].min()
    assert aligned.groupby("step")["start"].min().to_dict() == pytest.approx(m0.to_dict())
    dash = Dashboard(CLUSTER, prediction=pred, max_fps=1000)
    for u in synthetic_updates(3):
        dash.push(u)
    dash.flush()
    pc = next(t for t in dash.figures()["timeline"].data if t.name == "predicted compute")
    assert len(pc.x) == 2 * 3 * RANKS * 3  # 2 compute events × 3 points × 4 ranks × 3 steps
    assert set(np.unique(np.asarray(pc.y, float)[~np.isnan(np.asarray(pc.y, float))])) == {
        r + vr.PREDICTION_OFFSET for r in range(RANKS)}
    assert np.nanmin(np.asarray(pc.x, float)) == pytest.approx(0.0)
    # the same, statically
    fig = vr.timeline_figure(measured, pred)
    pcs = next(t for t in fig.data if t.name == "predicted compute")
    assert len(pcs.x) == 2 * 3 * RANKS * 3


def test_memory_far_below_capacity_uses_a_readable_axis():
    res = synthetic_result(steps=2)
    res.memory["bytes"] = res.memory["bytes"] / 1e4  # MB-sized, as a tiny CPU run reports
    fig = vr.memory_figure(res, cluster=CLUSTER)
    assert fig.layout.yaxis.title.text.startswith("MB (capacity 40 GB, off scale)")
    top = sum(t.y[0] for t in fig.data if t.type == "bar")
    assert fig.layout.yaxis.range[1] == pytest.approx(1.15 * top)
    dash = Dashboard(CLUSTER, max_fps=1000)
    dash.replay(res, frames=2)
    assert dash.figures()["memory"].layout.yaxis.title.text.startswith("MB (capacity")


def test_a_prediction_slower_than_the_run_is_laid_end_to_end():
    measured = synthetic_result(steps=3)
    slow = _sim_like(synthetic_result(steps=1, scale=2.0, source="sim"))  # twice the measured step
    aligned = vr.align_prediction(slow.events, measured.events)
    length = float(slow.events["end"].max() - slow.events["start"].min())
    starts = aligned.groupby("step")["start"].min().to_numpy()
    assert np.diff(starts) == pytest.approx([length, length])  # end to end, no pile-up
    fast = _sim_like(synthetic_result(steps=1, scale=0.5, source="sim"))
    starts = vr.align_prediction(fast.events, measured.events).groupby("step")["start"].min()
    assert starts.to_numpy() == pytest.approx(measured.events.groupby("step")["start"].min().to_numpy())
    dash = Dashboard(None, prediction=slow, max_fps=1000)
    dash.replay(measured, frames=3)
    pc = next(t for t in dash.figures()["timeline"].data if t.name == "predicted compute")
    last_compute_end = float(slow.events.loc[slow.events["kind"] == "compute", "end"].max())
    assert np.nanmax(np.asarray(pc.x, float)) == pytest.approx(2 * length + last_compute_end, rel=1e-6)


def test_replay_a_simulated_result_without_steps():
    sim = _sim_like(synthetic_result(steps=1, source="sim"))
    assert "step" not in sim.events
    dash = Dashboard(CLUSTER, prediction=sim, max_fps=1000)
    dash.replay(sim, frames=4)
    tl = dash.figures()["timeline"].data
    assert sum(len(t.x) for t in tl[:4]) == len(sim.events) * 3
    # no measured steps: the prediction is drawn as it is, from time 0, under rank 0
    pc = next(t for t in tl if t.name == "predicted compute")
    assert np.nanmin(np.asarray(pc.x, float)) == pytest.approx(float(sim.events["start"].min()))
    assert "step 4/4" in dash._status.value


def test_the_live_data_model_needs_no_widget_plotting_or_runner_module() -> None:
    import subprocess
    import sys

    code = ("import sys, workbench.live\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('plotly', 'ipywidgets', 'torch')"
            " or m.startswith(('workbench.runner', 'workbench.widgets', 'workbench.viz', 'workbench.sim')))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
