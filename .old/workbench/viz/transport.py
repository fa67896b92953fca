"""Plotly figures of transport benchmarks (pure builders: rows in, `go.Figure` out)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def throughput_per_lane(rows: Iterable[Mapping[str, Any]], title: str = "Transport write throughput") -> Any:
    """GB/s of single writes against size, one line per lane count, with the baselines dashed.

    `rows` are the benchmark rows (`transport.bench`): backend, mode, bytes, lanes, GBps, p50_us.
    """
    import plotly.graph_objects as go

    rows = list(rows)
    fig = go.Figure()
    single = [r for r in rows if r["mode"] == "single"]
    for lanes in sorted({int(r["lanes"]) for r in single}):
        pts = sorted((r for r in single if int(r["lanes"]) == lanes), key=lambda r: r["bytes"])
        fig.add_trace(go.Scatter(x=[r["bytes"] for r in pts], y=[r["GBps"] for r in pts], mode="lines+markers",
                                 name=f"{pts[0]['backend']} · {lanes} lane{'s' if lanes > 1 else ''}"))
    for mode, dash in (("raw_socket", "dash"), ("gloo", "dot")):
        pts = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["bytes"])
        if pts:
            fig.add_trace(go.Scatter(x=[r["bytes"] for r in pts], y=[r["GBps"] for r in pts], mode="lines+markers",
                                     name=mode.replace("_", " "), line={"dash": dash}))
    fig.update_layout(title=title, xaxis={"title": "bytes per write", "type": "log"},
                      yaxis={"title": "GB/s (median operation)"}, template="plotly_white",
                      legend={"orientation": "h", "y": -0.2})
    return fig
