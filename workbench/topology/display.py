"""Jupyter and terminal renderings of a cluster: escaped, CSS-only HTML and a text fallback."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.topology.model import Cluster

_CSS = (
    "<style>.wb-cluster{font-family:var(--jp-content-font-family,sans-serif);font-size:13px}"
    ".wb-cluster table{border-collapse:collapse}.wb-cluster td,.wb-cluster th{padding:2px 8px;"
    "border-bottom:1px solid #ddd;text-align:left}.wb-cluster .wb-k{color:#666}"
    ".wb-cluster summary{cursor:pointer;font-weight:600}</style>"
)


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


def cluster_text(c: Cluster) -> str:
    s = c.summary()
    lines = [f"Cluster {c.name}: {s['nodes']} nodes, {s['gpus']} devices {s['gpu_models']}",
             f"  scale-up {s['scale_up_GBps_per_gpu']:.0f} GB/s per GPU, scale-out {s['scale_out_Gbps_per_node']:.0f} Gbps per node, fabric {c.fabric.kind} ({c.fabric.switch})"]
    for label, gpu, gpus, intra, nic, nics in _node_rows(c):
        lines.append(f"  {label}: {gpus}x {gpu} via {intra}, {nics}x {nic}")
    return "\n".join(lines)


def cluster_html(c: Cluster) -> str:
    e = html.escape
    s = c.summary()
    rows = "".join(
        f"<tr><td>{e(label)}</td><td>{gpus}× {e(gpu)}</td><td>{e(intra)}</td><td>{nics}× {e(nic)}</td></tr>"
        for label, gpu, gpus, intra, nic, nics in _node_rows(c)
    )
    return (
        f"{_CSS}<div class='wb-cluster'><details open><summary>Cluster {e(c.name)}</summary>"
        f"<div><span class='wb-k'>devices</span> {s['gpus']} {e(str(s['gpu_models']))} · "
        f"<span class='wb-k'>scale-up</span> {s['scale_up_GBps_per_gpu']:.0f} GB/s/GPU · "
        f"<span class='wb-k'>scale-out</span> {s['scale_out_Gbps_per_node']:.0f} Gbps/node · "
        f"<span class='wb-k'>fabric</span> {e(c.fabric.kind)} ({e(c.fabric.switch)}), {s['links']} links</div>"
        f"<table><tr><th>nodes</th><th>devices</th><th>inside</th><th>NICs</th></tr>{rows}</table>"
        f"</details></div>"
    )
