"""Figures of serving simulations and runs: latency versus load, KV-cache occupancy over time, the search."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go


def load_figure(sweep: pd.DataFrame, metrics: tuple[str, ...] = ("mean_ttft_ms", "mean_tpot_ms")) -> go.Figure:
    """Latency versus offered load (`workbench.sim.serve.load_sweep`'s rows), one line per plan and metric."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    for j, key in enumerate(metrics, start=1):
        for name, g in sweep.groupby("plan", sort=False):
            fig.add_trace(go.Scatter(x=g["rate"], y=g[key], mode="lines+markers", name=str(name), legendgroup=str(name),
                                     showlegend=j == 1), row=1, col=j)
        fig.update_xaxes(title_text="request rate (req/s)", row=1, col=j)
        fig.update_yaxes(title_text="ms", type="log", row=1, col=j)
    fig.update_layout(template="plotly_white", height=380, title="latency versus load")
    return fig


def kv_figure(result: Any, title: str = "KV cache in use") -> go.Figure:
    """KV-cache bytes per worker over time against each pool's capacity (a Result's `kv_cache` memory rows)."""
    mem = result.memory
    kv = mem[mem["category"] == "kv_cache"]
    fig = go.Figure()
    for worker, g in kv.groupby("worker", sort=False):
        fig.add_trace(go.Scatter(x=g["time"], y=g["bytes"] / 2**30, mode="lines", name=f"{worker}"))
        cap = float(g["capacity"].iloc[0]) / 2**30 if "capacity" in g else None
        if cap:
            fig.add_hline(y=cap, line_dash="dot", annotation_text=f"{worker} pool")
    fig.update_layout(template="plotly_white", height=340, title=title, xaxis_title="time (s)",
                      yaxis_title="GiB per GPU")
    return fig


def search_figure(df: pd.DataFrame, top: int = 20) -> go.Figure:
    """Goodput per GPU of the best candidates of a serving search (colour: meets the SLO or not)."""
    d = df.dropna(subset=["goodput_per_gpu"]).head(top)
    fig = go.Figure(go.Bar(x=d["goodput_per_gpu"], y=d["plan"], orientation="h",
                           marker_color=["#2a9d8f" if ok else "#e76f51" for ok in d["ok"]],
                           hovertext=d["reason"]))
    fig.update_layout(template="plotly_white", height=max(300, 22 * len(d) + 100), title="serving search",
                      xaxis_title="goodput per GPU (req/s)", yaxis={"autorange": "reversed"})
    return fig


# ---------------------------------------------------------------- a serving run beside its prediction
# The live dashboard's serving panels and the static `serving_run_figure` draw the same series,
# built here from a `workbench.live.ServingLiveData`: each series is a dict of go.Scatter
# arguments with a stable `name`, so the live view updates traces in place by name.
SERVING_PANELS = ("latency", "throughput", "kv_cache", "kv_transfer")
LATENCY_COLOURS = {"ttft": "#4C78A8", "tpot": "#F58518", "e2el": "#54A24B"}
LATENCY_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2E"}
WORKER_COLOURS = ("#4C78A8", "#E45756", "#54A24B", "#B279A2", "#F58518", "#72B7B2", "#9D755D", "#FF9DA6")
PREDICTED = {"dash": "dash", "width": 1.5}


def serving_layouts(kv_unit: str = "MiB") -> dict[str, dict[str, Any]]:
    """The layout of each serving panel (titles say what the dashed lines are)."""
    base: dict[str, Any] = {"template": "plotly_white", "height": 330, "margin": {"l": 60, "r": 10, "t": 40, "b": 40},
                            "legend": {"font": {"size": 10}}, "xaxis": {"title": {"text": "seconds since the first request"}}}
    return {
        "latency": base | {"title": {"text": "Latency per request (dashed: predicted p50, dotted: p99)"},
                           "yaxis": {"title": {"text": "ms"}, "type": "log"}},
        "throughput": base | {"title": {"text": "Output tokens/s so far (dashed: predicted)"},
                              "yaxis": {"title": {"text": "tokens/s"}, "rangemode": "tozero"}},
        "kv_cache": base | {"title": {"text": "KV cache in use per worker (dashed: predicted)"},
                            "yaxis": {"title": {"text": kv_unit}, "rangemode": "tozero"}},
        "kv_transfer": base | {"title": {"text": "KV transfer rate per link (open: predicted)"},
                               "yaxis": {"title": {"text": "GB/s"}, "type": "log"}},
    }


def latency_series(data: Any) -> list[dict[str, Any]]:
    """TTFT, TPOT and E2E of every finished request (markers, at its finish time) and the predicted
    p50 (dashed) and p99 (dotted) of each, drawn across the panel."""
    out: list[dict[str, Any]] = []
    for m, (x, y) in data.latency().items():
        out.append({"name": LATENCY_LABELS[m], "x": x, "y": y * 1e3, "mode": "markers",
                    "marker": {"color": LATENCY_COLOURS[m], "size": 6}, "legendgroup": m})
    pred = data.predicted
    if pred is not None:
        x1 = max(data.x_max(), pred.x_max(), 1e-3)
        for q, dash in ((50, "dash"), (99, "dot")):
            for m, v in pred.quantiles(q).items():
                out.append({"name": f"predicted {LATENCY_LABELS[m]} p{q}", "x": np.array([0.0, x1]),
                            "y": np.array([v, v]) * 1e3, "mode": "lines", "legendgroup": m, "showlegend": q == 50,
                            "line": {"color": LATENCY_COLOURS[m], "dash": dash, "width": 1.5}})
    return out


def throughput_series(data: Any) -> list[dict[str, Any]]:
    """Output tokens per second of the requests finished so far, measured and predicted."""
    x, y = data.throughput()
    out = [{"name": "measured", "x": x, "y": y, "mode": "lines+markers", "line": {"color": "#4C78A8"},
            "marker": {"size": 4}}]
    if data.predicted is not None:
        px, py = data.predicted.throughput()
        out.append({"name": "predicted", "x": px, "y": py, "mode": "lines", "line": {"color": "#4C78A8"} | PREDICTED})
    return out


def kv_scale(data: Any) -> tuple[float, str]:
    """Bytes per unit and the unit name for the KV panel (MiB, or GiB once anything reaches 1 GiB)."""
    peak = 0.0
    for d in (data, data.predicted):
        if d is not None:
            peak = max([peak] + [float(y.max()) for _, y in d.kv().values() if len(y)])
    return (2.0**30, "GiB") if peak >= 2**30 else (2.0**20, "MiB")


def kv_series(data: Any) -> list[dict[str, Any]]:
    """KV-cache occupancy per worker rank over time (steps), measured solid, predicted dashed, one colour per rank."""
    scale, _ = kv_scale(data)
    out: list[dict[str, Any]] = []
    pred = data.predicted
    ranks = sorted(set(data.kv()) | (set(pred.kv()) if pred is not None else set()))
    colour = {r: WORKER_COLOURS[i % len(WORKER_COLOURS)] for i, r in enumerate(ranks)}
    for r, (x, y) in data.kv().items():
        out.append({"name": f"rank {r}", "x": x, "y": y / scale, "mode": "lines", "line": {"color": colour[r], "shape": "hv"},
                    "legendgroup": f"rank {r}"})
    if pred is not None:
        for r, (x, y) in pred.kv().items():
            who = pred.workers.get(r, "")
            out.append({"name": f"predicted rank {r}" + (f" ({who})" if who else ""), "x": x, "y": y / scale,
                        "mode": "lines", "line": {"color": colour[r], "shape": "hv"} | PREDICTED,
                        "legendgroup": f"rank {r}"})
    return out


def transfer_series(data: Any) -> list[dict[str, Any]]:
    """The rate of every KV hand-off (bytes over its own span) at its end time, per link; predicted as open markers."""
    out: list[dict[str, Any]] = []
    for i, (label, (x, y)) in enumerate(data.transfers().items()):
        out.append({"name": label, "x": x, "y": y, "mode": "markers",
                    "marker": {"color": WORKER_COLOURS[i % len(WORKER_COLOURS)], "size": 6}})
    if data.predicted is not None:
        for i, (label, (x, y)) in enumerate(data.predicted.transfers().items()):
            out.append({"name": f"predicted {label}", "x": x, "y": y, "mode": "markers",
                        "marker": {"color": WORKER_COLOURS[i % len(WORKER_COLOURS)], "size": 7, "symbol": "circle-open"}})
    return out


SERIES = {"latency": latency_series, "throughput": throughput_series, "kv_cache": kv_series,
          "kv_transfer": transfer_series}


def serving_run_figure(measured: Any, prediction: Any = None, height: int = 720) -> go.Figure:
    """A serving run (a measured Result) with its prediction laid over it: the dashboard's four serving
    panels as one static figure (latency per request, output throughput, KV cache per worker, KV transfers)."""
    from plotly.subplots import make_subplots

    from workbench.live import ServingLiveData

    data = ServingLiveData(prediction)
    data.add(measured.events, measured.memory, measured.links)
    layouts = serving_layouts(kv_scale(data)[1])
    fig = make_subplots(rows=2, cols=2, subplot_titles=[layouts[p]["title"]["text"] for p in SERVING_PANELS],
                        horizontal_spacing=0.1, vertical_spacing=0.14)
    for k, panel in enumerate(SERVING_PANELS):
        row, col = k // 2 + 1, k % 2 + 1
        for s in SERIES[panel](data):
            fig.add_trace(go.Scatter(**s), row=row, col=col)
        fig.update_yaxes(row=row, col=col, **layouts[panel]["yaxis"])
        fig.update_xaxes(row=row, col=col, title_text="s since the first request")
    fig.update_layout(template="plotly_white", height=height, legend={"font": {"size": 10}},
                      title="serving: measured (solid) and predicted (dashed/open)")
    return fig
