"""Jupyter and terminal renderings of a cluster, through the one display module (`workbench.display`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.display import grid, repr_html

if TYPE_CHECKING:
    from workbench.topology.model import Cluster


def _node_rows(c: Cluster) -> list[tuple[str, str, int, str, str, int]]:
    rows: list[tuple[str, str, int, str, str, int]] = []
    start = 0
    for i, n in enumerate(c.nodes):
        if i + 1 < len(c.nodes) and c.nodes[i + 1] == n:
            continue
        label = f"n{start}" if start == i else f"n{start}–n{i}"
        rows.append((label, n.gpu, n.gpus, n.intra, n.nic, n.nics))
        start = i + 1
    return rows


def _facts(c: Cluster) -> list[tuple[str, str]]:
    s = c.summary()
    return [("devices", f"{s['gpus']} {s['gpu_models']}"),
            ("scale-up", f"{s['scale_up_GBps_per_gpu']:.0f} GB/s per GPU"),
            ("scale-out", f"{s['scale_out_Gbps_per_node']:.0f} Gbps per node"),
            ("fabric", f"{c.fabric.kind} ({c.fabric.switch}), {s['links']} links")]


def cluster_text(c: Cluster) -> str:
    s = c.summary()
    lines = [f"Cluster {c.name}: {s['nodes']} nodes, {s['gpus']} devices {s['gpu_models']}",
             f"  scale-up {s['scale_up_GBps_per_gpu']:.0f} GB/s per GPU, scale-out {s['scale_out_Gbps_per_node']:.0f} Gbps per node, fabric {c.fabric.kind} ({c.fabric.switch})"]
    for label, gpu, gpus, intra, nic, nics in _node_rows(c):
        lines.append(f"  {label}: {gpus}x {gpu} via {intra}, {nics}x {nic}")
    return "\n".join(lines)


def cluster_html(c: Cluster, style: bool = True) -> str:
    """The cluster's facts and its node groups as escaped HTML (`style=False` inside a page that has the CSS)."""
    nodes = grid(("nodes", "devices", "inside", "NICs"),
                 [(label, f"{gpus}× {gpu}", intra, f"{nics}× {nic}") for label, gpu, gpus, intra, nic, nics in _node_rows(c)])
    return repr_html(f"Cluster {c.name}", _facts(c), body=nodes, style=style)
