"""Static plotly figures of a `Result`, and the array builders the live dashboard shares.

Each `*_arrays` function turns Result tables into plain numpy arrays (what a trace
needs); each `*_figure` function wraps them into a `go.Figure`. The live
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
from workbench.units import format_bytes

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from workbench.result import Result
    from workbench.topology.model import Cluster

KIND_COLORS = {"compute": "#4C78A8", "collective": "#F58518", "transfer": "#54A24B", "idle": "#BAB0AC"}
TIMELINE_KINDS = ("compute", "collective", "transfer", "idle")
CATEGORY_COLORS = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6")
PREDICTION_OFFSET = 0.32  # predicted rows sit this far below the measured row of the same rank
GB = 1e9


def _go() -> Any:
    return require("plotly.graph_objects", "notebook")


# ---------------------------------------------------------------- timeline
def timeline_arrays(events: pd.DataFrame, kind: str, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Line segments for one event kind: x = [start, end, nan, ...], y = [rank+offset, same, nan, ...].

    Drawing events as thick line segments separated by NaN keeps a whole kind in one trace
    (one SVG path), which is what lets the live timeline redraw thousands of events quickly.
    The hover texts come as a numpy string array (plotly copies those without a Python loop).
    """
    ev = events[events["kind"] == kind] if len(events) else events
    if len(ev) == 0:
        return np.empty(0), np.empty(0), np.empty(0, str)
    return segments(ev["start"].to_numpy(float), ev["end"].to_numpy(float), ev["rank"].to_numpy(float) + offset,
                    ev["op"].astype(str).to_numpy(), ev["bytes"].fillna(0).to_numpy(float))


def segments(start: np.ndarray, end: np.ndarray, y: np.ndarray, op: np.ndarray,
             nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The NaN-separated segment arrays of `timeline_arrays` from plain columns."""
    n = len(start)
    xs = np.full(3 * n, np.nan)
    ys = np.full(3 * n, np.nan)
    xs[0::3], xs[1::3] = start, end
    ys[0::3], ys[1::3] = y, y
    label = [f"{o} · {format_bytes(b)} · {(e - s) * 1e3:.3g} ms" for o, b, s, e in zip(op, nbytes, start, end)]
    text = np.full(3 * n, "", dtype=object)
    text[0::3] = label
    text[1::3] = label
    return xs, ys, text.astype(str)


def predicted_per_rank(prediction: pd.DataFrame, ranks: Sequence[int]) -> pd.DataFrame:
    """The predicted events for each of `ranks`.

    The simulator draws one representative rank per pipeline stage (its first rank, in
    Megatron order tp → cp → dp → pp), so a rank without predicted events of its own takes
    those of the nearest predicted rank below it: the first rank of its stage.
    """
    if prediction.empty or not len(ranks):
        return prediction
    have = np.array(sorted(int(r) for r in prediction["rank"].dropna().unique()))
    if not len(have):
        return prediction
    own = set(have.tolist())
    parts = [prediction[prediction["rank"] == r] for r in ranks if r in own]
    for r in ranks:
        if r in own:
            continue
        below = have[have <= r]
        src = int(below[-1]) if len(below) else int(have[0])
        parts.append(prediction[prediction["rank"] == src].assign(rank=r))
    return pd.concat(parts, ignore_index=True) if parts else prediction.iloc[:0]


def step_positions(measured_starts: np.ndarray, predicted_lengths: np.ndarray) -> np.ndarray:
    """Where each predicted step starts: at the measured step's start, unless that would make
    predicted steps overlap (the prediction is slower than the run); then end to end from the
    first measured step, so the drift shows instead of a pile-up."""
    if len(measured_starts) == 0:
        return measured_starts
    ends = measured_starts + predicted_lengths
    if np.all(ends[:-1] <= measured_starts[1:] + 1e-12):
        return measured_starts
    return measured_starts[0] + np.concatenate([[0.0], np.cumsum(predicted_lengths[:-1])])


def align_prediction(prediction: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """Place the predicted events under the measured ones, rank by rank and step by step.

    Every measured rank gets its predicted events (`predicted_per_rank`). When the measured
    events have a `step` column, predicted step k (cycling through the predicted steps; a
    prediction without a `step` column is one step) is shifted to start where measured step k
    started, so each step's pattern can be compared even when the run drifts or starts late
    (end to end instead when the predicted steps would overlap: `step_positions`).
    Otherwise the prediction is drawn from time 0 as it is.
    """
    if prediction.empty or measured.empty:
        return prediction
    prediction = predicted_per_rank(prediction, sorted(int(r) for r in measured["rank"].dropna().unique()))
    if "step" not in measured or not measured["step"].notna().any():
        return prediction
    if "step" not in prediction or not prediction["step"].notna().any():
        prediction = prediction.assign(step=0)
    pred_step = prediction["step"].to_numpy()
    pred_steps = sorted(pd.unique(prediction["step"].dropna()).tolist())
    p_start = prediction.groupby("step")["start"].min()
    p_len = prediction.groupby("step")["end"].max() - p_start
    m_start = measured.groupby("step")["start"].min()
    srcs = [pred_steps[i % len(pred_steps)] for i in range(len(m_start))]
    where = step_positions(m_start.to_numpy(float), np.array([p_len[s] for s in srcs], float))
    rows = {s: np.flatnonzero(pred_step == s) for s in pred_steps}
    idx, shift, step = [], [], []
    for m_step, src, t0 in zip(m_start.index, srcs, where):
        idx.append(rows[src])
        shift.append(np.full(len(rows[src]), float(t0) - float(p_start[src])))
        step.append(np.full(len(rows[src]), m_step))
    out = prediction.iloc[np.concatenate(idx)].reset_index(drop=True)
    d = np.concatenate(shift)
    out["start"] = out["start"].to_numpy(float) + d
    out["end"] = out["end"].to_numpy(float) + d
    out["step"] = np.concatenate(step)
    return out


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
LATENCY_KINDS = ("collective", "transfer", "compute")


def latency_table(events: pd.DataFrame, kinds: Sequence[str] = LATENCY_KINDS) -> pd.DataFrame:
    """p50 / p99 / count of event duration (seconds) per op, ops of `kinds` only."""
    ev = events[events["kind"].isin(kinds)] if len(events) else events
    if ev.empty:
        return pd.DataFrame(columns=["op", "kind", "count", "p50", "p99"])
    dur = (ev["end"] - ev["start"]).astype(float)
    g = dur.groupby([ev["op"].astype(str), ev["kind"].astype(str)])
    out = pd.DataFrame({"count": g.size(), "p50": g.quantile(0.5), "p99": g.quantile(0.99)}).reset_index()
    out.columns = ["op", "kind", "count", "p50", "p99"]
    return out.sort_values(["kind", "op"]).reset_index(drop=True)


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

