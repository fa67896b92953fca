"""Fabric figures draw tables computed by the simulator's sweeps; they never run a simulator themselves."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("plotly")

from workbench.sim.p2p import write  # noqa: E402
from workbench.sim.sweeps import P2P_FABRICS, collective_curves, p2p_curves, published_busbw  # noqa: E402
from workbench.topology import load_cluster  # noqa: E402
from workbench.viz import fabrics  # noqa: E402

SIZES = (4096, 1 << 20, 1 << 26)


def test_p2p_curves_are_the_cost_model_and_the_figure_draws_them() -> None:
    from workbench.calibration.fit import transferengine_table

    curves = p2p_curves(sizes=SIZES)
    assert len(curves) == len(P2P_FABRICS) * len(SIZES)
    efa = curves[curves["system"] == "efa"]
    c = load_cluster("aws-p5en:nodes=2")
    assert efa["Gbps"].tolist() == [write(c, "n0.g0", "n1.g0", s).Gbps for s in SIZES]
    assert (curves.groupby("fabric")["Gbps"].apply(lambda g: g.is_monotonic_increasing)).all()
    fig = fabrics.p2p_figure(curves, published=transferengine_table())
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 3 and np.allclose(lines[0].y, curves[curves["fabric"] == lines[0].name[:-7]]["Gbps"])
    assert len([t for t in fig.data if t.mode == "markers"]) == 2  # EFA and CX-7 have published rows; NVLink none
    assert len(fabrics.p2p_figure(curves).data) == 3


def test_collective_curves_and_figure() -> None:
    curves = collective_curves({"one node": "dgx-h100:nodes=1"}, "all_reduce", SIZES)
    assert list(curves["bytes"]) == list(SIZES) and (curves["busbw_GBps"] > 0).all()
    pub = published_busbw("all_reduce")
    assert len(pub) and set(pub["op"]) == {"all_reduce"}
    fig = fabrics.collective_figure(curves, published=pub)
    assert len(fig.data) == 1 + len(pub) and "all_reduce" in fig.layout.title.text


def test_heatmap_from_a_links_table_and_builders_do_not_import_the_simulator() -> None:
    import pandas as pd

    links = pd.DataFrame({"link": ["a", "b"], "start": [0.0, 0.0], "end": [1e-3, 2e-3], "utilisation": [1.0, 0.5]})
    fig = fabrics.link_heatmap(links, bins=4)
    assert list(fig.data[0].y) == ["a", "b"] and fig.data[0].z[0][0] == pytest.approx(1.0)
    import ast

    tree = ast.parse(open(fabrics.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} - {
        n.module for b in tree.body if isinstance(b, ast.If) for n in ast.walk(b) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and m.startswith(("workbench.sim", "workbench.topology"))}, imported
