"""Fabric figures: bandwidth-vs-size curves (model vs published points) and link utilisation heat maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from workbench.sim.collectives import collective
from workbench.sim.flows import FlowResult
from workbench.sim.p2p import write
from workbench.topology import load_cluster

DEFAULT_SIZES = tuple(2 ** k for k in range(12, 31))  # 4 KiB … 1 GiB
P2P_FABRICS = {"EFA (p5en, 2×200G per GPU)": ("aws-p5en:nodes=2", "n1.g0", "efa"),
               "InfiniBand (CX-7, 1×400G per GPU)": ("dgx-h100:nodes=2", "n1.g0", "cx7"),
               "NVLink (H100, same node)": ("dgx-h100:nodes=1", "n0.g1", None)}


def p2p_figure(fabrics: Mapping[str, tuple[str, str, str | None]] = P2P_FABRICS,
               sizes: Sequence[int] = DEFAULT_SIZES, published: bool = True) -> go.Figure:
    """Single-write throughput (submit, wait, repeat) vs size per fabric; published TransferEngine points."""
    from workbench.calibration.fit import transferengine_table

    fig = go.Figure()
    table = transferengine_table() if published else None
    for name, (spec, dst, system) in fabrics.items():
        c = load_cluster(spec)
        gbps = [write(c, "n0.g0", dst, int(s)).Gbps for s in sizes]
        fig.add_trace(go.Scatter(x=np.asarray(sizes), y=np.asarray(gbps), mode="lines", name=f"{name}: model"))
        if table is not None and system:
            pts = table[(table["system"] == system) & (table["op"] == "single")]
            fig.add_trace(go.Scatter(x=pts["size_bytes"].to_numpy(), y=pts["Gbps"].to_numpy(), mode="markers",
                                     name=f"{name}: published (TransferEngine)", marker={"size": 10, "symbol": "x"}))
    fig.update_layout(title="Point-to-point single writes", xaxis={"type": "log", "title": "bytes"},
                      yaxis={"type": "log", "title": "Gbit/s"}, template="plotly_white")
    return fig


def collective_figure(specs: Mapping[str, str], op: str = "all_reduce", sizes: Sequence[int] = DEFAULT_SIZES,
                      published: bool = True) -> go.Figure:
    """busbw vs size (nccl-tests conventions) for each cluster; the published nccl-tests busbw points."""
    from workbench.data import read_csv

    fig = go.Figure()
    for name, spec in specs.items():
        c = load_cluster(spec)
        est = [collective(c, op, int(s)) for s in sizes]
        fig.add_trace(go.Scatter(x=np.asarray(sizes), y=np.array([e.busbw_GBps for e in est]), mode="lines",
                                 name=f"{name}: model", text=[f"{e.algo}/{e.proto}" for e in est]))
    if published:
        pts = read_csv("measurements/nccl_tests_h100_busbw.csv")
        pts = pts[pts["op"] == op]
        for r in pts.to_dict("records"):
            fig.add_trace(go.Scatter(x=[r["size"]], y=[r["busbw_GBps"]], mode="markers",
                                     name=f"published: {r['cluster']} {r['algo']}",
                                     marker={"size": 11, "symbol": "x"}))
    fig.update_layout(title=f"{op}: bus bandwidth", xaxis={"type": "log", "title": "size (bytes)"},
                      yaxis={"title": "busbw (GB/s)"}, template="plotly_white")
    return fig


def link_heatmap(res: FlowResult, top: int = 40, bins: int = 60) -> go.Figure:
    """Utilisation of the `top` busiest directed links over time (rows: links; columns: time bins)."""
    links = res.links
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
    fig = go.Figure(go.Heatmap(z=z, x=(edges[:-1] + edges[1:]) / 2 * 1e3, y=busy, zmin=0, zmax=1,
                               colorscale="Viridis", colorbar={"title": "utilisation"}))
    fig.update_layout(title=f"Link utilisation ({res.flows} flows)", xaxis={"title": "time (ms)"},
                      yaxis={"title": "directed link", "autorange": "reversed"}, template="plotly_white",
                      height=max(300, 14 * len(busy) + 120))
    return fig
