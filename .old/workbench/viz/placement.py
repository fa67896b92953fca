"""Figures of a placement: its stages drawn on the cluster topology, memory per device against
capacity, and the planner against the hand-written baselines.

Inputs are a `Placement` (and its cluster) and the rows a `PlaceResult` (or `evaluate`) returns.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any

from workbench.errors import require

PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D",
           "#BAB0AC", "#1F77B4", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2")
MEMORY_PARTS = (("weights_GiB", "weights", "#4C78A8"), ("kv_GiB", "KV cache", "#F58518"),
                ("activations_GiB", "activations + fetch buffer", "#E45756"), ("workspace_GiB", "workspace", "#BAB0AC"))


def _go() -> Any:
    return require("plotly.graph_objects", "notebook")


def placement_figure(cluster: Any, placement: Any, height: int | None = None) -> Any:
    """The cluster's topology with each stage's GPUs ringed in the stage's colour (hover: replica,
    layers, TP, formats, offload). GPUs the placement leaves idle keep their plain marker."""
    go = _go()
    from workbench.topology import load_cluster
    from workbench.viz.topology import topology_figure

    c = load_cluster(cluster)
    fig = topology_figure(c, aggregate=False, height=height)
    gpu_trace = next(t for t in fig.data if (t.meta or {}).get("role") == "vertices" and t.meta.get("kind") in ("gpu", "cpu")
                     and len(t.x))
    pos = {str(d): (x, y) for d, x, y in zip(gpu_trace.customdata, gpu_trace.x, gpu_trace.y)}
    for ref in placement.stages:
        st = ref.stage
        devs = [d for d in st.devices if d in pos]
        off = f"<br>offload {st.offload.weights:.0%} of weights to {st.offload.tier}" if st.offload.weights else ""
        text = (f"<b>stage {ref.index}</b> (replica {ref.replica})<br>layers {st.first}–{st.last} "
                f"({st.num_layers})<br>tp={st.tp}, weights {st.precision}, KV {st.kv_precision}{off}")
        fig.add_trace(go.Scatter(
            x=[pos[d][0] for d in devs], y=[pos[d][1] for d in devs], mode="markers",
            name=f"stage {ref.index}: L{st.first}–{st.last}", legendgroup="stages",
            hoverinfo="text", hovertext=[f"{html.escape(d)}<br>{text}" for d in devs],
            marker={"size": 22, "symbol": "circle-open", "color": PALETTE[ref.index % len(PALETTE)],
                    "line": {"width": 4}},
            meta={"role": "stage", "stage": ref.index},
        ))
    fig.update_layout(title={"text": f"{html.escape(placement.model)} on {html.escape(c.name)}: "
                                     f"{len(placement.stages)} stages in {len(placement.replicas)} replica(s)"})
    return fig


def memory_figure(devices: Iterable[Mapping[str, Any]] | Any, title: str = "memory per device") -> Any:
    """Stacked bars per device (weights, KV, activations, workspace) with the device's capacity as a
    marker, and what is offloaded to host memory/NVMe as a hatched bar beside."""
    go = _go()
    rows = devices.to_dict("records") if hasattr(devices, "to_dict") else list(devices)
    x = [r["device"] for r in rows]
    fig = go.Figure()
    for key, label, colour in MEMORY_PARTS:
        fig.add_trace(go.Bar(x=x, y=[r.get(key, 0.0) for r in rows], name=label, marker_color=colour,
                             offsetgroup="gpu"))
    off = [r.get("host_offload_GiB", 0.0) + r.get("nvme_offload_GiB", 0.0) for r in rows]
    if any(off):
        fig.add_trace(go.Bar(x=x, y=off, name="offloaded (host / NVMe)", marker_color="#9D755D",
                             marker_pattern_shape="/", offsetgroup="host", opacity=0.7))
    fig.add_trace(go.Scatter(x=x, y=[r["capacity_GiB"] for r in rows], mode="markers", name="capacity",
                             marker={"symbol": "line-ew", "size": 14, "line": {"width": 3, "color": "#222"}}))
    fig.update_layout(barmode="relative", title=title, yaxis_title="GiB", xaxis_tickangle=-60, height=420,
                      plot_bgcolor="white", legend={"orientation": "h", "y": 1.12})
    return fig


def comparison_figure(result: Any) -> Any:
    """Predicted output throughput and mean TTFT/TPOT: the planner against the uniform and
    memory-proportional splits (from a `PlaceResult`)."""
    go = _go()
    from plotly.subplots import make_subplots

    rows = [("planner", result.predicted)] + [(n.replace("_", "-"), b) for n, b in result.baselines.items()]
    names = [n for n, _ in rows]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("output tokens/s", "mean TTFT (ms)", "mean TPOT (ms)"))
    for col, key in enumerate(("output_throughput", "mean_ttft_ms", "mean_tpot_ms"), start=1):
        fig.add_trace(go.Bar(x=names, y=[b.get(key) for _, b in rows], marker_color=PALETTE[:len(rows)],
                             showlegend=False, text=[f"{(b.get(key) or 0):.4g}" for _, b in rows],
                             textposition="outside"), row=1, col=col)
    fig.update_layout(height=360, title=f"predicted ({result.predicted.get('fidelity', '')})", plot_bgcolor="white")
    return fig
