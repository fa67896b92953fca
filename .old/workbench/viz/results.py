"""Static plotly figures of a `Result`, and the array builders the live dashboard shares.

Each `*_arrays` function turns Result tables into plain numpy arrays (what a trace
needs; the timeline and latency builders live in `workbench.live`, the live view's data
model); each `*_figure` function wraps them into a `go.Figure`. The live
`workbench.widgets.Dashboard` assigns the same arrays to its FigureWidgets, so a static
figure and the live view of the same data look the same.

- `timeline_figure(result, prediction=None)`: one row per rank, a bar per event coloured
  by kind, the simulated prediction drawn thinner just under each measured row.
- `link_bandwidth_figure(result, top=8)`: GB/s per link over time (the busiest links).
- `memory_figure(result, cluster=None)`: bytes per rank stacked by category at each
  rank's peak, against the device's capacity.
- `latency_figure(result, prediction=None)`: p50 and p99 duration per op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.errors import require
from workbench.live import (  # noqa: F401 - the array builders, shared with the live view
    LATENCY_KINDS,
    PREDICTION_OFFSET,
    TIMELINE_KINDS,
    align_prediction,
    latency_table,
    predicted_per_rank,
    segments,
    step_positions,
    timeline_arrays,
)

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from workbench.result import Result
    from workbench.topology.model import Cluster

KIND_COLORS = {"compute": "#4C78A8", "collective": "#F58518", "transfer": "#54A24B", "idle": "#BAB0AC"}
CATEGORY_COLORS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6")
GB = 1e9


def _go() -> Any:
    return require("plotly.graph_objects", "notebook")


# ---------------------------------------------------------------- timeline
def rank_axis(ranks: Sequence[int], prediction: bool) -> dict[str, Any]:
    ranks = sorted(int(r) for r in ranks)
    vals: list[float] = [float(r) for r in ranks]
    text = [f"rank {r}" for r in ranks]
    if prediction:
        vals += [r + PREDICTION_OFFSET for r in ranks]
        text += ["  predicted"] * len(ranks)
    return {"tickvals": vals, "ticktext": text, "autorange": "reversed", "title": None}


def timeline_figure(result: Result, prediction: Result | None = None, title: str | None = None) -> go.Figure:
    """Events per rank over time, coloured by kind; the prediction (if given) under each rank."""
    go = _go()
    fig = go.Figure()
    measured = result.events
    for kind in TIMELINE_KINDS:
        x, y, text = timeline_arrays(measured, kind)
        if len(x):
            fig.add_trace(timeline_trace(go, kind, x, y, text, predicted=False))
    if prediction is not None:
        pred = align_prediction(prediction.events, measured)
        for kind in TIMELINE_KINDS:
            x, y, text = timeline_arrays(pred, kind, PREDICTION_OFFSET)
            if len(x):
                fig.add_trace(timeline_trace(go, kind, x, y, text, predicted=True))
    ranks = sorted(set(measured["rank"].dropna().astype(int)))
    fig.update_layout(**timeline_layout(ranks, prediction is not None, title or f"Timeline ({result.source})"))
    return fig


def timeline_trace(go: Any, kind: str, x: np.ndarray, y: np.ndarray, text: np.ndarray, predicted: bool) -> Any:
    return go.Scatter(
        x=x, y=y, text=text, mode="lines", hoverinfo="text+name", connectgaps=False,
        name=f"predicted {kind}" if predicted else kind, legendgroup=kind,
        line={"color": KIND_COLORS[kind], "width": 6 if predicted else 14},
        opacity=0.55 if predicted else 1.0,
    )


def timeline_layout(ranks: Sequence[int], prediction: bool, title: str) -> dict[str, Any]:
    return {
        "title": title, "xaxis": {"title": "seconds"}, "yaxis": rank_axis(ranks, prediction),
        "height": 140 + 45 * max(len(ranks), 1), "margin": {"l": 80, "r": 10, "t": 40, "b": 40},
        "legend": {"orientation": "h", "y": -0.25},
    }


# ---------------------------------------------------------------- link bandwidth
def busiest_links(links: pd.DataFrame, top: int = 8) -> list[str]:
    """Link ids ordered by bytes carried (GB/s × seconds), at most `top`."""
    if links.empty:
        return []
    carried = (links["GBps"] * (links["end"] - links["start"])).groupby(links["link"]).sum()
    return [str(k) for k in carried.sort_values(ascending=False).index[:top]]


def link_arrays(links: pd.DataFrame, link: str) -> tuple[np.ndarray, np.ndarray]:
    """A step line of one link's rate: x = interval starts (+ last end), y = GB/s (last repeated)."""
    rows = links[links["link"] == link].sort_values("start")
    if rows.empty:
        return np.empty(0), np.empty(0)
    x = np.append(rows["start"].to_numpy(float), rows["end"].to_numpy(float)[-1])
    gbps = rows["GBps"].to_numpy(float)
    return x, np.append(gbps, gbps[-1])


def link_bandwidth_figure(result: Result, top: int = 8, title: str | None = None) -> go.Figure:
    """GB/s carried per link over time, for the `top` busiest links."""
    go = _go()
    fig = go.Figure()
    for link in busiest_links(result.links, top):
        x, y = link_arrays(result.links, link)
        fig.add_trace(go.Scatter(x=x, y=y, name=link, mode="lines", line={"shape": "hv"}))
    fig.update_layout(**link_layout(title or f"Link bandwidth ({result.source})"))
    return fig


def link_layout(title: str) -> dict[str, Any]:
    return {"title": title, "xaxis": {"title": "seconds"}, "yaxis": {"title": "GB/s", "rangemode": "tozero"},
            "height": 320, "margin": {"l": 60, "r": 10, "t": 40, "b": 40}}


def link_utilisation(links: pd.DataFrame, now: float | None = None, window: float | None = None) -> dict[str, float]:
    """Time-weighted mean utilisation per link over [now - window, now] (whole run when window is None)."""
    if links.empty:
        return {}
    now = float(links["end"].max()) if now is None else now
    lo = -np.inf if window is None else now - window
    s = links["start"].clip(lower=lo).to_numpy(float)
    e = links["end"].clip(upper=now).to_numpy(float)
    span = np.clip(e - s, 0.0, None)
    busy = pd.Series(span * links["utilisation"].to_numpy(float)).groupby(links["link"].to_numpy()).sum()
    total = (now - lo) if window is not None else (now - float(links["start"].min()))
    if total <= 0:
        return {str(k): 0.0 for k in busy.index}
    return {str(k): float(v) / total for k, v in busy.items()}


# ---------------------------------------------------------------- memory
def memory_snapshot(memory: pd.DataFrame, how: str = "peak") -> pd.DataFrame:
    """Bytes per (rank, category) at each rank's peak total (`peak`) or at the last sample (`latest`)."""
    if memory.empty:
        return pd.DataFrame(columns=["rank", "category", "bytes"])
    if how == "latest":
        last = memory.sort_values("time", kind="stable").drop_duplicates(["rank", "category"], keep="last")
        return last[["rank", "category", "bytes"]].reset_index(drop=True)
    if how != "peak":
        raise ValueError(f"how: {how!r} is not 'peak' or 'latest'")
    out = []
    for rank, rows in memory.groupby("rank"):
        wide = rows.pivot_table(index="time", columns="category", values="bytes", aggfunc="last").sort_index().ffill()
        wide = wide.fillna(0.0)
        at = wide.sum(axis=1).idxmax() if how == "peak" else wide.index[-1]
        for cat, b in wide.loc[at].items():
            out.append({"rank": int(rank), "category": str(cat), "bytes": float(b)})
    return pd.DataFrame(out)


def rank_capacity(cluster: Cluster | None, ranks: Sequence[int], devices: Mapping[int, str] | None = None) -> np.ndarray:
    """Memory capacity in bytes of each rank's device (NaN when unknown)."""
    caps = np.full(len(ranks), np.nan)
    if cluster is None:
        return caps
    gpus = cluster.gpus
    for i, r in enumerate(ranks):
        dev = (devices or {}).get(int(r)) or (gpus[int(r)] if 0 <= int(r) < len(gpus) else None)
        try:
            caps[i] = cluster.gpu_spec(dev).memory_GB * GB if dev else np.nan
        except (ValueError, KeyError, TypeError):
            caps[i] = np.nan
    return caps


def rank_devices(events: pd.DataFrame) -> dict[int, str]:
    """rank -> device as the events name it."""
    if events.empty:
        return {}
    pairs = events[["rank", "device"]].dropna().drop_duplicates("rank")
    return {int(r): str(d) for r, d in zip(pairs["rank"], pairs["device"])}


def memory_figure(result: Result, cluster: Cluster | None = None, how: str = "peak",
                  title: str | None = None) -> go.Figure:
    """Memory per rank stacked by category (at each rank's peak), with the device capacity marked."""
    go = _go()
    snap = memory_snapshot(result.memory, how)
    ranks = sorted(snap["rank"].unique().tolist()) if len(snap) else []
    cats = sorted(snap["category"].unique().tolist()) if len(snap) else []
    values = {cat: memory_values(snap, cat, ranks) for cat in cats}
    caps = rank_capacity(cluster, ranks, rank_devices(result.events))
    total = np.sum(list(values.values()), axis=0) if values else np.zeros(0)
    scale, unit, axis = memory_axis(total, caps)
    fig = go.Figure()
    for i, cat in enumerate(cats):
        fig.add_trace(go.Bar(x=[f"rank {r}" for r in ranks], y=values[cat] / scale,
                             name=cat, marker_color=CATEGORY_COLORS[i % len(CATEGORY_COLORS)]))
    if np.isfinite(caps).any():
        fig.add_trace(capacity_trace(go, ranks, caps / scale))
    fig.update_layout(**memory_layout(title or f"Memory per rank ({how}, {result.source})"))
    fig.update_layout(yaxis=axis)
    return fig


def memory_values(snap: pd.DataFrame, category: str, ranks: Sequence[int]) -> np.ndarray:
    by_rank = snap[snap["category"] == category].set_index("rank")["bytes"]
    return np.array([float(by_rank.get(r, 0.0)) for r in ranks])


def memory_axis(totals: np.ndarray, capacity: np.ndarray) -> tuple[float, str, dict[str, Any]]:
    """(bytes per unit, unit, y-axis settings) for stacked memory bars.

    The unit follows the largest total (GB, MB or kB). When the capacity is more than 20× the
    largest total, the axis stops at the bars (the capacity marker would flatten them) and its
    title names the capacity as off scale.
    """
    top = float(np.nanmax(totals)) if len(totals) else 0.0
    cap = float(np.nanmax(capacity)) if len(capacity) and np.isfinite(capacity).any() else float("nan")
    scale, unit = next(((s, u) for s, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")) if top >= s), (1e3, "kB"))
    if np.isfinite(cap) and top > 0 and cap > 20 * top:
        return scale, unit, {"title": f"{unit} (capacity {cap / 1e9:.3g} GB, off scale)",
                             "range": [0, 1.15 * top / scale], "autorange": False}
    return scale, unit, {"title": unit, "autorange": True, "rangemode": "tozero"}


def capacity_trace(go: Any, ranks: Sequence[int], caps: np.ndarray) -> Any:
    """Black bars at each rank's capacity (`caps` already in the axis unit)."""
    return go.Scatter(x=[f"rank {r}" for r in ranks], y=caps, name="capacity", mode="markers",
                      marker={"symbol": "line-ew-open", "size": 36, "color": "#222", "line": {"width": 3}})


def memory_layout(title: str) -> dict[str, Any]:
    return {"title": title, "barmode": "stack", "yaxis": {"title": "GB", "rangemode": "tozero"},
            "height": 320, "margin": {"l": 60, "r": 10, "t": 40, "b": 40}}


# ---------------------------------------------------------------- latency
def latency_figure(result: Result, prediction: Result | None = None, title: str | None = None) -> go.Figure:
    """p50 and p99 duration per op (ms, log scale); predicted p50 as markers when a prediction is given."""
    go = _go()
    tab = latency_table(result.events)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=tab["op"].tolist(), y=tab["p50"].to_numpy(float) * 1e3, name="p50", marker_color="#4C78A8"))
    fig.add_trace(go.Bar(x=tab["op"].tolist(), y=tab["p99"].to_numpy(float) * 1e3, name="p99", marker_color="#E45756"))
    if prediction is not None:
        pred = latency_table(prediction.events).set_index("op")["p50"]
        ops = [op for op in tab["op"] if op in pred.index]
        fig.add_trace(predicted_latency_trace(go, ops, np.array([pred[op] for op in ops]) * 1e3))
    fig.update_layout(**latency_layout(title or f"Latency per op ({result.source})"))
    return fig


def predicted_latency_trace(go: Any, ops: Sequence[str], ms: np.ndarray) -> Any:
    return go.Scatter(x=list(ops), y=ms, name="predicted p50", mode="markers",
                      marker={"symbol": "diamond", "size": 11, "color": "#222"})


def latency_layout(title: str) -> dict[str, Any]:
    return {"title": title, "barmode": "group", "yaxis": {"title": "ms", "type": "log"},
            "height": 320, "margin": {"l": 60, "r": 10, "t": 40, "b": 80}}

