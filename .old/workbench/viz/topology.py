"""A plotly picture of a cluster: spines, leaves (rails), NICs, GPUs, NVSwitch and hosts in layers.

`topology_figure(cluster)` draws one marker per vertex of `cluster.graph` (one trace per
vertex kind, hover shows the specs) and its links as None-separated line segments (one trace
per link kind, coloured by kind, width by the kind's bandwidth; an invisible marker at each
link's midpoint carries the link's hover text). Above `AGGREGATE_ABOVE` nodes each node
becomes one marker and, in a rail fabric, the rail switches of one leaf group one marker, with
the links between groups summed, so 128-node clusters stay legible.

The trace structure is fixed (every kind has its trace, empty when absent), so a displayed
`FigureWidget` is updated in place by copying the traces of a new figure (`update_in_place`),
and `link_colour_update(fig, utilisation)` recolours links by utilisation for live views.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workbench.errors import require

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from workbench.topology import Cluster, Link, Vertex

AGGREGATE_ABOVE = 16  # nodes; more are drawn one marker per node

LAYER_Y = {"spine": 5.0, "leaf": 4.0, "switch": 4.0, "nic": 3.0, "gpu": 2.0, "cpu": 2.0, "node": 2.0,
           "nvswitch": 1.0, "host": 0.0}
LAYER_LABELS = ((5.0, "spines"), (4.0, "leaves / rails"), (3.0, "NICs"), (2.0, "GPUs"), (1.0, "NVSwitch"),
                (0.0, "hosts"))

# (marker symbol, size, colour) per vertex kind; the order is the trace order.
VERTEX_STYLE: dict[str, tuple[str, int, str]] = {
    "spine": ("square", 14, "#34495e"),
    "leaf": ("square", 11, "#5d6d7e"),
    "switch": ("square", 14, "#5d6d7e"),
    "nic": ("diamond", 8, "#e67e22"),
    "gpu": ("circle", 11, "#76b900"),
    "cpu": ("circle", 11, "#3498db"),
    "nvswitch": ("hexagon", 15, "#1e8449"),
    "host": ("triangle-up", 11, "#7f8c8d"),
    "node": ("square", 14, "#76b900"),
}
# colour per link kind; "other" catches kinds this module does not know yet.
LINK_STYLE: dict[str, str] = {
    "nvlink": "#76b900", "nvlink-bridge": "#a9d18e", "pcie": "#b3b6b7", "loopback": "#85c1e9",
    "efa": "#ff9900", "ib": "#2e86c1", "roce": "#8e44ad", "ethernet": "#a0522d", "fabric": "#2c3e50",
    "other": "#cccccc",
}
UTIL_EDGES = (0.2, 0.4, 0.6, 0.8)
UTIL_COLOURS = ("#4575b4", "#91bfdb", "#fee090", "#fc8d59", "#d73027")
UTIL_WIDTH = 3.5


def link_width(GBps: float) -> float:
    """Line width in pixels for a bandwidth (GB/s per direction): logarithmic, 0.5 to 6."""
    return round(min(6.0, max(0.5, 0.5 + 1.1 * math.log10(1.0 + max(GBps, 0.0)))), 2)


# ---------------------------------------------------------------------------------------------
# grouping (aggregate view) — pure string rules, so utilisation keys map without the cluster

_NODE_RE = re.compile(r"^n(\d+)\.")
_RAIL_LEAF_RE = re.compile(r"^rail\d+\.(leaf\d+)$")


def group_of(vertex_id: str, aggregate: bool, rail: bool) -> str:
    """The drawn vertex a graph vertex belongs to (itself unless aggregated)."""
    if not aggregate:
        return vertex_id
    m = _NODE_RE.match(vertex_id)
    if m:
        return f"n{m.group(1)}"
    if rail:
        m = _RAIL_LEAF_RE.match(vertex_id)
        if m:
            return m.group(1)
    return vertex_id


@dataclass
class _Edge:
    a: str
    b: str
    kind: str
    GBps: float
    latency_us: float
    count: int


def _edges(links: list[Link], aggregate: bool, rail: bool) -> list[_Edge]:
    out: dict[tuple[str, str], _Edge] = {}
    for lk in links:
        a, b = group_of(lk.a, aggregate, rail), group_of(lk.b, aggregate, rail)
        if a == b:
            continue  # inside one aggregated node
        key = (a, b) if (a, b) in out or (b, a) not in out else (b, a)
        e = out.get(key)
        if e is None:
            out[key] = _Edge(key[0], key[1], lk.kind, lk.GBps, lk.latency_us, 1)
        else:
            e.GBps += lk.GBps
            e.count += 1
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# layout


def _spread(ids: list[str], width: float, y: float, pos: dict[str, tuple[float, float]], x0: float = 0.0) -> None:
    n = len(ids)
    for j, vid in enumerate(ids):
        pos[vid] = (x0 + (j + 0.5) * width / n, y)


def _leaf_sort_key(vid: str) -> tuple[int, ...]:
    return tuple(int(d) for d in re.findall(r"\d+", vid)[::-1]) or (0,)


def _layout(c: Cluster, aggregate: bool, rail: bool) -> tuple[dict[str, tuple[float, float]], dict[str, str],
                                                                list[tuple[float, str]]]:
    """Positions and kinds of the drawn vertices, and node labels (x, text)."""
    g = c.graph
    pos: dict[str, tuple[float, float]] = {}
    kinds: dict[str, str] = {}
    labels: list[tuple[float, str]] = []
    by_kind: dict[str, list[str]] = {}
    for v in g.vertices.values():
        by_kind.setdefault(v.kind, []).append(v.id)
    if aggregate:
        for i in range(len(c.nodes)):
            pos[f"n{i}"] = (i + 0.5, LAYER_Y["node"])
            kinds[f"n{i}"] = "node"
        total = float(len(c.nodes))
        step = max(1, len(c.nodes) // 16)
        labels = [(i + 0.5, f"n{i}") for i in range(0, len(c.nodes), step)]
    else:
        x = 0.0
        gap = 2.0
        for i, node in enumerate(c.nodes):
            w = float(max(node.gpus, node.nics, 2))
            gpus = [f"n{i}.g{j}" for j in range(node.gpus)]
            _spread(gpus, w, LAYER_Y["gpu"], pos, x)
            _spread([f"n{i}.nic{k}" for k in range(node.nics)], w, LAYER_Y["nic"], pos, x)
            if f"n{i}.nvsw" in g.vertices:
                pos[f"n{i}.nvsw"] = (x + 0.35 * w, LAYER_Y["nvswitch"])
            pos[f"n{i}.host"] = (x + 0.65 * w, LAYER_Y["host"])
            labels.append((x + w / 2, f"n{i}"))
            x += w + gap
        total = x - gap
        for vid in pos:
            kinds[vid] = g.vertices[vid].kind
    switches = sorted({group_of(v, aggregate, rail) for v in by_kind.get("leaf", []) + by_kind.get("switch", [])},
                      key=_leaf_sort_key)
    _spread(switches, total, LAYER_Y["leaf"], pos)
    for s in switches:
        kinds[s] = g.vertices[s].kind if s in g.vertices else "leaf"
    spines = sorted(by_kind.get("spine", []), key=_leaf_sort_key)
    _spread(spines, total, LAYER_Y["spine"], pos)
    for s in spines:
        kinds[s] = "spine"
    return pos, kinds, labels


# ---------------------------------------------------------------------------------------------
# hover text


def _vertex_hover(c: Cluster, vid: str, kind: str, aggregate: bool, rail: bool, degree: int) -> str:
    g = c.graph
    if kind == "node":
        i = int(vid[1:])
        n = c.nodes[i]
        return (f"<b>{vid}</b><br>{n.gpus}× {n.gpu_spec.name} via {n.intra}<br>"
                f"{n.nics}× {n.nic} ({n.nics * n.nic_spec.Gbps:g} Gbps)")
    if vid not in g.vertices:  # an aggregated leaf group
        members = [v for v in g.vertices if group_of(v, aggregate, rail) == vid]
        return f"<b>{vid}</b><br>{len(members)} rail switches ({c.fabric.switch})"
    v: Vertex = g.vertices[vid]
    if kind in ("gpu", "cpu"):
        n = c.nodes[v.node or 0]
        s = n.gpu_spec
        peaks = ", ".join(f"{p} {t:g}" for p, t in s.peak_tflops if p in ("fp32", "bf16", "fp8"))
        nics = ", ".join(c.nics_of(vid)) or "none"
        extra = f"<br>NVLink {s.nvlink_GBps:g} GB/s" if s.nvlink_GBps else ""
        return (f"<b>{vid}</b> {s.name}<br>{s.memory_GB:g} GB at {s.memory_GBps:g} GB/s<br>"
                f"peak TFLOP/s: {peaks}{extra}<br>NICs: {nics}")
    if kind == "nic":
        ns = c.nodes[v.node or 0].nic_spec
        served = [d for d in c.gpus if c.node_of(d) == v.node and vid in c.graph.nics_of(d)]
        return (f"<b>{vid}</b> {ns.name}<br>{ns.Gbps:g} Gbps ({ns.protocol}), {ns.latency_us:g} µs<br>"
                f"GPUDirect: {'yes' if ns.gpudirect else 'no'}; serves {', '.join(served) or 'host only'}")
    if kind == "nvswitch":
        s = c.nodes[v.node or 0].gpu_spec
        return f"<b>{vid}</b> NVSwitch (NVLink gen {s.nvlink_gen})<br>{degree} GPUs, {s.nvlink_GBps:g} GB/s per GPU"
    if kind == "host":
        n = c.nodes[v.node or 0]
        return f"<b>{vid}</b> host (CPU, PCIe gen {n.gpu_spec.pcie_gen})<br>{n.gpus} devices, {n.nics} NICs"
    return f"<b>{vid}</b> {kind} ({v.model or c.fabric.switch})<br>{degree} ports"


def _edge_hover(e: _Edge) -> str:
    if e.count > 1:
        return (f"<b>{e.a} ↔ {e.b}</b><br>{e.count} {e.kind} links, {e.GBps:g} GB/s per direction in all"
                f"<br>{e.latency_us:g} µs each")
    return f"<b>{e.a} ↔ {e.b}</b><br>{e.kind}: {e.GBps:g} GB/s per direction, {e.latency_us:g} µs"


# ---------------------------------------------------------------------------------------------
# the figure


def topology_figure(cluster: Cluster, utilisation: Mapping[str, float] | None = None,
                    aggregate: bool | None = None, height: int | None = None) -> go.Figure:
    """A plotly figure of `cluster` (see the module docstring); `utilisation` as in `link_colour_update`.

    `aggregate` draws one marker per node (default: when the cluster has more than
    `AGGREGATE_ABOVE` nodes).
    """
    go = require("plotly.graph_objects", "notebook")
    from workbench.topology import load_cluster

    c = load_cluster(cluster)
    agg = len(c.nodes) > AGGREGATE_ABOVE if aggregate is None else bool(aggregate)
    rail = c.fabric.kind == "rail"
    pos, kinds, labels = _layout(c, agg, rail)
    edges = [e for e in _edges(c.graph.links, agg, rail) if e.a in pos and e.b in pos]

    degree: dict[str, int] = {}
    for lk in c.graph.links:
        degree[lk.a] = degree.get(lk.a, 0) + 1
        degree[lk.b] = degree.get(lk.b, 0) + 1
    traces: list[Any] = []
    for kind, colour in LINK_STYLE.items():
        mine = [e for e in edges if (e.kind if e.kind in LINK_STYLE else "other") == kind]
        xs, ys = _segments([(pos[e.a], pos[e.b]) for e in mine])
        top = max((e.GBps for e in mine), default=0.0)
        traces.append(go.Scatter(
            x=xs, y=ys, mode="lines", name=f"{kind} ({_bw(mine)})" if mine else kind, legendgroup=kind,
            showlegend=bool(mine), hoverinfo="skip",
            line={"color": colour, "width": link_width(top)}, opacity=0.9 if kind != "pcie" else 0.6,
            meta={"role": "links", "kind": kind},
        ))
    for i, colour in enumerate(UTIL_COLOURS):
        lo = 0.0 if i == 0 else UTIL_EDGES[i - 1]
        name = f"utilisation {lo:.0%}–{UTIL_EDGES[i]:.0%}" if i < len(UTIL_EDGES) else f"utilisation ≥ {lo:.0%}"
        traces.append(go.Scatter(x=[], y=[], mode="lines", name=name, legendgroup="utilisation", showlegend=False,
                                 hoverinfo="skip", line={"color": colour, "width": UTIL_WIDTH},
                                 meta={"role": "utilisation", "bin": i}))
    mids = [((pos[e.a][0] + pos[e.b][0]) / 2, (pos[e.a][1] + pos[e.b][1]) / 2) for e in edges]
    traces.append(go.Scatter(
        x=[m[0] for m in mids], y=[m[1] for m in mids], mode="markers", name="links", showlegend=False,
        hoverinfo="text", hovertext=[_edge_hover(e) for e in edges],
        customdata=[[f"{e.a}<->{e.b}", _edge_hover(e)] for e in edges],
        marker={"size": 8, "opacity": 0.0, "color": "#000000"}, meta={"role": "link-hover"},
    ))
    for kind, (symbol, size, colour) in VERTEX_STYLE.items():
        ids = [v for v, k in kinds.items() if k == kind]
        traces.append(go.Scatter(
            x=[pos[v][0] for v in ids], y=[pos[v][1] for v in ids], mode="markers", name=kind,
            showlegend=bool(ids), hoverinfo="text", hovertext=[_vertex_hover(c, v, kind, agg, rail, degree.get(v, 0)) for v in ids],
            customdata=ids, marker={"symbol": symbol, "size": size, "color": colour,
                                    "line": {"width": 1, "color": "#ffffff"}},
            meta={"role": "vertices", "kind": kind},
        ))
    fig = go.Figure(data=traces)
    s = c.summary()
    ys_used = sorted({y for _, y in pos.values()})
    annotations = [{"x": 0, "y": y, "xref": "paper", "yref": "y", "text": text, "showarrow": False,
                    "xanchor": "right", "font": {"size": 11, "color": "#666"}}
                   for y, text in LAYER_LABELS if y in ys_used and not (agg and y == 2.0)]
    if agg:
        annotations.append({"x": 0, "y": 2.0, "xref": "paper", "yref": "y", "text": "nodes", "showarrow": False,
                            "xanchor": "right", "font": {"size": 11, "color": "#666"}})
    label_y = 1.55 if agg else -0.6
    annotations += [{"x": x, "y": label_y, "xref": "x", "yref": "y", "text": t, "showarrow": False,
                     "font": {"size": 10, "color": "#444"}} for x, t in labels]
    fig.update_layout(
        title={"text": f"{html.escape(c.name)}: {s['nodes']} nodes, {s['gpus']} devices, {s['links']} links"
                       + (" (one marker per node)" if agg else ""), "font": {"size": 14}},
        xaxis={"visible": False}, yaxis={"visible": False, "range": [1.2 if agg else -1.0, 5.6]},
        height=height or (380 if agg else 520), margin={"l": 110, "r": 20, "t": 50, "b": 20},
        plot_bgcolor="white", hovermode="closest", legend={"itemsizing": "constant"},
        annotations=annotations, meta={"workbench": "topology", "aggregate": agg, "rail": rail},
    )
    if utilisation:
        link_colour_update(fig, utilisation)
    return fig


def _bw(edges: list[_Edge]) -> str:
    vals = sorted({round(e.GBps, 2) for e in edges})
    return f"{vals[0]:g} GB/s" if len(vals) == 1 else f"{vals[0]:g}–{vals[-1]:g} GB/s"


def _segments(pairs: list[tuple[tuple[float, float], tuple[float, float]]]) -> tuple[list[float | None],
                                                                                    list[float | None]]:
    xs: list[float | None] = []
    ys: list[float | None] = []
    for (x0, y0), (x1, y1) in pairs:
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    return xs, ys


def _traces(fig: Any, role: str) -> list[Any]:
    return [t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("role") == role]


def link_colour_update(fig: Any, utilisation: Mapping[str, float] | None) -> None:
    """Recolour the links of a `topology_figure` (a `go.Figure` or a displayed `FigureWidget`) in place.

    `utilisation` maps link ids (`Link.name`, e.g. ``"n0.g0<->n0.nvsw"``, either order) or link
    directions (``"n0.g0->n0.nvsw"``, as the simulator's links table names them; a link shows
    its busier direction) to the fraction of capacity in use (0–1; larger shows as the top bin). Links are drawn over the base layer
    in five colour bins (blue < 20 % … red ≥ 80 %) and their hover text shows the figure; in an
    aggregated figure a drawn link shows the largest utilisation of the links it stands for.
    `None` or `{}` clears the overlay. Cheap enough for a few updates per second.
    """
    meta = fig.layout.meta or {}
    agg, rail = bool(meta.get("aggregate")), bool(meta.get("rail"))
    hover = _traces(fig, "link-hover")
    bins = sorted(_traces(fig, "utilisation"), key=lambda t: t.meta["bin"])
    if not hover or not bins:
        raise ValueError("link_colour_update: not a topology_figure (no link traces found)")
    h = hover[0]
    edge_util: dict[str, float] = {}
    for key, value in (utilisation or {}).items():
        end_a, sep, end_b = str(key).partition("<->")
        if not sep:  # a direction of a link, as the flow simulator names them: "a->b"
            end_a, sep, end_b = str(key).partition("->")
        if not sep:
            continue
        ga, gb = group_of(end_a, agg, rail), group_of(end_b, agg, rail)
        for k in (f"{ga}<->{gb}", f"{gb}<->{ga}"):
            edge_util[k] = max(edge_util.get(k, 0.0), float(value))
    per_bin: list[list[tuple[tuple[float, float], tuple[float, float]]]] = [[] for _ in bins]
    texts: list[str] = []
    xs, ys = list(h.x), list(h.y)
    base_segments = _segment_lookup(fig)
    for i, (key, text) in enumerate(h.customdata):
        u = edge_util.get(key)
        if u is None:
            texts.append(text)
            continue
        texts.append(f"{text}<br><b>utilisation {u:.0%}</b>")
        level = sum(1 for edge in UTIL_EDGES if u >= edge)
        seg = base_segments.get(key)
        if seg is None:  # fall back to a short tick at the midpoint
            seg = ((xs[i] - 0.1, ys[i]), (xs[i] + 0.1, ys[i]))
        per_bin[level].append(seg)
    with fig.batch_update():
        for t, segs in zip(bins, per_bin):
            sx, sy = _segments(segs)
            t.x, t.y = sx, sy
            t.showlegend = bool(segs)
        h.hovertext = texts
        for t in _traces(fig, "links"):
            t.opacity = 0.35 if edge_util else (0.6 if t.meta.get("kind") == "pcie" else 0.9)


def _segment_lookup(fig: Any) -> dict[str, tuple[tuple[float, float], tuple[float, float]]]:
    """Link key -> its drawn endpoints, recovered from the vertex traces' positions."""
    where: dict[str, tuple[float, float]] = {}
    for t in _traces(fig, "vertices"):
        for vid, x, y in zip(t.customdata or (), t.x or (), t.y or ()):
            where[str(vid)] = (float(x), float(y))
    out = {}
    for key, _ in _traces(fig, "link-hover")[0].customdata:
        a, _, b = key.partition("<->")
        if a in where and b in where:
            out[key] = (where[a], where[b])
    return out


def update_in_place(target: Any, source: Any) -> None:
    """Copy the traces and layout of figure `source` into the displayed figure `target` (same structure)."""
    if len(target.data) != len(source.data):
        raise ValueError("update_in_place: the figures have different trace structures")
    with target.batch_update():
        for t, s in zip(target.data, source.data):
            t.update(s.to_plotly_json(), overwrite=True)
        target.layout.update(source.layout.to_plotly_json(), overwrite=True)
