"""The dashboard's serving panels: a real serving run's updates with the simulator's prediction laid over them.

Fast tests replay `tests/data/serving_updates.json`: the `Update` frames of a real disaggregated run
(a random-weight Llama made with `transformers`, prefill and decode workers in two processes, KV
pages over the tcp transport), recorded with `python tests/test_live_serving.py --record`, and
simulate the same job. Notebook 07 (run under nbmake) attaches the dashboard to a live run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("plotly")
pytest.importorskip("ipywidgets")

import workbench as wb  # noqa: E402
from workbench.core.stream import Update  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.live import ServingLiveData, replay_updates, request_rows  # noqa: E402
from workbench.result import Result  # noqa: E402
from workbench.widgets.dashboard import Dashboard  # noqa: E402

HERE = Path(__file__).parent
RECORDED = HERE / "data" / "serving_updates.json"
PLAN = "prefill_workers=1,decode_workers=1,max_seqs=16,max_tokens=128,block=8"
TRAFFIC = "concurrency=2,isl=12,osl=6,requests=6"
SPEC = dict(num_pages=128, page_size=8, threads=1)


# ------------------------------------------------------------------ recorded frames
def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if "links" in df:
        df["links"] = [tuple(v) if isinstance(v, list) else () for v in df["links"]]
    return df


def load_recorded() -> tuple[Any, list[Update]]:
    """The recorded job and its Update frames."""
    raw = json.loads(RECORDED.read_text())
    job = wb.Job.from_dict(raw["job"])
    ups = [Update(_frame(u["events"]), _frame(u["memory"]), _frame(u["links"]), u["step"], u["steps"],
                  u["progress"], u["t"]) for u in raw["updates"]]
    return job, ups


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return list(json.loads(df.to_json(orient="records")))


def record(path: Path = RECORDED) -> None:
    """Serve TRAFFIC for real on a random Llama, disaggregated, and save every Update frame and the job."""
    sys.path.insert(0, str(HERE))
    import tempfile

    from serve_models import make_llama

    from workbench.serving import Serving

    with tempfile.TemporaryDirectory() as tmp:
        llama = make_llama(Path(tmp) / "llama")
        job = wb.Job.create("local", str(llama / "config.json"), PLAN, Serving(traffic=TRAFFIC))
        handle = wb.start(job, checkpoint=str(llama), **SPEC)
        ups = list(handle.updates(timeout=300))
        handle.wait(timeout=60)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"job": job.to_dict(), "updates": [
        {"events": _records(u.events), "memory": _records(u.memory), "links": _records(u.links), "step": u.step,
         "steps": u.steps, "progress": u.progress, "t": u.t} for u in ups]}, indent=None))


@pytest.fixture(scope="module")
def recorded() -> tuple[Any, list[Update], Result]:
    job, ups = load_recorded()
    return job, ups, wb.simulate(job)


def _traces(fig: Any) -> dict[str, int]:
    return {t.name: len(t.x) if t.x is not None else 0 for t in fig.data}


# ------------------------------------------------------------------ the data model
def test_request_rows_read_both_engines(recorded: Any) -> None:
    job, ups, pred = recorded
    measured = pd.concat([u.events for u in ups], ignore_index=True)
    got, want = request_rows(measured), request_rows(pred.events)
    assert len(got) == len(want) == 6                       # every request, measured and predicted
    for rows in (got, want):
        assert (rows["ttft"] > 0).all() and (rows["e2el"] >= rows["ttft"]).all()
        ok = rows["output_tokens"] > 1                      # vllm's TPOT: (E2EL − TTFT) / (tokens − 1)
        tpot = (rows["e2el"] - rows["ttft"]) / (rows["output_tokens"] - 1)
        assert np.allclose(rows.loc[ok, "tpot"], tpot[ok])
        assert np.allclose(rows["end"] - rows["arrival"], rows["e2el"])


def test_live_data_views_and_summary(recorded: Any) -> None:
    job, ups, pred = recorded
    data = ServingLiveData(pred)
    for u in ups:
        data.add(u.events, u.memory, u.links)
    assert data.n_requests == 6 and data.predicted is not None
    # throughput so far ends at total output tokens over the span from the first arrival
    req = data.requests()
    x, y = data.throughput()
    assert y[-1] == pytest.approx(req[:, 5].sum() / (req[:, 1].max() - data.t0))
    assert (x >= 0).all()
    # KV cache per worker: both workers, measured and predicted; the simulator names its workers
    assert set(data.kv()) == {0, 1} and set(data.predicted.kv()) == {0, 1}
    assert data.predicted.workers == {0: "prefill0", 1: "decode0"}
    assert max(float(b.max()) for _, b in data.kv().values()) > 0
    # KV hand-offs: one per prompt on the measured link, rates positive
    tx = data.transfers()
    assert list(tx) == ["prefill-0->decode-0"] and len(tx["prefill-0->decode-0"][0]) >= 5
    assert (tx["prefill-0->decode-0"][1] > 0).all() and data.predicted.transfers()
    tab = data.summary()
    assert tab.loc["completed", "measured"] == 6 and tab.loc["completed", "simulated"] == 6
    m, s = tab.loc["median_ttft_ms", "measured"], tab.loc["median_ttft_ms", "simulated"]
    assert m == pytest.approx(np.median(req[:, 2]) * 1e3)
    assert s == pytest.approx(pred.metrics["median_ttft_ms"], rel=1e-9)   # the same definition as the simulator's
    assert tab.loc["median_ttft_ms", "error"] == pytest.approx(s / m - 1)


def test_replay_counts_finished_requests(recorded: Any) -> None:
    job, ups, pred = recorded
    res = Result(pd.concat([u.events for u in ups], ignore_index=True),
                 pd.concat([u.memory for u in ups], ignore_index=True),
                 pd.concat([u.links for u in ups], ignore_index=True), {}, source="run", job=job)
    frames = list(replay_updates(res, frames=8))
    assert [f.steps for f in frames] == [6] * 8
    steps = [f.step for f in frames]
    assert steps == sorted(steps) and steps[-1] == 6 and steps[0] < 6


# ------------------------------------------------------------------ the dashboard
def test_dashboard_shows_the_prediction_then_the_run_over_it(recorded: Any) -> None:
    job, ups, pred = recorded
    dash = Dashboard(prediction=pred, max_fps=1000)
    assert dash.kind == "serving"
    figs = dash.figures()
    assert set(figs) == {"latency", "throughput", "kv_cache", "kv_transfer"}
    before = {p: _traces(f) for p, f in figs.items()}
    assert before["latency"]["predicted TTFT p50"] == 2 and before["latency"]["TTFT"] == 0
    assert before["throughput"]["predicted"] == 6 and before["throughput"]["measured"] == 0
    for u in ups:
        dash.push(u)
    dash.flush()
    after = {p: _traces(f) for p, f in figs.items()}
    assert after["latency"]["TTFT"] == after["latency"]["E2E"] == 6
    assert after["throughput"]["measured"] == 6 and after["throughput"]["predicted"] == 6
    assert after["kv_cache"]["rank 0"] > 0 and after["kv_cache"]["rank 1"] > 0
    assert after["kv_cache"]["predicted rank 1 (decode0)"] > 0
    assert after["kv_transfer"]["prefill-0->decode-0"] >= 5
    assert any(n.startswith("predicted ") and k > 0 for n, k in after["kv_transfer"].items())
    # the predicted p50 line sits at the prediction's own median
    line = next(t for t in figs["latency"].data if t.name == "predicted TTFT p50")
    assert line.y[0] == pytest.approx(pred.metrics["median_ttft_ms"])
    # the status counts finished requests; the table and the text fallback say the same
    text = dash.text()
    assert "requests 6/6" in text and "median_ttft_ms" in text and "predicted" in text
    bundle = dash._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert data["text/plain"].startswith(dash.title) and "application/vnd.jupyter.widget-view+json" in data
    assert "median_ttft_ms" in dash._serving.table.value
    assert dash.summary().loc["completed", "measured"] == 6


def test_dashboard_kind_from_the_prediction_and_by_name(recorded: Any) -> None:
    job, ups, pred = recorded
    bare = Result(pred.events, pred.memory, pred.links, pred.metrics, source="sim")  # no job: requests say serving
    assert Dashboard(prediction=bare).kind == "serving"
    assert Dashboard(kind="serving").kind == "serving" and Dashboard().kind == "training"
    with pytest.raises(WorkbenchError, match="kind"):
        Dashboard(kind="inference")


def test_replay_and_static_figure(recorded: Any) -> None:
    from workbench.viz.serving import serving_run_figure

    job, ups, pred = recorded
    res = Result(pd.concat([u.events for u in ups], ignore_index=True),
                 pd.concat([u.memory for u in ups], ignore_index=True),
                 pd.concat([u.links for u in ups], ignore_index=True), {}, source="run", job=job)
    dash = Dashboard(prediction=pred).replay(res, frames=5)
    assert _traces(dash.figures()["latency"])["TPOT"] == 6
    fig = serving_run_figure(res, pred)
    names = [t.name for t in fig.data]
    assert {"TTFT", "measured", "predicted", "rank 0", "prefill-0->decode-0"} <= set(names)
    assert any(n.startswith("predicted rank") for n in names)
    assert len({t.xaxis for t in fig.data}) == 4                       # four panels
    assert math.isfinite(float(np.nanmax(next(t for t in fig.data if t.name == "predicted").y)))


def test_attach_follows_the_recorded_stream(recorded: Any) -> None:
    """The dashboard's threads follow a RunHandle that streams the recorded frames and ends in their Result."""
    import threading

    from workbench.core.stream import RunHandle

    job, ups, pred = recorded
    res = Result(pd.concat([u.events for u in ups], ignore_index=True),
                 pd.concat([u.memory for u in ups], ignore_index=True),
                 pd.concat([u.links for u in ups], ignore_index=True), {"completed": 6}, source="run", job=job)
    handle = RunHandle(6)
    dash = Dashboard(prediction=pred, max_fps=20).attach(handle, timeout=60)

    def feed() -> None:
        for u in ups:
            handle._emit(u)
        handle._finish(res)

    threading.Thread(target=feed, daemon=True).start()
    assert dash.wait(timeout=120) is res
    assert _traces(dash.figures()["latency"])["E2E"] == 6
    assert dash.updates_pushed == len(ups) and "requests 6/6" in dash._status.value


if __name__ == "__main__":
    if "--record" in sys.argv:
        record()
        print(f"wrote {RECORDED}")
