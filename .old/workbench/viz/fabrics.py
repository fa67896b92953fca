"""Fabric figures: bandwidth-vs-size curves (model vs published points) and link utilisation heat maps.

Builders draw tables; they never run a simulator. The curves come from `workbench.sim.sweeps`
(`p2p_curves`, `collective_curves`), the heat map from a flow simulation's `links` table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go

if TYPE_CHECKING:
    from workbench.sim.flows import FlowResult


def p2p_figure(curves: pd.DataFrame, published: pd.DataFrame | None = None) -> go.Figure:
    """Single-write Gbit/s vs size, one line per `fabric` of `curves` (`workbench.sim.sweeps.p2p_curves`);
    `published` (the TransferEngine table: `system`, `op`, `size_bytes`, `Gbps`) as crosses where a fabric
    names its `system`."""
    fig = go.Figure()
    for name, rows in curves.groupby("fabric", sort=False):
        fig.add_trace(go.Scatter(x=rows["bytes"].to_numpy(), y=rows["Gbps"].to_numpy(), mode="lines",
                                 name=f"{name}: model"))
        system = rows["system"].iloc[0] if "system" in rows else None
        if published is not None and isinstance(system, str):
            pts = published[(published["system"] == system) & (published["op"] == "single")]
            fig.add_trace(go.Scatter(x=pts["size_bytes"].to_numpy(), y=pts["Gbps"].to_numpy(), mode="markers",
                                     name=f"{name}: published (TransferEngine)", marker={"size": 10, "symbol": "x"}))
    fig.update_layout(title="Point-to-point single writes", xaxis={"type": "log", "title": "bytes"},
                      yaxis={"type": "log", "title": "Gbit/s"}, template="plotly_white")
    return fig


def collective_figure(curves: pd.DataFrame, published: pd.DataFrame | None = None) -> go.Figure:
    """busbw vs size, one line per `fabric` of `curves` (`workbench.sim.sweeps.collective_curves`; the algorithm
    in the hover); `published` nccl-tests points (`cluster`, `algo`, `size`, `busbw_GBps`) as crosses."""
    fig = go.Figure()
    for name, rows in curves.groupby("fabric", sort=False):
        fig.add_trace(go.Scatter(x=rows["bytes"].to_numpy(), y=rows["busbw_GBps"].to_numpy(), mode="lines",
                                 name=f"{name}: model", text=(rows["algo"] + "/" + rows["proto"]).tolist()))
    for r in ([] if published is None else published.to_dict("records")):
        fig.add_trace(go.Scatter(x=[r["size"]], y=[r["busbw_GBps"]], mode="markers",
                                 name=f"published: {r['cluster']} {r['algo']}", marker={"size": 11, "symbol": "x"}))
    ops = sorted(set(curves["op"])) if "op" in curves else []
    fig.update_layout(title=f"{', '.join(ops)}: bus bandwidth", xaxis={"type": "log", "title": "size (bytes)"},
                      yaxis={"title": "busbw (GB/s)"}, template="plotly_white")
    return fig


def link_heatmap(res: FlowResult | pd.DataFrame, top: int = 40, bins: int = 60) -> go.Figure:
    """Utilisation of the `top` busiest directed links over time (rows: links; columns: time bins), from a
    flow simulation's result or its `links` table (`link`, `start`, `end`, `utilisation`)."""
    links = res if isinstance(res, pd.DataFrame) else res.links
    if links.empty:
        return go.Figure()
    busy = (links.assign(w=(links["end"] - links["start"]) * links["utilisation"])
            .groupby("link")["w"].sum().sort_values(ascending=False).head(top).index.tolist())
    t_end = float(links["end"].max())
    edges = np.linspace(0.0, t_end, bins + 1)
    z = np.zeros((len(busy), bins))
    row = {name: i for i, name in enumerate(busy)}
    sel = links[links["link"].isin(busy)]
    for r in sel.itertuples(index=False):
        lo = np.clip(np.minimum(edges[1:], r.end) - np.maximum(edges[:-1], r.start), 0, None)
        z[row[r.link]] += lo / np.diff(edges) * r.utilisation
    flows = f"{res.flows} flows" if not isinstance(res, pd.DataFrame) else f"{len(busy)} busiest links"
    fig = go.Figure(go.Heatmap(z=z, x=(edges[:-1] + edges[1:]) / 2 * 1e3, y=busy, zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "utilisation"}))
    fig.update_layout(title=f"Link utilisation ({flows})", xaxis={"title": "time (ms)"},
                      yaxis={"title": "directed link", "autorange": "reversed"}, template="plotly_white",
                      height=max(300, 14 * len(busy) + 120))
    return fig
