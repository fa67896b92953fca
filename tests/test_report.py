"""`workbench.report` and `workbench demo`: a self-contained HTML file, escaped, plotly.js inlined once."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("plotly")

import plotly.graph_objects as go  # noqa: E402
from plotly.offline import get_plotlyjs  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.report import (  # noqa: E402
    Section,
    cluster_sections,
    figure_section,
    metrics_section,
    render_report,
    table_section,
    text_section,
    write_report,
)

pytestmark = pytest.mark.timeout(180)

PLOTLY_HEAD = get_plotlyjs()[:200]
EVIL = "<script>alert('x')</script>"


def _fig(y: list[float]) -> go.Figure:
    return go.Figure(go.Scatter(x=list(range(len(y))), y=y, name="series"))


def test_plotly_js_inlined_exactly_once_and_no_network(tmp_path: Path) -> None:
    path = write_report(tmp_path / "sub" / "r.html",
                        [figure_section("one", _fig([1, 2])), figure_section("two", _fig([3, 1, 2]))],
                        title="t")
    text = path.read_text()
    assert path.parent.is_dir() and text.startswith("<!DOCTYPE html>")
    assert text.count(PLOTLY_HEAD) == 1
    assert "<script src" not in text and "<link" not in text  # nothing fetched from the network
    assert text.count("cdn.plot.ly") == get_plotlyjs().count("cdn.plot.ly")  # only plotly.js's own defaults
    assert text.count("Plotly.newPlot") == 2
    assert text.index(PLOTLY_HEAD) < text.index("Plotly.newPlot")  # the library is loaded first


def test_no_plotly_when_no_figure(tmp_path: Path) -> None:
    text = render_report([metrics_section("m", {"step_s": 1.23456789, "ranks": 4})])
    assert PLOTLY_HEAD not in text and len(text) < 20_000
    assert "<td>step_s</td><td>1.235</td>" in text and "<td>ranks</td><td>4</td>" in text


def test_everything_given_as_text_is_escaped() -> None:
    df = pd.DataFrame({"name": [EVIL], "GBps": [12.5]})
    text = render_report([
        Section(EVIL, "<p>trusted body</p>", note=EVIL),
        table_section("table", df),
        metrics_section("metrics", {EVIL: EVIL}),
        text_section("prose", f"first {EVIL}\n\nsecond"),
        text_section("code", EVIL, pre=True),
    ], title=EVIL, subtitle=EVIL)
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "<p>trusted body</p>" in text  # a Section's html is the caller's, kept as is
    assert "<p>second</p>" in text


def test_tables_are_capped_and_say_so() -> None:
    df = pd.DataFrame({"i": range(500), "x": [0.123456789] * 500})
    text = render_report([table_section("big", df, max_rows=10)])
    assert text.count("</tr>") == 11 and "first 10 of 500 rows" in text and "0.1235" in text


def test_navigation_links_each_section() -> None:
    text = render_report([text_section("Step time", "a"), text_section("Links & paths", "b")])
    assert "href='#s-step-time'" in text and "id='s-step-time'" in text
    assert "id='s-links---paths'" in text


def test_no_sections_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match="no sections"):
        write_report(tmp_path / "r.html", [])


def test_cluster_sections() -> None:
    secs = cluster_sections("aws-p5:nodes=2")
    titles = [s.title for s in secs]
    assert titles == ["Cluster aws-p5:nodes=2", "Topology of aws-p5:nodes=2", "Paths in aws-p5:nodes=2",
                      "Spec of aws-p5:nodes=2 (YAML, loadable with load_cluster)"]
    assert secs[1].needs_plotly and not secs[0].needs_plotly
    assert "n0.g0 → n0.nvsw → n0.g1" in secs[2].html and "12.5" in secs[2].html
    assert "count: 2" in secs[3].html


def test_demo_command_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--cluster", "mixed", "--cluster", "aws-p5:nodes=2", "--steps", "0",
                 "--serve-requests", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert text.count(PLOTLY_HEAD) == 1 and text.count("Plotly.newPlot") == 2
    assert "Topology of mixed" in text and "Topology of aws-p5:nodes=2" in text
    assert main(["demo", "--out", str(out), "--cluster", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_demo_default_is_this_machine_and_a_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--steps", "0", "--serve-requests", "0"]) == 0  # the loops: test_dashboard_report
    text = out.read_text()
    assert "Topology of local" in text and "Topology of aws-p5:nodes=2" in text


@pytest.mark.browser
def test_report_renders_offline_in_a_real_browser(tmp_path: Path, chromium: dict) -> None:
    from playwright import sync_api

    path = write_report(tmp_path / "r.html", cluster_sections("mixed"), title="offline")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**chromium)
        try:
            page = browser.new_page()
            page.route("**/*", lambda r: r.abort() if not r.request.url.startswith("file:") else r.continue_())
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri(), timeout=60_000)
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            points = page.evaluate("document.querySelectorAll('.js-plotly-plot .point').length")
        finally:
            browser.close()
    assert not errors
    assert points >= 12 + 2 + 2 + 1  # GPUs, hosts, NICs, switch at least
