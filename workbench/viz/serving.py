"""Figures of serving simulations and runs: latency versus load, KV-cache occupancy over time, the search."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go


def load_figure(sweep: pd.DataFrame, metrics: tuple[str, ...] = ("mean_ttft_ms", "mean_tpot_ms")) -> go.Figure:
    """Latency versus offered load (`workbench.sim.serve.load_sweep`'s rows), one line per plan and metric."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    for j, key in enumerate(metrics, start=1):
        for name, g in sweep.groupby("plan", sort=False):
            fig.add_trace(go.Scatter(x=g["rate"], y=g[key], mode="lines+markers", name=str(name), legendgroup=str(name),
                                     showlegend=j == 1), row=1, col=j)
        fig.update_xaxes(title_text="request rate (req/s)", row=1, col=j)
        fig.update_yaxes(title_text="ms", type="log", row=1, col=j)
    fig.update_layout(template="plotly_white", height=380, title="latency versus load")
    return fig


def kv_figure(result: Any, title: str = "KV cache in use") -> go.Figure:
    """KV-cache bytes per worker over time against each pool's capacity (a Result's `kv_cache` memory rows)."""
    mem = result.memory
    kv = mem[mem["category"] == "kv_cache"]
    fig = go.Figure()
    for worker, g in kv.groupby("worker", sort=False):
        fig.add_trace(go.Scatter(x=g["time"], y=g["bytes"] / 2**30, mode="lines", name=f"{worker}"))
        cap = float(g["capacity"].iloc[0]) / 2**30 if "capacity" in g else None
        if cap:
            fig.add_hline(y=cap, line_dash="dot", annotation_text=f"{worker} pool")
    fig.update_layout(template="plotly_white", height=340, title=title, xaxis_title="time (s)",
                      yaxis_title="GiB per GPU")
    return fig


def search_figure(df: pd.DataFrame, top: int = 20) -> go.Figure:
    """Goodput per GPU of the best candidates of a serving search (colour: meets the SLO or not)."""
    d = df.dropna(subset=["goodput_per_gpu"]).head(top)
    fig = go.Figure(go.Bar(x=d["goodput_per_gpu"], y=d["plan"], orientation="h",
                           marker_color=["#2a9d8f" if ok else "#e76f51" for ok in d["ok"]],
                           hovertext=d["reason"]))
    fig.update_layout(template="plotly_white", height=max(300, 22 * len(d) + 100), title="serving search",
                      xaxis_title="goodput per GPU (req/s)", yaxis={"autorange": "reversed"})
    return fig
