"""The serving panels of the live `Dashboard`: a serving run's requests, throughput, KV cache and
KV transfers, each with the serving simulator's prediction of the same job laid over it.

Not a second dashboard: `Dashboard(..., prediction=simulated_serving_result)` (or `kind="serving"`)
builds these panels instead of the training ones and keeps its threads, throttling and
`attach`/`wait`/`replay`. The series come from `workbench.viz.serving` (shared with the static
`serving_run_figure`), the data from `workbench.live.ServingLiveData`.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

import numpy as np

from workbench.live import ServingLiveData
from workbench.viz import serving as vs

SUMMARY_ROWS = ("completed", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_e2el_ms",
                "p99_e2el_ms", "output_throughput")


class ServingPanels:
    """Four FigureWidgets and a summary table, redrawn in place from a `ServingLiveData`."""

    def __init__(self, go: Any, w: Any, width: int, data: ServingLiveData) -> None:
        self._go = go
        layouts = vs.serving_layouts(vs.kv_scale(data)[1])
        # the first series (the prediction, before the run) go in with the figure: a restyle sent before
        # the browser has drawn the widget leaves it blank
        self.figs = {p: go.FigureWidget(data=[go.Scatter(**s) for s in vs.SERIES[p](data)],
                                        layout=layouts[p] | {"width": width // 2 - 8}) for p in vs.SERVING_PANELS}
        self.table = w.HTML(value=summary_html(data))
        self.rows = [w.HBox([self.figs["latency"], self.figs["throughput"]]),
                     w.HBox([self.figs["kv_cache"], self.figs["kv_transfer"]]), self.table]
        self._drawn: dict[str, Any] = _keys(data)
        self._drawn_at: dict[str, float] = {}
        self._unit = layouts["kv_cache"]["yaxis"]["title"]["text"]

    def render(self, data: ServingLiveData, budget: int | None = None) -> bool:
        """Redraw the panels whose data changed (at most `budget`, least recently drawn first);
        True when some were left for the next redraw."""
        keys = _keys(data)
        changed = sorted((p for p in keys if keys[p] != self._drawn.get(p)), key=lambda p: self._drawn_at.get(p, 0.0))
        for panel in changed[:budget]:
            self._sync(panel, vs.SERIES[panel](data))
            if panel == "kv_cache":
                unit = vs.kv_scale(data)[1]
                if unit != self._unit:
                    self.figs[panel].layout.yaxis.title.text = self._unit = unit
            self._drawn[panel], self._drawn_at[panel] = keys[panel], time.perf_counter()
        if "latency" in changed[:budget]:
            self.table.value = summary_html(data)
        return budget is not None and len(changed) > budget

    def _sync(self, panel: str, series: list[dict[str, Any]]) -> None:
        """Assign each series' arrays to the trace of the same name (traces are added, never rebuilt,
        when a new rank or link appears)."""
        fig = self.figs[panel]
        have = {t.name: t for t in fig.data}
        for s in series:
            if s["name"] not in have:  # added empty: arrays travel only in the restyle below
                fig.add_trace(self._go.Scatter(**(s | {"x": [], "y": []})))
                have[s["name"]] = fig.data[-1]
        with fig.batch_update():
            for s in series:
                trace = have[s["name"]]
                trace.x, trace.y = s["x"], s["y"]


def _keys(data: ServingLiveData) -> dict[str, Any]:
    """What each panel was drawn from: a new run's data (attach, replay) redraws everything."""
    v, me = data.versions, id(data)
    return {"latency": (me, v["requests"], v["kv"]), "throughput": (me, v["requests"]), "kv_cache": (me, v["kv"]),
            "kv_transfer": (me, v["transfers"])}


def summary_html(data: ServingLiveData) -> str:
    """The measured-so-far vs predicted table as escaped HTML (the same numbers as `summary_text`)."""
    tab = data.summary().loc[list(SUMMARY_ROWS)]
    cell = "style='padding:1px 10px;text-align:right'"
    head = (f"<tr><th style='padding:1px 10px;text-align:left'>metric</th><th {cell}>measured</th>"
            f"<th {cell}>predicted</th><th {cell}>error</th></tr>")
    body = "".join(
        f"<tr><td style='padding:1px 10px;text-align:left'>{html.escape(str(k))}</td><td {cell}>{_num(r['measured'])}</td>"
        f"<td {cell}>{_num(r['simulated'])}</td><td {cell}>{_pct(r['error'])}</td></tr>" for k, r in tab.iterrows())
    return f"<table style='font-family:monospace;font-size:12px;border-collapse:collapse'>{head}{body}</table>"


def summary_text(data: ServingLiveData) -> str:
    """The measured-so-far vs predicted table as plain text (what a front end without widgets shows)."""
    tab = data.summary().loc[list(SUMMARY_ROWS)]
    lines = [f"{'metric':<18} {'measured':>10} {'predicted':>10} {'error':>8}"]
    for k, r in tab.iterrows():
        lines.append(f"{k:<18} {_num(r['measured']):>10} {_num(r['simulated']):>10} {_pct(r['error']):>8}")
    return "\n".join(lines)


def _num(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _pct(v: float) -> str:
    return "" if v is None or not np.isfinite(v) else f"{v * 100:+.0f} %"
