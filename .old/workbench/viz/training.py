"""Figures of simulated training steps: the pipeline timeline, memory per GPU, time breakdown, search, validation.

Each builder returns a `go.Figure`; inputs are `Result`s from `workbench.sim.train.simulate_train`,
their `metrics` dicts, or the DataFrames of `search_plans` / `compare_published`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import require

OP_COLORS = {
    "forward": "#4C78A8", "backward": "#72B7B2", "optimizer": "#B279A2", "all_gather": "#F58518",
    "reduce_scatter": "#E45756", "all_reduce": "#EECA3B", "all_to_all": "#FF9DA6", "send_recv": "#54A24B",
    "offload": "#9D755D",
}
CATEGORY_COLORS = {"weights": "#4C78A8", "gradients": "#F58518", "optimizer": "#54A24B", "activations": "#E45756",
                   "buffers": "#72B7B2"}


def _go() -> Any:
    return require("plotly.graph_objects", "notebook")


def step_timeline_figure(result: Any, title: str | None = None, max_events: int = 60000) -> Any:
    """One row per pipeline stage (its first rank), a segment per event coloured by op; hover names the
    micro-batch and chunk. Events beyond `max_events` (longest kept) are dropped for drawing speed."""
    go = _go()
    ev: pd.DataFrame = result.events
    if len(ev) > max_events:
        ev = ev.assign(_d=ev["end"] - ev["start"]).nlargest(max_events, "_d")
    fig = go.Figure()
    stages = sorted(ev["stage"].unique()) if "stage" in ev else sorted(ev["rank"].unique())
    col = "stage" if "stage" in ev else "rank"
    for op, g in ev.groupby("op", sort=False):
        n = len(g)
        x = np.full(3 * n, np.nan)
        y = np.full(3 * n, np.nan)
        x[0::3], x[1::3] = g["start"].to_numpy(float), g["end"].to_numpy(float)
        lane = g[col].to_numpy(float) + np.where(g["kind"].to_numpy() == "compute", 0.0, 0.28)
        y[0::3], y[1::3] = lane, lane
        mb = g["microbatch"].to_numpy() if "microbatch" in g else np.zeros(n)
        text = np.repeat([f"{op} mb {m}" for m in mb], 3)
        fig.add_trace(go.Scattergl(x=x, y=y, mode="lines", name=str(op), line={"width": 9,
                                   "color": OP_COLORS.get(str(op), "#BAB0AC")}, text=text, hoverinfo="text+x"))
    m = result.metrics
    fig.update_layout(
        title=title or f"one training step: {m.get('step_seconds', 0):.3f} s, MFU {100 * m.get('mfu', 0):.1f} %",
        xaxis_title="seconds", yaxis={"title": "pipeline stage (first rank)", "autorange": "reversed",
                                      "tickvals": stages}, height=max(260, 26 * len(stages) + 140),
        legend={"orientation": "h", "y": -0.2})
    return fig


def memory_figure(metrics: Mapping[str, Mapping[str, Any]]) -> Any:
    """Stacked GiB per GPU by category for each named simulation (`{name: result.metrics}`), capacity marked."""
    go = _go()
    names = list(metrics)
    fig = go.Figure()
    for cat, color in CATEGORY_COLORS.items():
        fig.add_trace(go.Bar(x=names, y=[metrics[n]["memory_GiB_per_gpu"].get(cat, 0.0) for n in names], name=cat,
                             marker_color=color))
    caps = [metrics[n].get("memory_capacity_GiB", np.nan) for n in names]
    fig.add_trace(go.Scatter(x=names, y=caps, mode="markers", marker={"symbol": "line-ew-open", "size": 40,
                                                                       "color": "black"}, name="capacity"))
    fig.update_layout(barmode="stack", yaxis_title="GiB per GPU (binding stage)", title="memory per GPU")
    return fig


def breakdown_figure(metrics: Mapping[str, Mapping[str, Any]]) -> Any:
    """Seconds per category of the critical stage, stacked, for each named simulation."""
    go = _go()
    names = list(metrics)
    cats = [c for c in next(iter(metrics.values()))["breakdown_seconds"]
            if any(metrics[n]["breakdown_seconds"].get(c, 0) > 0 for n in names)]
    fig = go.Figure()
    for c in cats:
        fig.add_trace(go.Bar(y=names, x=[metrics[n]["breakdown_seconds"].get(c, 0.0) for n in names], name=c,
                             orientation="h", marker_color=OP_COLORS.get(c)))
    fig.update_layout(barmode="stack", xaxis_title="seconds per step (critical stage)", title="where the time goes",
                      height=160 + 60 * len(names))
    return fig


def search_figure(df: pd.DataFrame, top: int = 20) -> Any:
    """Tokens/s against memory per GPU for every plan that fits; the `top` best highlighted."""
    go = _go()
    ok = df[df["valid"].astype(bool) & df["fits"].astype(bool)]
    fig = go.Figure()
    label = lambda r: (f"tp={r.tp} pp={r.pp} dp={r.dp} cp={r.cp} ep={r.ep} vpp={r.vpp} mbs={r.mbs} "  # noqa: E731
                       f"zero={r.zero} {r.recompute} offload={int(r.offload)}")
    for name, part, size in (("plans that fit", ok.iloc[top:], 5), (f"top {top}", ok.iloc[:top], 10)):
        fig.add_trace(go.Scattergl(x=part["memory_GiB"], y=part["tokens_per_s"], mode="markers", name=name,
                                   marker={"size": size}, text=[label(r) for r in part.itertuples()],
                                   hoverinfo="text+x+y"))
    fig.update_layout(xaxis_title="GiB per GPU", yaxis_title="tokens/s",
                      title=f"{df.attrs.get('evaluated', len(df))} plans, {len(ok)} fit")
    return fig


def validation_figure(df: pd.DataFrame) -> Any:
    """Predicted against published (each in its own metric), with the error in the hover and the y = x line."""
    go = _go()
    fig = go.Figure()
    for metric, g in df.groupby("metric"):
        fig.add_trace(go.Scatter(x=g["published"], y=g["predicted"], mode="markers+text", text=g["name"],
                                 textposition="top center", name=str(metric),
                                 hovertext=[f"{n}: {100 * e:+.1f} %" for n, e in zip(g["name"], g["error"])]))
    hi = float(max(df["published"].max(), df["predicted"].max())) * 1.1
    fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", name="y = x", line={"dash": "dot", "color": "grey"}))
    fig.update_layout(xaxis={"title": "published", "type": "log"}, yaxis={"title": "predicted", "type": "log"},
                      title="simulator vs published training throughput")
    return fig


def stage_memory_figure(result: Any, capacity_GiB: float | None = None) -> Any:
    """GiB per category on each pipeline stage's first GPU (`result.memory`), with the device capacity."""
    go = _go()
    mem: pd.DataFrame = result.memory
    col = "stage" if "stage" in mem else "rank"
    table = mem.pivot_table(index=col, columns="category", values="bytes", aggfunc="max").fillna(0.0) / 1024**3
    fig = go.Figure()
    for cat in table.columns:
        fig.add_trace(go.Bar(x=table.index, y=table[cat], name=str(cat), marker_color=CATEGORY_COLORS.get(str(cat))))
    cap = capacity_GiB if capacity_GiB is not None else result.metrics.get("memory_capacity_GiB")
    if cap:
        fig.add_hline(y=cap, line_dash="dot", annotation_text="capacity")
    fig.update_layout(barmode="stack", xaxis_title=f"pipeline {col}", yaxis_title="GiB per GPU",
                      title="memory placement per GPU, by pipeline stage")
    return fig
