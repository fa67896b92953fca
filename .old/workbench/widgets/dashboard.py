"""The live dashboard: plotly FigureWidgets that update in place while a run streams telemetry.

```python
dash = Dashboard(cluster, prediction=simulated)   # display it: `dash` as a cell's last line
dash.attach(start_train(cluster, model, plan))    # consumes the stream in background threads
measured = dash.wait()                            # CI notebooks: block until the run ended
dash.replay(measured)                             # or: play a finished Result
```

Panels: the topology with links coloured by current utilisation, GB/s per link over time,
memory per rank stacked by category against capacity, p50/p99 latency per op, a
timeline per rank with the prediction overlaid, and a progress bar. A serving job
(`kind="serving"`, or a serving prediction) gets the serving panels instead
(`workbench.widgets.serving`): latency per request, throughput, KV cache per worker, KV
transfers per link, each with the prediction laid over it, and a measured-vs-predicted table.

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
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError, require
from workbench.live import LiveData, ServingLiveData, replay_updates
from workbench.result import Result
from workbench.viz import results as vr
from workbench.viz.topology import UTIL_EDGES

if TYPE_CHECKING:
    from workbench.core.stream import RunHandle, Update
    from workbench.topology.model import Cluster

__all__ = ["PANELS", "Dashboard", "LiveData", "replay_updates"]

PANELS = ("topology", "links", "memory", "latency", "timeline")


class Dashboard:
    """Live view of a run (or a replayed Result); display it, then `attach`, `push` or `replay`.

    `cluster` gives the topology panel and memory capacities (both optional); `prediction`
    is the simulated Result to overlay; `max_fps` bounds redraws per second; `top_links`
    how many links the bandwidth panel shows; `max_events` how many recent events the
    timeline keeps drawn; `window` the seconds of run time over which the topology averages
    each link's utilisation; `width` the dashboard's width in pixels (two panels per row);
    `panels_per_redraw` how many changed panels one redraw sends to the browser (least recently
    drawn first; None: all), which bounds the browser's work per redraw. `kind` is "training" or
    "serving" (None: the prediction's job kind, else training).
    """

    def __init__(self, cluster: Cluster | None = None, prediction: Result | None = None, *,
                 max_fps: float = 4.0, top_links: int = 6, max_events: int = 4000,
                 window: float = 0.5, width: int = 1100, panels_per_redraw: int | None = None,
                 title: str = "workbench · live run", kind: str | None = None) -> None:
        if max_fps <= 0:
            raise WorkbenchError(f"max_fps: must be positive, got {max_fps} (e.g. 10 redraws per second)")
        if top_links < 1:
            raise WorkbenchError(f"top_links: must be at least 1, got {top_links}")
        kind = kind or _kind_of(prediction)
        if kind not in ("training", "serving"):
            raise WorkbenchError(f"kind: {kind!r} is not a dashboard kind (use 'training' or 'serving')")
        self.kind = kind
        self._go = require("plotly.graph_objects", "notebook")
        self._w = require("ipywidgets", "notebook")
        self.cluster = cluster
        self.prediction = prediction
        self.max_fps = float(max_fps)
        self.top_links = int(top_links)
        self.max_events = int(max_events)
        self.window = float(window)
        self.width = int(width)
        if panels_per_redraw is not None and panels_per_redraw < 1:
            raise WorkbenchError(f"panels_per_redraw: must be at least 1 (or None for all), got {panels_per_redraw}")
        self.panels_per_redraw = panels_per_redraw
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
        self._recent: deque[float] = deque(maxlen=5)
        self.updates_pushed = 0
        self._reset_data()
        self._build()

    # ------------------------------------------------------------------ public API
    @property
    def widget(self) -> Any:
        """The ipywidgets box holding every panel (what a notebook displays)."""
        return self._box

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self._box._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):  # a front end without widgets (nbmake, a console) shows this text
            data["text/plain"] = self.text()
        return bundle

    def text(self) -> str:
        """What the dashboard shows, as plain text: the status line (and, serving, the measured-vs-predicted table)."""
        with self._render_lock:
            data = self._take(redrawing=False)
        with self._lock:
            step, steps, t = self._step, self._steps, self._t
        line = f"{self.title}: {self._unit} {step}/{steps} · {t:.1f} s · {self.updates_pushed} updates"
        if self.kind == "serving":
            from workbench.widgets.serving import summary_text

            return line + "\n" + summary_text(data)
        return line

    def summary(self) -> pd.DataFrame:
        """Serving: the measured-so-far metrics beside the prediction (`ServingLiveData.summary`);
        training: p50/p99 seconds per op measured so far."""
        with self._render_lock:
            data = self._take(redrawing=False)
        if isinstance(data, ServingLiveData):
            return data.summary()
        ops, p50, p99 = data.latency()
        return pd.DataFrame({"op": ops, "p50": p50, "p99": p99}).set_index("op")

    def push(self, update: Update) -> None:
        """Add one telemetry update; redraws now if the last redraw is older than 1/max_fps
        and no render thread is running (with `attach`, the render thread redraws)."""
        with self._lock:
            self._pending.append((update.events, update.memory, update.links))
            self._step, self._steps = int(update.step), int(update.steps)
            self._progress, self._t = float(update.progress), float(update.t)
            self.updates_pushed += 1
            self._dirty = True
        if not self._render_thread_alive() and time.perf_counter() - self._last_render >= self.interval:
            self.flush(self.panels_per_redraw)

    def flush(self, budget: int | None = None) -> None:
        """Redraw now with everything pushed so far (at most `budget` changed panels; None: all)."""
        with self._render_lock:
            t0 = time.perf_counter()
            self._render(budget)
            self._last_render = time.perf_counter()
            self.renders += 1
            self.render_seconds += self._last_render - t0
            self._recent.append(self._last_render - t0)

    @property
    def interval(self) -> float:
        """Seconds between redraws: 1/max_fps, or twice the median of the last 5 redraws if that is longer
        (a median, so the first redraw's one-time costs do not slow the rest)."""
        recent = sorted(self._recent)
        return max(1.0 / self.max_fps, 2.0 * recent[len(recent) // 2]) if recent else 1.0 / self.max_fps

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
                    self.flush(self.panels_per_redraw)
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
            self._data: Any = (ServingLiveData(self.prediction, self.max_events) if self.kind == "serving"
                               else LiveData(self.prediction, self.max_events))
            self._drawn: dict[str, Any] = {}
            self._drawn_at: dict[str, float] = {}
            self._pending: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = []
            self._step = self._steps = 0
            self._progress = self._t = 0.0
            self._dirty = False
            self._last_render = 0.0
            self.updates_pushed = 0

    def _take(self, redrawing: bool = True) -> Any:
        """Add the pending updates to the data (`redrawing`: the caller draws them, so the render thread need not)."""
        with self._lock:
            pending, self._pending = self._pending, []
            if redrawing:
                self._dirty = False
        for events, memory, links in pending:  # outside the lock: push() never waits for this
            self._data.add(events, memory, links)
        return self._data

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        go, w = self._go, self._w
        self._figs: dict[str, Any] = {}
        self._unit = "requests" if self.kind == "serving" else "step"
        self._bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="progress",
                                    layout=w.Layout(width="50%"))
        self._status = w.HTML(value=self._status_html())
        if self.kind == "serving":
            from workbench.widgets.serving import ServingPanels

            self._serving = ServingPanels(go, w, self.width, self._data)  # the prediction shows before the run
            self._figs.update(self._serving.figs)
            self._box = w.VBox([w.HTML(f"<b>{html.escape(self.title)}</b>"), w.HBox([self._bar, self._status]),
                                *self._serving.rows])
            return
        if self.cluster is not None:
            self._figs["topology"] = go.FigureWidget(_topology_figure(self.cluster))
        links = go.FigureWidget(layout=vr.link_layout("Link bandwidth"))
        for i in range(self.top_links):
            links.add_trace(go.Scatter(x=np.empty(0), y=np.empty(0), name=f"link {i}", mode="lines",
                                       line={"shape": "hv"}, visible=False))
        self._figs["links"] = links
        self._figs["memory"] = go.FigureWidget(layout=vr.memory_layout("Memory per rank (now)"))
        self._memory_traces: dict[str, int] = {}
        self._ranks_drawn: list[int] = []
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

        header = w.HBox([self._bar, self._status])
        half = self.width // 2 - 8
        for name in ("topology", "links", "memory", "latency"):
            if name in self._figs:
                self._figs[name].layout.width = half
        self._figs["timeline"].layout.width = self.width
        top = [self._figs[n] for n in ("topology", "links") if n in self._figs]
        rows = [w.HTML(f"<b>{html.escape(self.title)}</b>"), header, w.HBox(top),
                w.HBox([self._figs["memory"], self._figs["latency"]]), self._figs["timeline"]]
        self._box = w.VBox(rows)

    def _render(self, budget: int | None = None) -> None:
        data = self._take()
        with self._lock:
            step, steps, progress, t = self._step, self._steps, self._progress, self._t
        if self.kind == "serving":
            if self._serving.render(data, budget):
                with self._lock:
                    self._dirty = True
            self._show_status(progress, step, steps, t, data.n_events)
            return
        # A panel is sent to the browser only when its data changed, and at most `budget` panels
        # per redraw (least recently drawn first): every restyle costs the frontend a full plotly
        # redraw, and a slow browser falls behind long before the kernel does.
        v = data.versions
        keys: dict[str, Any] = {"timeline": v["events"], "latency": v["events"], "links": v["links"],
                                "memory": v["memory"]}
        if "topology" in self._figs:
            util = data.utilisation(self.window)
            keys["topology"] = tuple(sorted((k, sum(1 for e in UTIL_EDGES if u >= e)) for k, u in util.items()))
        changed = sorted((p for p in keys if keys[p] != self._drawn.get(p)), key=lambda p: self._drawn_at.get(p, 0.0))
        draw = {"timeline": self._render_timeline, "latency": self._render_latency, "links": self._render_links,
                "memory": self._render_memory, "topology": lambda d: _recolour_topology(self._figs["topology"], util)}
        for panel in changed[:budget]:
            draw[panel](data)
            self._drawn[panel], self._drawn_at[panel] = keys[panel], time.perf_counter()
        if budget is not None and len(changed) > budget:
            with self._lock:
                self._dirty = True  # the rest on the next redraw
        self._show_status(progress, step, steps, t, data.n_events)

    def _show_status(self, progress: float, step: int, steps: int, t: float, events: int) -> None:
        self._bar.value = min(max(progress, 0.0), 1.0)
        self._bar.bar_style = "danger" if self.error else ("success" if progress >= 1.0 else "info")
        self._status.value = self._status_html(step, steps, t, events)

    def _render_timeline(self, data: LiveData) -> None:
        fig = self._figs["timeline"]
        arrays = data.timeline()
        if self.prediction is not None:
            arrays += data.predicted_timeline()
        ranks = sorted(data.devices)
        with fig.batch_update():
            for trace, (x, y, text) in zip(fig.data, arrays):
                trace.x, trace.y, trace.text = x, y, text
            if ranks != self._ranks_drawn:
                fig.layout.yaxis.update(vr.rank_axis(ranks, self.prediction is not None))
                fig.layout.height = vr.timeline_layout(ranks, self.prediction is not None, "")["height"]
                self._ranks_drawn = ranks

    def _render_links(self, data: LiveData) -> None:
        fig = self._figs["links"]
        top = data.busiest_links(self.top_links)
        with fig.batch_update():
            for i, trace in enumerate(fig.data):
                if i < len(top):
                    name, x, y = top[i]
                    trace.x, trace.y = x, y
                    if trace.name != name or not trace.visible:
                        trace.name, trace.visible = name, True
                elif trace.visible:
                    trace.x, trace.y, trace.visible = np.empty(0), np.empty(0), False

    def _render_memory(self, data: LiveData) -> None:
        fig = self._figs["memory"]
        ranks, by_cat = data.memory()
        if not ranks:
            return
        for cat in by_cat:
            if cat not in self._memory_traces:
                color = vr.CATEGORY_COLORS[len(self._memory_traces) % len(vr.CATEGORY_COLORS)]
                fig.add_trace(self._go.Bar(x=[], y=np.empty(0), name=cat, marker_color=color))
                self._memory_traces[cat] = len(fig.data) - 1
        labels = [f"rank {r}" for r in ranks]
        caps = vr.rank_capacity(self.cluster, ranks, data.devices)
        scale, _, axis = vr.memory_axis(np.sum(list(by_cat.values()), axis=0), caps)
        with fig.batch_update():
            for cat, i in self._memory_traces.items():
                fig.data[i].x, fig.data[i].y = labels, by_cat.get(cat, np.zeros(len(ranks))) / scale
            fig.data[0].x, fig.data[0].y = labels, caps / scale
            fig.layout.yaxis.update(axis)

    def _render_latency(self, data: LiveData) -> None:
        fig = self._figs["latency"]
        ops, p50, p99 = data.latency()
        with fig.batch_update():
            fig.data[0].x, fig.data[0].y = ops, p50 * 1e3
            fig.data[1].x, fig.data[1].y = ops, p99 * 1e3
            if self.prediction is not None:
                pred = data.predicted_p50
                have = [op for op in ops if op in pred]
                fig.data[2].x, fig.data[2].y = have, np.array([pred[op] for op in have]) * 1e3

    def _status_html(self, step: int = 0, steps: int = 0, t: float = 0.0, events: int = 0) -> str:
        if self.error is not None:
            return f"<span style='color:#c00'>error: {html.escape(str(self.error).splitlines()[0])}</span>"
        return (f"<span style='font-family:monospace'>{self._unit} {step}/{steps} · {t:.1f} s · {events} events · "
                f"{self.updates_pushed} updates · redraw ≤ {1.0 / self.interval:.0f}/s</span>")

    def __repr__(self) -> str:
        return f"Dashboard(panels={list(self._figs)}, {self.updates_pushed} updates, {self.renders} redraws)"


def _kind_of(prediction: Result | None) -> str:
    """The dashboard kind a prediction asks for: its job's kind, or serving when it holds requests."""
    if prediction is None:
        return "training"
    job = getattr(prediction, "job", None)
    if job is not None:
        return str(job.kind)
    ev = prediction.events
    return "serving" if len(ev) and "op" in ev and bool((ev["op"] == "request").any()) else "training"


def _topology_figure(cluster: Cluster) -> Any:
    from workbench.viz.topology import topology_figure

    return topology_figure(cluster, height=380)


def _recolour_topology(fig: Any, utilisation: dict[str, float]) -> None:
    from workbench.viz.topology import link_colour_update

    link_colour_update(fig, utilisation)
