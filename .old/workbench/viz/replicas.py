"""Replicas and load over time, from the replica router's timeline (`Router.frame()` or the JSON of
`GET /router/state`): what the HPA of the generated manifests would do, shown for the local router."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def replicas_figure(timeline: Any, events: Any = None) -> go.Figure:
    """Two rows sharing time: replicas (total and ready) as steps; requests in flight and waiting.

    `timeline`: a DataFrame or records with t, replicas, ready, inflight, waiting; `events`: the
    router's start/ready/drain/stop events, drawn as markers on the replica row."""
    import pandas as pd

    df = pd.DataFrame(timeline)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("replicas", "load"))
    if not df.empty:
        fig.add_trace(go.Scatter(x=df["t"], y=df["replicas"], name="replicas", line_shape="hv"), row=1, col=1)
        fig.add_trace(go.Scatter(x=df["t"], y=df["ready"], name="ready", line_shape="hv",
                                 line={"dash": "dot"}), row=1, col=1)
        fig.add_trace(go.Scatter(x=df["t"], y=df["inflight"], name="in flight"), row=2, col=1)
        fig.add_trace(go.Scatter(x=df["t"], y=df["waiting"], name="waiting (servers' queues)"), row=2, col=1)
    ev = pd.DataFrame(events if events is not None else [])
    if not ev.empty:
        fig.add_trace(go.Scatter(x=ev["t"], y=ev["replicas"], mode="markers+text", text=ev["event"],
                                 textposition="top center", name="events", marker={"size": 7}), row=1, col=1)
    fig.update_xaxes(title_text="seconds", row=2, col=1)
    fig.update_layout(height=420, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return fig
