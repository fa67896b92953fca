"""`TopologyBuilder` driven headless: set values, click, and check the figure's traces changed in place."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("anywidget")

from workbench.topology import load, load_cluster, loads  # noqa: E402
from workbench.widgets import TopologyBuilder  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _count(b: TopologyBuilder, kind: str) -> int:
    t = next(t for t in b.figure.data if t.meta["role"] == "vertices" and t.meta["kind"] == kind)
    return len(t.x)


def _segments(b: TopologyBuilder, kind: str) -> int:
    t = next(t for t in b.figure.data if t.meta["role"] == "links" and t.meta["kind"] == kind)
    return len(t.x or ()) // 3


@pytest.fixture
def b() -> TopologyBuilder:
    return TopologyBuilder("aws-p5:nodes=2")


def test_starts_from_the_preset(b: TopologyBuilder) -> None:
    assert b.cluster == load_cluster("aws-p5:nodes=2")
    assert b.preset.value == "aws-p5" and b.nodes.value == 2 and b.gpu.value == "H100-SXM"
    assert b.nics_per_gpu.value == 4 and b.fabric.value == "rail"
    assert _count(b, "gpu") == 16
    assert loads(b.yaml_text.value) == b.cluster


def test_the_figure_is_one_widget_updated_in_place(b: TopologyBuilder) -> None:
    fig = b.figure
    traces = list(fig.data)
    b.nodes.value = 3
    assert b.figure is fig and list(fig.data) == traces  # same trace objects, new data
    assert _count(b, "gpu") == 24 and len(b.cluster.nodes) == 3
    assert b.preset.value == "custom" and "edited" in b.cluster.name
    assert b.target.options == ("all nodes", "n0", "n1", "n2")


def test_add_and_remove_nodes(b: TopologyBuilder) -> None:
    b.add_node.click()
    assert len(b.cluster.nodes) == 3 and _count(b, "gpu") == 24 and b.nodes.value == 3
    b.target.value = "n0"
    b.remove_node.click()
    assert len(b.cluster.nodes) == 2 and _count(b, "nvswitch") == 2
    b.remove_node.click()
    b.remove_node.click()  # refused: a cluster keeps one node
    assert len(b.cluster.nodes) == 1 and "at least one node" in b.status.value


def test_edit_one_node_makes_a_heterogeneous_cluster(b: TopologyBuilder) -> None:
    b.target.value = "n1"
    b.gpu.value = "L40S"  # no NVLink: the builder switches the node to PCIe
    assert b.cluster.nodes[1].gpu == "L40S" and b.cluster.nodes[1].intra == "pcie"
    assert b.cluster.nodes[0].gpu == "H100-SXM"
    assert _count(b, "nvswitch") == 1 and b.intra.value == "pcie"
    b.gpus.value = 4
    assert b.cluster.nodes[1].gpus == 4 and b.cluster.nodes[1].nics == 16  # 4 NICs per GPU kept
    b.nics_per_gpu.value = 1
    assert b.cluster.nodes[1].nics == 4 and _count(b, "nic") == 32 + 4
    b.nic.value = "CX7-NDR-400G"
    assert b.cluster.nodes[1].nic == "CX7-NDR-400G"
    assert _count(b, "gpu") == 12
    b.target.value = "n0"  # controls follow the node being edited
    assert b.gpu.value == "H100-SXM" and b.gpus.value == 8


def test_fabric_controls(b: TopologyBuilder) -> None:
    assert _count(b, "spine") == 8 and _count(b, "leaf") == 32
    b.fabric.value = "switch"
    b.switch.value = "ethernet"
    assert _count(b, "switch") == 1 and _count(b, "spine") == 0 and _count(b, "leaf") == 0
    assert b.cluster.fabric.kind == "switch" and b.cluster.fabric.switch == "ethernet"
    b.fabric.value = "fat-tree"
    b.oversubscription.value = 4
    assert b.cluster.fabric.oversubscription == 4 and _segments(b, "fabric") > 0


def test_invalid_choice_keeps_the_last_good_cluster(b: TopologyBuilder) -> None:
    b.gpu.value = "RTX-4090"
    good = b.cluster
    b.intra.value = "nvswitch"
    assert b.cluster == good
    assert "nodes[0].intra: RTX-4090 has no NVLink" in b.status.value
    assert b.intra.value == "pcie"  # control shows the last good value again
    b.load_yaml("nodes: [{gpu: <b>H10</b>}]")
    assert b.cluster == good and "&lt;b&gt;H10" in b.status.value  # escaped


def test_preset_dropdown(b: TopologyBuilder) -> None:
    b.preset.value = "mixed"
    assert b.cluster == load_cluster("mixed:nodes=2")
    assert _count(b, "switch") == 1 and _count(b, "gpu") == 12
    b.preset.value = "dgx-h100"
    assert b.cluster.gpu_models() == {"H100-SXM": 16} and _count(b, "leaf") == 8


def test_yaml_export_and_load(b: TopologyBuilder, tmp_path: Path) -> None:
    b.nodes.value = 3
    assert loads(b.yaml) == b.cluster
    b.save_path.value = str(tmp_path / "mine.yaml")
    b.save_button.click()
    assert load(tmp_path / "mine.yaml") == b.cluster and "saved" in b.status.value
    b.yaml_text.value = b.yaml_text.value.replace("count: 3", "count: 5")
    b.apply_yaml.click()
    assert len(b.cluster.nodes) == 5 and _count(b, "gpu") == 40 and b.nodes.value == 5


def test_large_cluster_switches_to_the_aggregate_view(b: TopologyBuilder) -> None:
    b.nodes.value = 40
    assert _count(b, "node") == 40 and _count(b, "gpu") == 0
    b.nodes.value = 2
    assert _count(b, "node") == 0 and _count(b, "gpu") == 16


def test_renders_as_a_widget(b: TopologyBuilder) -> None:
    bundle = b._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle


# ---------------------------------------------------------------------------------------------
# a real browser: JupyterLab runs notebooks/01_topology.ipynb in Debian's chromium

ROOT = Path(__file__).resolve().parents[1]

_JS_CELLS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext || !w.sessionContext.session) return null;
  const k = w.sessionContext.session.kernel;
  return {status: k ? k.status : 'none', cells: w.content.widgets.map(c => ({type: c.model.type,
    count: c.model.type === 'code' ? c.model.executionCount : null,
    errors: c.model.type === 'code' ? Array.from({length: c.model.outputs.length}, (_, i) =>
      c.model.outputs.get(i).toJSON()).filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)
      : [],
    points: Array.from(c.node.querySelectorAll('.js-plotly-plot')).map(gd =>
      (gd.data || []).reduce((n, t) => n + (t.x ? t.x.length : 0), 0))}))};
}"""
_JS_RUN = """(i) => { const w = window.jupyterapp.shell.currentWidget; w.content.activeCellIndex = i;
  return window.jupyterapp.commands.execute('notebook:run-cell'); }"""


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_topology_notebook_in_jupyterlab(jupyter_lab, chromium) -> None:
    import time

    from playwright import sync_api

    lab = jupyter_lab(ROOT / "notebooks" / "01_topology.ipynb")  # stopped at teardown (tests/conftest.py)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.set_default_timeout(60_000)
            page.goto(lab.url("01_topology.ipynb"), timeout=90_000)
            page.wait_for_function(f"() => ({_JS_CELLS})() && ({_JS_CELLS})().status === 'idle'",
                                   timeout=120_000)
            cells = page.evaluate(_JS_CELLS)["cells"]
            for i in [i for i, c in enumerate(cells) if c["type"] == "code"]:
                page.evaluate(_JS_RUN, i)
                end = time.monotonic() + 120
                while True:
                    st = page.evaluate(_JS_CELLS)
                    assert not st["cells"][i]["errors"], st["cells"][i]["errors"]
                    if st["cells"][i]["count"] is not None and st["status"] == "idle":
                        break
                    assert time.monotonic() < end, f"cell {i} did not finish"
                    page.wait_for_timeout(200)
            page.wait_for_timeout(2000)
            st = page.evaluate(_JS_CELLS)
            builder = next(i for i, c in enumerate(st["cells"]) if c["type"] == "code" and c["points"]
                           and "add node" in page.evaluate(
                               "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i]"
                               ".node.innerText", i))
            before = st["cells"][builder]["points"][0]
            cell = page.locator(".jp-Notebook .jp-Cell").nth(builder)
            cell.get_by_role("button", name="add node").click()
            page.wait_for_function(
                f"(b) => ({_JS_CELLS})().cells[{builder}].points[0] > b", arg=before, timeout=30_000)
            text = page.inner_text("body")
            (ROOT / "reports").mkdir(exist_ok=True)
            cell.scroll_into_view_if_needed()
            page.screenshot(path=str(ROOT / "reports" / "browser-topology.png"))
            figures = sum(len(c["points"]) for c in page.evaluate(_JS_CELLS)["cells"])
        finally:
            browser.close()
    assert "Error displaying widget" not in text and "FigureWidget(" not in text and "VBox(children" not in text
    assert figures >= 3  # two figures plus the builder's FigureWidget
