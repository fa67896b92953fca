"""A real browser: JupyterLab on 127.0.0.1 runs the notebooks with a live dashboard in Debian's chromium
(the quickstart's training run; 07's serving run with its prediction laid over it).

Checks what a user sees: every cell runs without an error output, the plotly figures and the
Dashboard's widgets render (no "Error displaying widget", no widget shown as plain text), and
the dashboard's figures hold more data after the run cell than when they were first shown.
Saves a screenshot to reports/browser-<name>.png. Skips only when /usr/bin/chromium or
Playwright is missing. Bounded in time: the server, the page and every wait have timeouts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 240
# notebook, report name, distinct dashboard states the browser must see while the run cell runs: the
# quickstart's starts empty (empty, partial, final); 07's shows the prediction before the run (prediction, ..., final)
NOTEBOOKS = [("00_quickstart.ipynb", "quickstart", 3), ("07_serving.ipynb", "serving", 2)]

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(params=NOTEBOOKS, ids=[name for _, name, _ in NOTEBOOKS])
def lab(jupyter_lab, request):
    """JupyterLab serving a copy of one notebook; (base url, token, folder, notebook, name, live states)."""
    notebook, name, states = request.param
    server = jupyter_lab(ROOT / "notebooks" / notebook)
    return server.base, server.token, server.dir, ROOT / "notebooks" / notebook, name, states


# JavaScript run in the page (window.jupyterapp exists because of expose_app_in_browser)
_JS_STATE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext) return null;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  return {status: kernel ? kernel.status : 'none', active: w.content.activeCellIndex,
          cells: w.content.widgets.map(c => ({type: c.model.type,
            count: c.model.type === 'code' ? c.model.executionCount : null,
            errors: c.model.type === 'code' ? Array.from({length: c.model.outputs.length},
              (_, i) => c.model.outputs.get(i).toJSON()).filter(o => o.output_type === 'error')
              .map(o => o.ename + ': ' + o.evalue) : []}))};
}"""

_JS_FIGURES = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  return w.content.widgets.map(c => Array.from(c.node.querySelectorAll('.js-plotly-plot')).map(gd => ({
    traces: (gd.data || []).length,
    points: (gd.data || []).reduce((n, t) => n + (t.x ? t.x.length : 0) + (t.y ? t.y.length : 0), 0),
    widget: !!gd.closest('.jupyter-widgets, .widget-box, .jp-OutputArea-output')
  })));
}"""

_JS_LONG_TASKS = """() => { window.__wbLongTasks = [];
  new PerformanceObserver(list => { for (const e of list.getEntries())
    window.__wbLongTasks.push([Math.round(e.startTime), Math.round(e.duration)]); }).observe({entryTypes: ['longtask']});
}"""

_JS_KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""

_JS_RUN = """(i) => {
  const w = window.jupyterapp.shell.currentWidget;
  w.content.activeCellIndex = i;
  window.jupyterapp.commands.execute('notebook:run-cell');  // not awaited: the cell is watched while it runs
  return true;
}"""


def _wait_cell(page, index: int, timeout: float, sample=None) -> dict:
    """Wait until cell `index` ran (fails on an error output); `sample()` is called while waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sample is not None:
            sample()
        st = page.evaluate(_JS_STATE)
        cell = st["cells"][index]
        if cell["errors"]:
            pytest.fail(f"cell {index} raised: {cell['errors']}")
        if cell["count"] is not None and st["status"] == "idle":
            return st
        page.wait_for_timeout(150)
    pytest.fail(f"cell {index} did not finish within {timeout} s")


def _settle(page, quiet_ms: int = 1500, timeout: float = 90.0) -> None:
    """Wait until the page had no long task (> 50 ms of main thread) for `quiet_ms`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        quiet = page.evaluate("""(q) => { const l = window.__wbLongTasks || [];
          const last = l.length ? l[l.length - 1][0] + l[l.length - 1][1] : 0;
          return performance.now() - last > q; }""", quiet_ms)
        if quiet:
            return
        page.wait_for_timeout(250)


def test_notebook_runs_in_chromium(lab, chromium):
    from playwright.sync_api import sync_playwright

    base, token, work, notebook, name, min_states = lab
    screenshot = ROOT / "reports" / f"browser-{name}.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1800})
            page_errors: list[str] = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{notebook.name}?reset&token={token}", timeout=90_000)
            page.wait_for_function(_JS_KERNEL_IDLE, timeout=120_000)
            page.evaluate(_JS_LONG_TASKS)
            cells = page.evaluate(_JS_STATE)["cells"]
            code = [i for i, c in enumerate(cells) if c["type"] == "code"]
            assert code, "the notebook has no code cells"
            first_seen: dict[tuple[int, int], int] = {}
            live: list[int] = []  # the dashboard's points in the browser, sampled while later cells run

            def sample() -> None:
                figs = page.evaluate(_JS_FIGURES)
                dash_cell = max(range(len(figs)), key=lambda ci: len(figs[ci]))
                if len(figs[dash_cell]) >= 4:
                    live.append(sum(f["points"] for f in figs[dash_cell]))

            t0 = time.monotonic()
            spans: dict[int, tuple[float, float]] = {}  # page time of each cell's start and end
            for i in code:  # every cell, in order, as "Run" does; figures are read after each one
                begin = page.evaluate("performance.now()")
                page.evaluate(_JS_RUN, i)
                _wait_cell(page, i, CELL_TIMEOUT_S, sample)
                spans[i] = (begin, page.evaluate("performance.now()"))
                _settle(page)  # let widget views and plots finish drawing before the next cell
                for ci, figs in enumerate(page.evaluate(_JS_FIGURES)):
                    for fi, f in enumerate(figs):
                        first_seen.setdefault((ci, fi), f["points"])
            elapsed = time.monotonic() - t0
            long_tasks = page.evaluate("window.__wbLongTasks || []")
            page.wait_for_timeout(2000)
            final = page.evaluate(_JS_FIGURES)
            text = page.inner_text("body")
            screenshot.parent.mkdir(exist_ok=True)
            dash = max(range(len(final)), key=lambda ci: len(final[ci]))
            page.evaluate("(ci) => window.jupyterapp.shell.currentWidget.content.widgets[ci].node"
                          ".scrollIntoView()", dash)
            page.wait_for_timeout(500)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()

    widget_errors = [e for e in page_errors if any(w in e.lower() for w in ("widget", "plotly", "anywidget"))]
    assert not widget_errors, f"JavaScript errors from widgets: {widget_errors}"
    assert "Error displaying widget" not in text
    assert "Failed to load model class" not in text
    for plain in ("FigureWidget(", "VBox(children", "FloatProgress(value"):
        assert plain not in text, f"a widget was shown as plain text ({plain}…): are the labextensions installed?"
    n_plots = sum(len(f) for f in final)
    assert n_plots >= 5, f"expected the dashboard's 5 plotly figures and more, found {n_plots}"
    assert len(final[dash]) >= 4, f"the dashboard cell shows {len(final[dash])} plotly figures"
    changed = [(ci, fi) for ci, figs in enumerate(final) for fi, f in enumerate(figs)
               if f["points"] != first_seen.get((ci, fi), f["points"])]
    assert any(ci == dash for ci, _ in changed), (
        f"no figure of the dashboard (cell {dash}) changed after the run cell; points first/now: "
        f"{[(first_seen.get((dash, fi)), f['points']) for fi, f in enumerate(final[dash])]}")
    assert screenshot.stat().st_size > 10_000
    # what the browser went through (recorded, not asserted: it depends on the machine's CPU and GPU)
    distinct = sorted(set(live))
    per_cell = {i: [d for s, d in long_tasks if b <= s <= e] for i, (b, e) in spans.items()}
    screenshot.with_suffix(".json").write_text(json.dumps({
        "seconds_all_cells": elapsed, "plots": n_plots, "dashboard_points_sampled_while_running": distinct,
        "long_tasks_per_cell": {i: {"count": len(v), "ms_total": sum(v), "ms_max": max(v, default=0),
                                    "cell_seconds": round((spans[i][1] - spans[i][0]) / 1e3, 2)}
                                for i, v in per_cell.items()}}, indent=2))
    assert len(distinct) >= min_states, (
        f"the dashboard should have redrawn in the browser while the run cell ran ({min_states} states or more); "
        f"sampled points: {distinct}")
    print(f"{notebook.name} ran in chromium in {elapsed:.1f} s; {n_plots} plots, changed: {changed}; "
          f"dashboard points seen live: {distinct}")
