"""Self-contained HTML reports: a title, a list of `Section`s, plotly.js inlined once (works offline).

    from workbench.report import Section, figure_section, table_section, metrics_section, write_report
    write_report("reports/demo.html", [metrics_section("Summary", {"step_s": 1.2}),
                                       figure_section("Topology", fig)], title="Demo")

A `Section` is a title plus an HTML body; the helpers build bodies from a plotly figure, a
pandas DataFrame, a dict of metrics or plain text, escaping every string they are given.
Plotly figures are embedded without their library; `write_report` inlines plotly.js once in
the page's head when any section holds a figure, so the file opens without a network.
"""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PAGE_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#2c3e50;color:#fff;padding:16px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#ccd}main{padding:8px 32px 32px;max-width:1400px}
nav{margin:12px 0;font-size:13px}nav a{margin-right:14px;color:#2c3e50}
section{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px 20px;margin:16px 0}
section h2{font-size:17px;margin:4px 0 10px}
pre{background:#f6f8fa;padding:8px 12px;border-radius:4px;font-size:12px;overflow:auto;max-height:420px}
"""  # the page's own layout; tables, notes and value-object blocks take `workbench.display.CSS`


@dataclass(frozen=True)
class Section:
    """One part of a report: `title` (plain text, escaped on output) and `html` (trusted body).

    `needs_plotly` marks a body holding plotly figures, so the page inlines plotly.js.
    """

    title: str
    html: str
    needs_plotly: bool = False
    note: str = ""

    @property
    def anchor(self) -> str:
        return "s-" + "".join(ch if ch.isalnum() else "-" for ch in self.title.lower()).strip("-")


def figure_html(fig: Any) -> str:
    """A plotly figure as a `<div>` plus script, without plotly.js (the report adds it once)."""
    return str(fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False,
                                                                            "responsive": True}))


def figure_section(title: str, fig: Any, note: str = "") -> Section:
    return Section(title, figure_html(fig), needs_plotly=True, note=note)


def table_html(df: Any, float_format: str = "{:.4g}", max_rows: int = 200) -> str:
    """A pandas DataFrame as an escaped HTML table (at most `max_rows` rows, saying so)."""
    shown = df.head(max_rows)
    body = shown.to_html(index=False, classes=["wb-table", "wb-frame"], border=0, escape=True,
                         float_format=lambda v: float_format.format(v), na_rep="")
    if len(df) > max_rows:
        body += f"<p class='wb-note'>first {max_rows} of {len(df)} rows</p>"
    return str(body)


def table_section(title: str, df: Any, note: str = "", max_rows: int = 200) -> Section:
    return Section(title, table_html(df, max_rows=max_rows), note=note)


def metrics_html(metrics: Mapping[str, Any]) -> str:
    """A dict of metrics as an escaped two-column table (`workbench.display.kv_table`)."""
    from workbench.display import kv_table

    return kv_table(metrics.items(), header=("metric", "value"), none="")


def metrics_section(title: str, metrics: Mapping[str, Any], note: str = "") -> Section:
    return Section(title, metrics_html(metrics), note=note)


def text_section(title: str, text: str, pre: bool = False) -> Section:
    """Plain text (escaped), as paragraphs or as a preformatted block."""
    if pre:
        return Section(title, f"<pre>{html.escape(text)}</pre>")
    paras = "".join(f"<p>{html.escape(p)}</p>" for p in text.split("\n\n") if p.strip())
    return Section(title, paras)


def render_report(sections: Sequence[Section], title: str = "workbench report", subtitle: str = "") -> str:
    """The whole HTML page as a string (plotly.js inlined once when a section needs it)."""
    from workbench.display import STYLE

    e = html.escape
    head_js = ""
    if any(s.needs_plotly for s in sections):
        from workbench.errors import require

        offline = require("plotly.offline", "notebook")
        head_js = f"<script type='text/javascript'>{offline.get_plotlyjs()}</script>"
    made = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f"<a href='#{s.anchor}'>{e(s.title)}</a>" for s in sections)
    body = "".join(
        f"<section id='{s.anchor}'><h2>{e(s.title)}</h2>"
        + (f"<p class='wb-note'>{e(s.note)}</p>" if s.note else "") + s.html + "</section>"
        for s in sections
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{e(title)}</title>"
        f"<style>{_PAGE_CSS}</style>{STYLE}{head_js}</head><body>"
        f"<header><h1>{e(title)}</h1><p>{e(subtitle) + ' · ' if subtitle else ''}written {made} by workbench</p>"
        f"</header><main><nav>{nav}</nav>{body}</main></body></html>"
    )


def write_report(path: str | Path, sections: Sequence[Section], title: str = "workbench report",
                 subtitle: str = "") -> Path:
    """Write a self-contained HTML report (parent folders are created); returns the path."""
    path = Path(path)
    if not sections:
        from workbench.errors import WorkbenchError

        raise WorkbenchError("report: no sections to write (give at least one Section)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(sections, title, subtitle), encoding="utf-8")
    return path


def cluster_sections(cluster: Any, paths: Sequence[tuple[str, str]] | None = None) -> list[Section]:
    """The topology part of a report: summary, figure, example paths and the YAML spec of a cluster.

    `paths` defaults to the first GPU to its neighbour and, when there are several nodes, to
    the first GPU of the next node.
    """
    import pandas as pd

    from workbench.topology import dumps, load_cluster
    from workbench.topology.display import cluster_html
    from workbench.viz import topology_figure

    c = load_cluster(cluster)
    if paths is None:
        gpus = c.gpus
        pairs = [(gpus[0], gpus[1])] if len(gpus) > 1 and c.node_of(gpus[1]) == 0 else []
        if len(c.nodes) > 1:
            pairs.append((gpus[0], "n1.g0"))
        paths = pairs
    rows = []
    for a, b in paths:
        p = c.path(a, b)
        rows.append({"from": a, "to": b, "hops": " → ".join(p.hops), "link kinds": ", ".join(lk.kind for lk in p.links),
                     "bottleneck GB/s": p.bottleneck_GBps, "latency µs": round(p.latency_us, 3)})
    name = c.name
    return [
        Section(f"Cluster {name}", cluster_html(c, style=False)),
        figure_section(f"Topology of {name}", topology_figure(c),
                       note="hover a vertex or a link's midpoint for its specs; links coloured by kind, width by bandwidth"),
        table_section(f"Paths in {name}", pd.DataFrame(rows),
                      note="structural routes (ECMP by hash across spines); bandwidth per direction"),
        text_section(f"Spec of {name} (YAML, loadable with load_cluster)", dumps(c, "yaml"), pre=True),
    ]


def loop_sections(cluster: Any, prediction: Any, measured: Any, comparison: Any = None,
                  calibration: Mapping[str, Any] | None = None, trace_path: str | Path | None = None) -> list[Section]:
    """The simulate → run → compare part of a report: metrics, per-op table, the four result figures.

    `prediction` and `measured` are `Result`s of the same job (simulated and real); `comparison`
    a `workbench.comparison` table; `calibration` what `workbench.calibration.run.before_after` gives;
    `trace_path` where the measured run's Perfetto trace was written.
    """
    from workbench.viz.results import latency_figure, link_bandwidth_figure, memory_figure, timeline_figure

    pm, mm = prediction.metrics, measured.metrics
    summary: dict[str, Any] = {"cluster": getattr(cluster, "name", str(cluster)),
                               "model": mm.get("model", ""), "plan": str(mm.get("plan", "")),
                               "steps run": mm.get("steps", ""),
                               "step seconds, simulated": pm.get("step_seconds"),
                               "step seconds, measured": mm.get("step_seconds")}
    if pm.get("step_seconds") and mm.get("step_seconds"):
        summary["step error %"] = (float(pm["step_seconds"]) - float(mm["step_seconds"])) / float(mm["step_seconds"]) * 100
    for key in ("sim_error_pct_before", "sim_error_pct_after", "sim_step_seconds_after"):
        if calibration and calibration.get(key) is not None:
            summary[key.replace("sim_", "simulated ").replace("_", " ")] = calibration[key]
    out = [metrics_section("Run vs prediction", summary,
                           note="the prediction is workbench.sim.train.simulate_train of the same model and plan; "
                                "the run trains it for real over gloo on this machine's CPU ranks")]
    if comparison is not None:
        out.append(table_section("Simulated vs measured, per step", comparison,
                                 note="seconds per step by kind and op (error = (sim − measured) / measured)"))
    out += [
        figure_section("Timeline: measured, with the prediction under each rank", timeline_figure(measured, prediction),
                       note="thick: measured events; thin: predicted events, aligned to the start of each measured step"),
        figure_section("Link bandwidth", link_bandwidth_figure(measured)),
        figure_section("Memory per rank", memory_figure(measured, cluster),
                       note="at each rank's peak total, stacked by category; black bar: the device's capacity"),
        figure_section("Latency per op", latency_figure(measured, prediction),
                       note="p50 and p99 of the measured durations; black diamond: the predicted p50"),
    ]
    if trace_path is not None:
        out.append(text_section("Trace", f"The measured run as a Chrome/Perfetto trace: {trace_path} "
                                         "(open it in ui.perfetto.dev or chrome://tracing)."))
    return out
