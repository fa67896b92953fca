"""The simulate → run → compare part of the HTML report, and `workbench demo` running the whole loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("plotly")
sys.path.insert(0, str(Path(__file__).parent))

from test_dashboard import CLUSTER, _sim_like, synthetic_result  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.comparison import compare  # noqa: E402
from workbench.report import loop_sections, write_report  # noqa: E402


def test_loop_sections_from_results(tmp_path: Path) -> None:
    measured = synthetic_result(steps=4)
    measured.metrics.update(step_seconds=0.04, model="gpt:tiny", plan={"dp": 4}, steps=4)
    prediction = _sim_like(synthetic_result(steps=1, scale=0.8, source="sim"))
    prediction.metrics["step_seconds"] = 0.03
    secs = loop_sections(CLUSTER, prediction, measured, compare(prediction, measured), trace_path="t.json")
    titles = [s.title for s in secs]
    assert titles[0] == "Run vs prediction" and "Simulated vs measured, per step" in titles
    assert sum(s.needs_plotly for s in secs) == 4
    assert "-25" in secs[0].html  # step error % = (0.03 - 0.04) / 0.04
    html = write_report(tmp_path / "r.html", secs).read_text()
    assert html.count("Plotly.newPlot") == 4 and "predicted compute" in html


@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.html"
    assert main(["demo", "--out", str(out), "--cluster", "local", "--steps", "3", "--serve-requests", "8"]) == 0
    text = out.read_text()
    for title in ("Topology of local", "Run vs prediction", "Simulated vs measured, per step",
                  "Timeline: measured, with the prediction under each rank", "Link bandwidth",
                  "Memory per rank", "Latency per op", "Serving: measured (vllm bench serve metrics)",
                  "Serving: simulated vs measured", "after calibration",
                  "Serving: the run with its prediction laid over it", "KV cache in use per worker"):
        assert title in text, title
    assert "Not in this report yet" not in text
    trace = json.loads((tmp_path / "demo-trace.json").read_text())["traceEvents"]
    assert sum(1 for e in trace if e["ph"] == "X") >= 3 * 2 * 5  # 3 steps × 2 ranks × ≥5 events
