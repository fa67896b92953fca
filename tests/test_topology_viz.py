"""`workbench.viz.topology`: the layered figure, aggregation, utilisation overlay, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("plotly")

import plotly.graph_objects as go  # noqa: E402

import workbench.viz as viz  # noqa: E402
from workbench.topology import from_dict, load_cluster  # noqa: E402
from workbench.viz.topology import (  # noqa: E402
    LAYER_Y,
    UTIL_COLOURS,
    link_colour_update,
    link_width,
    topology_figure,
    update_in_place,
)

pytestmark = pytest.mark.timeout(120)


def _role(fig: go.Figure, role: str) -> list:
    return [t for t in fig.data if t.meta and t.meta["role"] == role]


def _vertices(fig: go.Figure, kind: str):
    return next(t for t in _role(fig, "vertices") if t.meta["kind"] == kind)


def _links(fig: go.Figure, kind: str):
    return next(t for t in _role(fig, "links") if t.meta["kind"] == kind)


def _segments(trace) -> int:
    xs = list(trace.x or ())
    assert len(xs) % 3 == 0 and all(x is None for x in xs[2::3])  # a, b, None per segment
    return len(xs) // 3


def test_every_vertex_and_link_is_drawn_in_layers() -> None:
    c = load_cluster("aws-p5:nodes=2")
    fig = topology_figure(c)
    counts = {t.meta["kind"]: len(t.x) for t in _role(fig, "vertices")}
    assert counts == {"spine": 8, "leaf": 32, "switch": 0, "nic": 64, "gpu": 16, "cpu": 0, "nvswitch": 2,
                      "host": 2, "node": 0}
    assert sum(_segments(t) for t in _role(fig, "links")) == len(c.graph.links)
    for kind in ("nvlink", "pcie", "efa", "fabric"):
        n = sum(1 for lk in c.graph.links if lk.kind == kind)
        assert _segments(_links(fig, kind)) == n
        assert _links(fig, kind).showlegend
    assert not _links(fig, "ib").showlegend and _segments(_links(fig, "ib")) == 0
    for kind in ("spine", "leaf", "nic", "gpu", "nvswitch", "host"):
        assert set(_vertices(fig, kind).y) == {LAYER_Y[kind]}
    # each node's GPUs sit inside its own band, left to right
    gx = dict(zip(_vertices(fig, "gpu").customdata, _vertices(fig, "gpu").x))
    assert max(gx[f"n0.g{j}"] for j in range(8)) < min(gx[f"n1.g{j}"] for j in range(8))
    assert len(_role(fig, "link-hover")[0].x) == len(c.graph.links)


def test_width_grows_with_bandwidth_and_colours_differ_by_kind() -> None:
    fig = topology_figure(load_cluster("aws-p5:nodes=2"))
    nv, efa = _links(fig, "nvlink"), _links(fig, "efa")
    assert nv.line.width > efa.line.width
    assert nv.line.color != efa.line.color
    assert link_width(450) > link_width(50) > link_width(12.5) > link_width(1.25)
    assert 0.5 <= link_width(0) and link_width(1e9) <= 6


def test_hover_shows_specs() -> None:
    fig = topology_figure(load_cluster("aws-p5:nodes=2"))
    gpu = dict(zip(_vertices(fig, "gpu").customdata, _vertices(fig, "gpu").hovertext))
    assert "H100 SXM5 80GB" in gpu["n0.g1"] and "3350 GB/s" in gpu["n0.g1"]
    assert "n0.nic4" in gpu["n0.g1"]  # the NICs that serve it
    nic = dict(zip(_vertices(fig, "nic").customdata, _vertices(fig, "nic").hovertext))
    assert "100 Gbps" in nic["n0.nic5"] and "serves n0.g1" in nic["n0.nic5"]
    links = _role(fig, "link-hover")[0]
    text = dict(zip([k for k, _ in links.customdata], links.hovertext))
    assert "nvlink: 450 GB/s per direction" in text["n0.g0<->n0.nvsw"]


def test_cpu_ranks_and_switch_fabric() -> None:
    local = from_dict({"nodes": [{"gpu": "CPU", "gpus": 3, "specs": {"fp32_tflops": 0.1, "memory_GBps": 7.0}}],
                       "fabric": {"kind": "switch", "switch": "ethernet"}})
    fig = topology_figure(local)
    assert len(_vertices(fig, "cpu").x) == 3 and len(_vertices(fig, "gpu").x) == 0
    assert _segments(_links(fig, "loopback")) == 3
    mixed = topology_figure(load_cluster("mixed"))
    assert len(_vertices(mixed, "switch").x) == 1 and len(_vertices(mixed, "nvswitch").x) == 1


def test_large_clusters_aggregate_per_node() -> None:
    c = load_cluster("aws-p5:nodes=128")
    fig = topology_figure(c)
    assert fig.layout.meta["aggregate"] is True
    assert len(_vertices(fig, "node").x) == 128
    assert len(_vertices(fig, "nic").x) == 0 and len(_vertices(fig, "gpu").x) == 0
    leaves = _vertices(fig, "leaf")
    assert len(leaves.x) == 4  # 32 rails x 4 leaf groups drawn as 4 groups
    total = sum(_segments(t) for t in _role(fig, "links"))
    assert total < 1000 < len(c.graph.links)
    # summed capacity is kept: every node's EFA bandwidth reaches its leaf group
    hover = _role(fig, "link-hover")[0]
    node_edges = [t for (k, _), t in zip(hover.customdata, hover.hovertext) if k.startswith("n5<->")]
    assert len(node_edges) == 1 and "32 efa links, 400 GB/s" in node_edges[0]
    assert "one marker per node" in fig.layout.title.text
    assert topology_figure(load_cluster("aws-p5:nodes=4"), aggregate=True).layout.meta["aggregate"] is True


def test_same_trace_structure_for_every_cluster() -> None:
    shapes = {tuple((t.meta["role"], t.meta.get("kind"), t.meta.get("bin")) for t in topology_figure(load_cluster(s)).data)
              for s in ("aws-p5:nodes=2", "mixed", "dgx-a100:nodes=40", "local")}
    assert len(shapes) == 1


def test_utilisation_overlay_bins_and_clears() -> None:
    c = load_cluster("dgx-h100:nodes=2")
    fig = topology_figure(c)
    bins = sorted(_role(fig, "utilisation"), key=lambda t: t.meta["bin"])
    assert len(bins) == len(UTIL_COLOURS) and all(_segments(t) == 0 for t in bins)
    efa = [lk.name for lk in c.graph.links if lk.kind == "ib"]
    util = {efa[0]: 0.05, efa[1]: 0.95, efa[2]: 1.7, "n0.nvsw<->n0.g3": 0.5}  # reversed order is accepted
    link_colour_update(fig, util)
    assert [_segments(t) for t in bins] == [1, 0, 1, 0, 2]
    assert [t.showlegend for t in bins] == [True, False, True, False, True]
    hover = _role(fig, "link-hover")[0]
    text = dict(zip([k for k, _ in hover.customdata], hover.hovertext))
    assert "utilisation 95%" in text[efa[1]] and "utilisation 50%" in text["n0.g3<->n0.nvsw"]
    # the overlay segment lies on the link it stands for
    a, b = efa[1].split("<->")
    pos = {v: (x, y) for t in _role(fig, "vertices") for v, x, y in zip(t.customdata, t.x, t.y)}
    hot = list(zip(bins[4].x, bins[4].y))
    assert pos[a] in hot and pos[b] in hot
    link_colour_update(fig, {})
    assert all(_segments(t) == 0 for t in bins)
    assert "utilisation" not in " ".join(hover.hovertext)
    with pytest.raises(ValueError, match="not a topology_figure"):
        link_colour_update(go.Figure(), util)


def test_utilisation_by_direction_shows_the_busier_one() -> None:
    fig = topology_figure(load_cluster("aws-p5:nodes=2"))
    link_colour_update(fig, {"n0.g0->n0.nvsw": 0.3, "n0.nvsw->n0.g0": 0.85, "nonsense": 1.0})
    bins = sorted(_role(fig, "utilisation"), key=lambda t: t.meta["bin"])
    assert [_segments(t) for t in bins] == [0, 0, 0, 0, 1]


def test_utilisation_in_an_aggregated_figure_takes_the_max() -> None:
    c = load_cluster("aws-p5:nodes=20")
    util = {"n3.nic0<->rail0.leaf0": 0.1, "n3.nic7<->rail7.leaf0": 0.9}
    fig = topology_figure(c, utilisation=util)
    hover = _role(fig, "link-hover")[0]
    hits = [t for t in hover.hovertext if "utilisation" in t]
    assert len(hits) == 1 and "utilisation 90%" in hits[0]


def test_update_in_place_on_a_figure_widget() -> None:
    pytest.importorskip("anywidget")
    fw = go.FigureWidget(topology_figure(load_cluster("aws-p5:nodes=2")))
    before = len(_vertices(fw, "gpu").x)
    update_in_place(fw, topology_figure(load_cluster("mixed:nodes=3")))
    assert before == 16 and len(_vertices(fw, "gpu").x) == 16 and len(_vertices(fw, "nvswitch").x) == 1
    assert fw.layout.title.text.startswith("mixed:nodes=3")
    with pytest.raises(ValueError, match="different trace structures"):
        update_in_place(fw, go.Figure())


def test_names_are_escaped_in_the_title() -> None:
    c = from_dict({"name": "<img src=x onerror=alert(1)>", "nodes": [{"gpu": "H100-SXM"}]})
    assert "<img" not in topology_figure(c).layout.title.text


def test_viz_namespace_is_lazy() -> None:
    assert viz.topology_figure is topology_figure
    assert "topology" in dir(viz)
    with pytest.raises(AttributeError, match="no 'no_such_builder'"):
        viz.no_such_builder  # noqa: B018


@pytest.mark.parametrize("module", ["workbench.viz", "workbench.widgets"])
def test_missing_plotly_names_the_notebook_extra(module: str) -> None:
    code = ("import sys; sys.modules['plotly'] = None; sys.modules['ipywidgets'] = None\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n"
            "    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ExtraMissing") and "'notebook' extra" in r.stdout


def test_topology_notebook_is_stored_without_outputs() -> None:
    import json
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "01_topology.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
