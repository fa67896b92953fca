"""The live dashboard: plotly FigureWidgets that update in place while a run streams telemetry.

```python
dash = Dashboard(cluster, prediction=simulated)   # display it: `dash` as a cell's last line
dash.attach(start_train(cluster, model, plan))    # consumes the stream in background threads
measured = dash.wait()                            # CI notebooks: block until the run ended
dash.replay(measured)                             # or: play a finished Result
```

Panels: the topology with links coloured by current utilisation, GB/s per link over time,
memory per rank stacked by category against capacity, p50/p99 latency per op, a
timeline per rank with the prediction overlaid, and a progress bar.

How it stays smooth (REFERENCE §5): `push()` only appends to buffers under a lock; a
render thread redraws at most `max_fps` times a second (slower when a redraw itself takes
long, so the kernel keeps most of its time), mutating the displayed traces inside
`batch_update()` with numpy arrays (sent as binary). Threads only set widget traits; nothing
here uses `with Output()`. Because nbclient moves on when the kernel goes idle, a notebook
that must see the end calls `wait()`.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError, require
from workbench.result import Result, events_frame, links_frame, memory_frame
from workbench.viz import results as vr

if TYPE_CHECKING:
    from workbench.run.stream import RunHandle, Update
    from workbench.topology.model import Cluster

PANELS = ("topology", "links", "memory", "latency", "timeline")


class Dashboard:
    """Live view of a run (or a replayed Result); display it, then `attach`, `push` or `replay`.

    `cluster` gives the topology panel and memory capacities (both optional); `prediction`
    is the simulated Result to overlay; `max_fps` bounds redraws per second; `top_links`
    how many links the bandwidth panel shows; `max_events` how many recent events the
    timeline keeps drawn; `window` the seconds of run time over which the topology averages
    each link's utilisation.
    """

    def __init__(self, cluster: Cluster | None = None, prediction: Result | None = None, *,
                 max_fps: float = 10.0, top_links: int = 6, max_events: int = 4000,
                 window: float = 0.5, title: str = "workbench · live run") -> None:
        if max_fps <= 0:
            raise WorkbenchError(f"max_fps: must be positive, got {max_fps} (e.g. 10 redraws per second)")
        if top_links < 1:
            raise WorkbenchError(f"top_links: must be at least 1, got {top_links}")
        self._go = require("plotly.graph_objects", "notebook")
        self._w = require("ipywidgets", "notebook")
        self.cluster = cluster
        self.prediction = prediction
        self.max_fps = float(max_fps)
        self.top_links = int(top_links)
        self.max_events = int(max_events)
        self.window = float(window)
        self.title = title

        self._lock = threading.RLock()
        self._render_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._handle: RunHandle | None = None
        self.error: BaseException | None = None
        self.result: Result | None = None
        self.renders = 0
        self.render_seconds = 0.0
        self.updates_pushed = 0
        self._reset_data()
        self._build()

    # ------------------------------------------------------------------ public API
    @property
    def widget(self) -> Any:
        """The ipywidgets box holding every panel (what a notebook displays)."""
        return self._box

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self._box._repr_mimebundle_(**kwargs)

    def push(self, update: Update) -> None:
        """Add one telemetry update; redraws now if the last redraw is older than 1/max_fps
        and no render thread is running (with `attach`, the render thread redraws)."""
        with self._lock:
            self._pending_events.append(update.events)
            self._pending_memory.append(update.memory)
            self._pending_links.append(update.links)
            self._step, self._steps = int(update.step), int(update.steps)
            self._progress, self._t = float(update.progress), float(update.t)
            self.updates_pushed += 1
            self._dirty = True
        if not self._render_thread_alive() and time.perf_counter() - self._last_render >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Redraw now with everything pushed so far."""
        with self._render_lock:
            t0 = time.perf_counter()
            self._render()
            self._last_render = time.perf_counter()
            self.renders += 1
            self.render_seconds += self._last_render - t0

    @property
    def interval(self) -> float:
        """Seconds between redraws: 1/max_fps, or twice the mean redraw time if that is longer."""
        mean = self.render_seconds / self.renders if self.renders else 0.0
        return max(1.0 / self.max_fps, 2.0 * mean)

    def attach(self, handle: RunHandle, timeout: float | None = 120.0) -> Dashboard:
        """Follow a running job: a thread consumes `handle.updates()`, another redraws.

        `timeout` bounds the wait for each next update (the run is reported stuck after it).
        Returns self, so `dash.attach(handle)` as a cell's last line shows the dashboard.
        """
        if self._threads_alive():
            raise WorkbenchError("attach: this dashboard is still following a run (call wait() first)")
        self._reset_data()
        self._handle = handle
        self._stop.clear()
        self.error = None
        self.result = None
        consumer = threading.Thread(target=self._consume, args=(handle, timeout), name="wb-dash-consume", daemon=True)
        render = threading.Thread(target=self._render_loop, args=(consumer,), name="wb-dash-render", daemon=True)
        self._threads = [consumer, render]
        consumer.start()
        render.start()
        return self

    def wait(self, timeout: float | None = 600.0) -> Result | None:
        """Block until the attached run (or a background replay) ended and the last frame is drawn.

        Returns the run's measured Result (None for a replay); re-raises the run's error
        (e.g. `RunFailed`). A `TimeoutError` after `timeout` seconds leaves the threads running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._threads):
            t.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            if t.is_alive():
                raise TimeoutError(f"wait: the run was still streaming after {timeout} s (dashboard keeps following it)")
        self.flush()
        if self.error is not None:
            raise self.error
        if self._handle is not None and self.result is None:
            self.result = self._handle.wait(timeout=0 if timeout is not None else None)
        return self.result

    def stop(self) -> None:
        """Stop following (the run itself goes on; cancel it through its handle)."""
        self._stop.set()

    def replay(self, result: Result, frames: int = 30, fps: float | None = None, block: bool = True) -> Dashboard:
        """Play a finished Result as `frames` updates (paced at `fps` when given; in a thread when not `block`)."""
        if frames < 1:
            raise WorkbenchError(f"frames: must be at least 1, got {frames}")
        if self._threads_alive():
            raise WorkbenchError("replay: this dashboard is still following a run (call wait() first)")
        updates = list(replay_updates(result, frames))
        self._reset_data()
        self._handle = None
        self.error = None
        self.result = None
        self._stop.clear()

        def play() -> None:
            for u in updates:
                if self._stop.is_set():
                    break
                self.push(u)
                if fps:
                    time.sleep(1.0 / fps)

        if block:
            play()
            self.flush()
            self.result = result
            return self
        player = threading.Thread(target=self._guard(play), name="wb-dash-replay", daemon=True)
        render = threading.Thread(target=self._render_loop, args=(player,), name="wb-dash-render", daemon=True)
        self._threads = [player, render]
        player.start()
        render.start()
        return self

    def figures(self) -> dict[str, Any]:
        """The FigureWidgets by panel name (`topology` only when a cluster was given)."""
        return dict(self._figs)

    def stats(self) -> dict[str, float]:
        """Updates pushed, redraws, mean redraw milliseconds."""
        return {"updates": self.updates_pushed, "renders": self.renders,
                "mean_render_ms": 1e3 * self.render_seconds / self.renders if self.renders else 0.0}

    # ------------------------------------------------------------------ threads
    def _consume(self, handle: RunHandle, timeout: float | None) -> None:
        try:
            for u in handle.updates(timeout=timeout):
                self.push(u)
                if self._stop.is_set():
                    return
            self.result = handle.wait(timeout=timeout)
        except BaseException as exc:  # shown in the status line, re-raised by wait()
            self.error = exc

    def _guard(self, fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self.error = exc
        return run

    def _render_loop(self, source: threading.Thread) -> None:
        try:
            while source.is_alive() and not self._stop.is_set():
                time.sleep(max(self.interval - (time.perf_counter() - self._last_render), 0.01))
                if self._dirty:
                    self.flush()
            self.flush()
        except BaseException as exc:
            self.error = exc

    def _render_thread_alive(self) -> bool:
        return any(t.name == "wb-dash-render" and t.is_alive() for t in self._threads)

    def _threads_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # ------------------------------------------------------------------ data
    def _reset_data(self) -> None:
        with self._lock:
            self._events = events_frame()
            self._memory = memory_frame()
            self._links = links_frame()
            self._pending_events: list[pd.DataFrame] = []
            self._pending_memory: list[pd.DataFrame] = []
            self._pending_links: list[pd.DataFrame] = []
            self._step = self._steps = 0
            self._progress = self._t = 0.0
            self._dirty = False
            self._last_render = 0.0
            self.updates_pushed = 0

    def _take(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        with self._lock:
            self._events = _concat(self._events, self._pending_events)
            if self._pending_memory:  # only the latest sample per (rank, category) is kept and drawn
                mem = _concat(self._memory, self._pending_memory)
                self._memory = mem.sort_values("time", kind="stable").drop_duplicates(
                    ["rank", "category"], keep="last").reset_index(drop=True)
            self._links = _concat(self._links, self._pending_links)
            self._pending_events, self._pending_memory, self._pending_links = [], [], []
            self._dirty = False
            return self._events, self._memory, self._links

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        go, w = self._go, self._w
        self._figs: dict[str, Any] = {}
        if self.cluster is not None:
            self._figs["topology"] = go.FigureWidget(_topology_figure(self.cluster))
        links = go.FigureWidget(layout=vr.link_layout("Link bandwidth"))
        for i in range(self.top_links):
            links.add_trace(go.Scatter(x=np.empty(0), y=np.empty(0), name=f"link {i}", mode="lines",
                                       line={"shape": "hv"}, visible=False))
        self._figs["links"] = links
        self._figs["memory"] = go.FigureWidget(layout=vr.memory_layout("Memory per rank (now)"))
        self._memory_traces: dict[str, int] = {}
        self._figs["memory"].add_trace(vr.capacity_trace(go, [], np.empty(0)))
        lat = go.FigureWidget(layout=vr.latency_layout("Latency per op"))
        lat.add_trace(go.Bar(x=[], y=np.empty(0), name="p50", marker_color="#4C78A8"))
        lat.add_trace(go.Bar(x=[], y=np.empty(0), name="p99", marker_color="#E45756"))
        if self.prediction is not None:
            lat.add_trace(vr.predicted_latency_trace(go, [], np.empty(0)))
        self._figs["latency"] = lat
        tl = go.FigureWidget(layout=vr.timeline_layout([], self.prediction is not None, "Timeline per rank"))
        for kind in vr.TIMELINE_KINDS:
            tl.add_trace(vr.timeline_trace(go, kind, np.empty(0), np.empty(0), np.empty(0, str), predicted=False))
        if self.prediction is not None:
            for kind in vr.TIMELINE_KINDS:
                tl.add_trace(vr.timeline_trace(go, kind, np.empty(0), np.empty(0), np.empty(0, str), predicted=True))
        self._figs["timeline"] = tl

        self._bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress",
                                    layout=w.Layout(width="50%"))
        self._status = w.HTML(value=self._status_html())
        header = w.HBox([self._bar, self._status])
        half = w.Layout(width="50%")
        for name in ("topology", "links", "memory", "latency"):
            if name in self._figs:
                self._figs[name].layout.autosize = True
        top = [self._figs[n] for n in ("topology", "links") if n in self._figs]
        rows = [w.HTML(f"<b>{html.escape(self.title)}</b>"), header]
        rows.append(w.HBox([w.Box([f], layout=half) for f in top]) if len(top) == 2 else top[0])
        rows.append(w.HBox([w.Box([self._figs["memory"]], layout=half), w.Box([self._figs["latency"]], layout=half)]))
        rows.append(self._figs["timeline"])
        self._box = w.VBox(rows)

    def _render(self) -> None:
        events, memory, links = self._take()
        with self._lock:
            step, steps, progress, t = self._step, self._steps, self._progress, self._t
        self._render_timeline(events)
        self._render_links(links)
        self._render_memory(memory, events)
        self._render_latency(events)
        if "topology" in self._figs:
            util = vr.link_utilisation(links, window=self.window) if len(links) else {}
            _recolour_topology(self._figs["topology"], util)
        self._bar.value = min(max(progress, 0.0), 1.0)
        self._bar.bar_style = "danger" if self.error else ("success" if progress >= 1.0 else "info")
        self._status.value = self._status_html(step, steps, t, len(events))

    def _render_timeline(self, events: pd.DataFrame) -> None:
        fig = self._figs["timeline"]
        shown = events.nlargest(self.max_events, "end") if len(events) > self.max_events else events
        ranks = sorted(set(events["rank"].dropna().astype(int))) if len(events) else []
        arrays = [vr.timeline_arrays(shown, k) for k in vr.TIMELINE_KINDS]
        if self.prediction is not None:
            arrays += self._prediction_arrays(events)
        with fig.batch_update():
            for trace, (x, y, text) in zip(fig.data, arrays):
                trace.x, trace.y, trace.text = x, y, text
            fig.layout.yaxis.update(vr.rank_axis(ranks, self.prediction is not None))
            fig.layout.height = vr.timeline_layout(ranks, self.prediction is not None, "")["height"]

    def _prediction_arrays(self, events: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Timeline segments of the prediction aligned to the measured steps so far (cached per step starts)."""
        assert self.prediction is not None
        starts = events.groupby("step")["start"].min() if len(events) and "step" in events else pd.Series(dtype=float)
        key = tuple(starts.items()) if len(starts) else (len(events),)
        if getattr(self, "_pred_key", None) != key:
            pred = vr.align_prediction(self.prediction.events, events) if len(events) else self.prediction.events.iloc[:0]
            if len(pred) > self.max_events:
                pred = pred.nlargest(self.max_events, "end")
            self._pred_arrays = [vr.timeline_arrays(pred, k, vr.PREDICTION_OFFSET) for k in vr.TIMELINE_KINDS]
            self._pred_key = key
        return self._pred_arrays

    def _render_links(self, links: pd.DataFrame) -> None:
        fig = self._figs["links"]
        top = vr.busiest_links(links, self.top_links)
        with fig.batch_update():
            for i, trace in enumerate(fig.data):
                if i < len(top):
                    x, y = vr.link_arrays(links, top[i])
                    trace.x, trace.y, trace.name, trace.visible = x, y, top[i], True
                else:
                    trace.x, trace.y, trace.visible = np.empty(0), np.empty(0), False

    def _render_memory(self, memory: pd.DataFrame, events: pd.DataFrame) -> None:
        fig = self._figs["memory"]
        snap = vr.memory_snapshot(memory, "latest")
        if snap.empty:
            return
        ranks = sorted(snap["rank"].unique().tolist())
        for cat in sorted(snap["category"].unique().tolist()):
            if cat not in self._memory_traces:
                color = vr.CATEGORY_COLORS[len(self._memory_traces) % len(vr.CATEGORY_COLORS)]
                fig.add_trace(self._go.Bar(x=[], y=np.empty(0), name=cat, marker_color=color))
                self._memory_traces[cat] = len(fig.data) - 1
        labels = [f"rank {r}" for r in ranks]
        caps = vr.rank_capacity(self.cluster, ranks, vr.rank_devices(events))
        with fig.batch_update():
            for cat, i in self._memory_traces.items():
                fig.data[i].x, fig.data[i].y = labels, vr.memory_values(snap, cat, ranks) / vr.GB
            fig.data[0].x, fig.data[0].y = labels, caps / vr.GB

    def _render_latency(self, events: pd.DataFrame) -> None:
        fig = self._figs["latency"]
        tab = vr.latency_table(events)
        ops = tab["op"].tolist()
        with fig.batch_update():
            fig.data[0].x, fig.data[0].y = ops, tab["p50"].to_numpy(float) * 1e3
            fig.data[1].x, fig.data[1].y = ops, tab["p99"].to_numpy(float) * 1e3
            if self.prediction is not None:
                pred = self._predicted_p50()
                have = [op for op in ops if op in pred]
                fig.data[2].x, fig.data[2].y = have, np.array([pred[op] for op in have]) * 1e3

    def _predicted_p50(self) -> dict[str, float]:
        if not hasattr(self, "_pred_p50"):
            assert self.prediction is not None
            tab = vr.latency_table(self.prediction.events)
            self._pred_p50 = dict(zip(tab["op"], tab["p50"].astype(float)))
        return self._pred_p50

    def _status_html(self, step: int = 0, steps: int = 0, t: float = 0.0, events: int = 0) -> str:
        if self.error is not None:
            return f"<span style='color:#c00'>error: {html.escape(str(self.error).splitlines()[0])}</span>"
        rate = self.renders / self.render_seconds if self.render_seconds else 0.0
        return (f"<span style='font-family:monospace'>step {step}/{steps} · {t:.1f} s · {events} events · "
                f"{self.updates_pushed} updates · redraw ≤ {min(self.max_fps, rate or self.max_fps):.0f}/s</span>")

    def __repr__(self) -> str:
        return f"Dashboard(panels={list(self._figs)}, {self.updates_pushed} updates, {self.renders} redraws)"


def _concat(base: pd.DataFrame, parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    parts = [p for p in parts if p is not None and len(p)]
    if not parts:
        return base
    frames = [base, *parts] if len(base) else parts
    return pd.concat(frames, ignore_index=True)


def replay_updates(result: Result, frames: int = 30) -> Iterable[Update]:
    """A finished Result cut into `frames` Updates by time (rows land in the frame in which they end)."""
    from workbench.run.stream import Update

    ev, mem, links = result.events, result.memory, result.links
    ends = [s for s in (ev["end"], mem["time"], links["end"]) if len(s)]
    t_end = float(max(s.max() for s in ends)) if ends else 0.0
    t_start = float(min(ev["start"].min() if len(ev) else 0.0, 0.0))
    has_steps = "step" in ev and len(ev) > 0 and bool(ev["step"].notna().any())
    step_end = ev.groupby("step")["end"].max() if has_steps else pd.Series(dtype=float)
    steps = len(step_end) if has_steps else frames
    edges = np.linspace(t_start, t_end, frames + 1)
    edges[0] = -np.inf
    for i in range(frames):
        lo, hi = edges[i], edges[i + 1]
        e = ev[(ev["end"] > lo) & (ev["end"] <= hi)]
        step = int((step_end <= hi).sum()) if has_steps else i + 1
        yield Update(
            events=e, memory=mem[(mem["time"] > lo) & (mem["time"] <= hi)],
            links=links[(links["end"] > lo) & (links["end"] <= hi)],
            step=step, steps=steps, progress=(i + 1) / frames, t=float(hi),
        )


def _topology_figure(cluster: Cluster) -> Any:
    from workbench.viz.topology import topology_figure

    return topology_figure(cluster, height=380)


def _recolour_topology(fig: Any, utilisation: dict[str, float]) -> None:
    from workbench.viz.topology import link_colour_update

    link_colour_update(fig, utilisation)
