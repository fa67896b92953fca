"""The live view's data model: what a dashboard has received of a run, in the shape its traces need.

Depends only on the job core's stream (`workbench.core.stream.Update`) and the `Result` schema,
never on a runner, a simulator, plotly or widgets, so any live view (the ipywidgets dashboard,
a web page, a test) can use it:

- `LiveData`: each pushed chunk of Update rows turned into numpy arrays once; views
  (`timeline`, `predicted_timeline`, `latency`, `busiest_links`, `utilisation`, `memory`)
  cost the same however long the run has been going;
- `replay_updates(result, frames)`: a finished Result cut into Updates, to replay it;
- the array builders static figures share with the live view (`timeline_arrays`, `segments`,
  `align_prediction`, `latency_table`), so a static figure and the live view of the same
  data look the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from workbench.units import format_bytes

if TYPE_CHECKING:
    from workbench.core.stream import Update
    from workbench.result import Result

TIMELINE_KINDS = ("compute", "collective", "transfer", "idle")
LATENCY_KINDS = ("collective", "transfer", "compute")
PREDICTION_OFFSET = 0.32  # predicted rows sit this far below the measured row of the same rank
Segments = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, hover text of one timeline trace


# ---------------------------------------------------------------- timeline arrays
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


# ---------------------------------------------------------------- latency
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


# ---------------------------------------------------------------- live data
class LiveData:
    """What the dashboard has received so far, kept in the shape its traces need.

    Each pushed chunk is turned into numpy arrays once (`add`); a redraw only concatenates
    them, so its cost does not grow with the events already seen: the timeline keeps the most
    recent `max_events` segments per kind, latency keeps durations per op, links keep their
    rows per link, memory the latest sample per (rank, category).
    """

    def __init__(self, prediction: Result | None, max_events: int) -> None:
        self.max_events = max_events
        self.n_events = 0
        self.versions = {"events": 0, "links": 0, "memory": 0}  # bumped when a panel's data changes
        self.devices: dict[int, str] = {}
        self._segments: dict[str, list[Segments]] = {k: [] for k in TIMELINE_KINDS}
        self._segment_points: dict[str, int] = {k: 0 for k in TIMELINE_KINDS}
        self._durations: dict[tuple[str, str], list[np.ndarray]] = {}
        self._links: dict[str, list[np.ndarray]] = {}  # link -> chunks of (start, end, GBps, utilisation) rows
        self._carried: dict[str, float] = {}
        self._now = 0.0
        self._memory: dict[tuple[int, str], tuple[float, float]] = {}
        self._step_start: dict[Any, float] = {}
        self._pred_events = prediction.events if prediction is not None else None
        self._pred_base: tuple[tuple[int, ...], list[Any], dict[Any, list[Segments]]] | None = None
        self._pred_cache: tuple[Any, list[Segments]] | None = None
        self.predicted_p50: dict[str, float] = {}
        if prediction is not None:
            self._prepare_prediction(prediction.events)

    # ---- ingest
    def add(self, events: pd.DataFrame, memory: pd.DataFrame, links: pd.DataFrame) -> None:
        if events is not None and len(events):
            self._add_events(events)
            self.versions["events"] += 1
        if memory is not None and len(memory):
            self.versions["memory"] += 1
            for r, c, b, t in zip(memory["rank"].to_numpy(), memory["category"].astype(str), memory["bytes"].to_numpy(float),
                                  memory["time"].to_numpy(float)):
                key = (int(r), c)
                if key not in self._memory or t >= self._memory[key][0]:
                    self._memory[key] = (t, b)
        if links is not None and len(links):
            self.versions["links"] += 1
            rows = np.column_stack([links[c].to_numpy(float) for c in ("start", "end", "GBps", "utilisation")])
            names = links["link"].astype(str).to_numpy()
            for name in pd.unique(names):
                mine = rows[names == name]
                chunks = self._links.setdefault(name, [])
                chunks.append(mine)
                if len(chunks) > 64:  # compact, and keep the most recent max_events rows per link
                    self._links[name] = [np.concatenate(chunks)[-self.max_events:]]
                self._carried[name] = self._carried.get(name, 0.0) + float(np.sum(mine[:, 2] * (mine[:, 1] - mine[:, 0])))
            self._now = max(self._now, float(rows[:, 1].max()))

    def _add_events(self, events: pd.DataFrame) -> None:
        self.n_events += len(events)
        kinds = events["kind"].astype(str).to_numpy()
        ranks = events["rank"].to_numpy()
        start, end = events["start"].to_numpy(float), events["end"].to_numpy(float)
        ops = events["op"].astype(str).to_numpy()
        nbytes = events["bytes"].fillna(0).to_numpy(float)
        first = pd.unique(ranks)
        if any(int(r) not in self.devices for r in first):
            for r, d in zip(ranks, events["device"].astype(str)):
                self.devices.setdefault(int(r), d)
        for kind in np.unique(kinds):
            mask = kinds == kind
            if kind not in self._segments:
                continue
            seg = segments(start[mask], end[mask], ranks[mask].astype(float), ops[mask], nbytes[mask])
            chunks = self._segments[kind]
            chunks.append(seg)
            self._segment_points[kind] += len(seg[0])
            while self._segment_points[kind] - len(chunks[0][0]) >= 3 * self.max_events:
                self._segment_points[kind] -= len(chunks.pop(0)[0])
            if kind in LATENCY_KINDS:
                dur = end[mask] - start[mask]
                kops = ops[mask]
                for op in np.unique(kops):
                    d = self._durations.setdefault((str(op), str(kind)), [])
                    d.append(dur[kops == op])
                    if len(d) > 64:
                        d[:] = [np.concatenate(d)]
        if "step" in events:
            steps = events["step"].to_numpy()
            for step in pd.unique(steps):
                if pd.isna(step):
                    continue
                t0 = float(start[steps == step].min())
                if step not in self._step_start or t0 < self._step_start[step]:
                    self._step_start[step] = t0

    def _prepare_prediction(self, pred: pd.DataFrame) -> None:
        tab = latency_table(pred)
        self.predicted_p50 = dict(zip(tab["op"], tab["p50"].astype(float)))

    def _prediction_base(self, ranks: tuple[int, ...]) -> tuple[list[Any], dict[Any, list[Segments]]]:
        """Per predicted step, its segments for `ranks` with times relative to the step's start (cached)."""
        if self._pred_base is None or self._pred_base[0] != ranks:
            assert self._pred_events is not None
            pred = predicted_per_rank(self._pred_events, list(ranks))
            if "step" not in pred or not pred["step"].notna().any():
                pred = pred.assign(step=0)  # a one-step prediction: repeated under every measured step
            base: dict[Any, list[Segments]] = {}
            self._pred_len: dict[Any, float] = {}
            for step, rows in pred.groupby("step", sort=True):
                t0 = float(rows["start"].min())
                base[step] = [_shifted(timeline_arrays(rows, k, PREDICTION_OFFSET), -t0) for k in TIMELINE_KINDS]
                self._pred_len[step] = float(rows["end"].max()) - t0
            self._pred_base = (ranks, list(base), base)
        return self._pred_base[1], self._pred_base[2]

    # ---- views
    def timeline(self) -> list[Segments]:
        out = []
        for kind in TIMELINE_KINDS:
            chunks = self._segments[kind]
            if not chunks:
                out.append((np.empty(0), np.empty(0), np.empty(0, str)))
                continue
            x, y, t = (np.concatenate([c[i] for c in chunks]) for i in range(3))
            keep = 3 * self.max_events
            out.append((x[-keep:], y[-keep:], t[-keep:]))
        return out

    def predicted_timeline(self) -> list[Segments]:
        """The prediction under each measured rank and step: predicted step k (cycling) at measured step k's start."""
        empty = [(np.empty(0), np.empty(0), np.empty(0, str)) for _ in TIMELINE_KINDS]
        if self._pred_events is None or self._pred_events.empty or not self.devices:
            return empty
        ranks = tuple(sorted(self.devices))
        starts = tuple(sorted(self._step_start.items())) or ((0, 0.0),)  # no steps measured: from time 0
        key = (ranks, starts)
        if self._pred_cache is None or self._pred_cache[0] != key:
            steps, base = self._prediction_base(ranks)
            if not steps:
                return empty
            per_kind: list[list[Segments]] = [[] for _ in TIMELINE_KINDS]
            srcs = [steps[i % len(steps)] for i in range(len(starts))]
            where = step_positions(np.array([t for _, t in starts], float),
                                      np.array([self._pred_len[s] for s in srcs], float))
            for src, t0 in zip(srcs, where):
                for k, seg in enumerate(base[src]):
                    per_kind[k].append(_shifted(seg, float(t0)))
            keep = 3 * self.max_events
            arrays: list[Segments] = [
                (np.concatenate([c[0] for c in chunks])[-keep:], np.concatenate([c[1] for c in chunks])[-keep:],
                 np.concatenate([c[2] for c in chunks])[-keep:]) for chunks in per_kind]
            self._pred_cache = (key, arrays)
        return list(self._pred_cache[1])

    def latency(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        keys = sorted(self._durations, key=lambda ok: (ok[1], ok[0]))
        p50, p99 = np.empty(len(keys)), np.empty(len(keys))
        for i, key in enumerate(keys):
            d = np.concatenate(self._durations[key])
            p50[i], p99[i] = np.quantile(d, 0.5), np.quantile(d, 0.99)
        return [op for op, _ in keys], p50, p99

    def busiest_links(self, top: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        names = sorted(self._carried, key=lambda n: -self._carried[n])[:top]
        out = []
        for name in names:
            rows = np.concatenate(self._links[name])
            rows = rows[np.argsort(rows[:, 0], kind="stable")]
            x = np.append(rows[:, 0], rows[-1, 1])
            out.append((name, x, np.append(rows[:, 2], rows[-1, 2])))
        return out

    def utilisation(self, window: float) -> dict[str, float]:
        """Mean utilisation per link over the last `window` seconds of run time."""
        lo, out = self._now - window, {}
        for name, chunks in self._links.items():
            busy = 0.0
            for rows in reversed(chunks):
                s, e = np.clip(rows[:, 0], lo, None), np.clip(rows[:, 1], None, self._now)
                busy += float(np.sum(np.clip(e - s, 0.0, None) * rows[:, 3]))
                if rows[:, 0].min() < lo:
                    break
            out[name] = busy / window if window > 0 else 0.0
        return out

    def memory(self) -> tuple[list[int], dict[str, np.ndarray]]:
        ranks = sorted({r for r, _ in self._memory})
        cats = sorted({c for _, c in self._memory})
        pos = {r: i for i, r in enumerate(ranks)}
        out = {c: np.zeros(len(ranks)) for c in cats}
        for (r, c), (_, b) in self._memory.items():
            out[c][pos[r]] = b
        return ranks, out


def _shifted(seg: Segments, dt: float) -> Segments:
    return seg[0] + dt, seg[1], seg[2]


def replay_updates(result: Result, frames: int = 30) -> Iterable[Update]:
    """A finished Result cut into `frames` Updates by time (rows land in the frame in which they end)."""
    from workbench.core.stream import Update

    ev, mem, links = result.events, result.memory, result.links
    ends = [s for s in (ev["end"], mem["time"], links["end"]) if len(s)]
    t_end = float(max(s.max() for s in ends)) if ends else 0.0
    t_start = float(min(ev["start"].min() if len(ev) else 0.0, 0.0))
    has_steps = "step" in ev and len(ev) > 0 and bool(ev["step"].notna().any())
    step_end = ev.groupby("step")["end"].max() if has_steps else pd.Series(dtype=float)
    steps = len(step_end) if has_steps else frames
    edges = np.linspace(t_start, t_end, frames + 1)
    edges[0] = -np.inf
    for i in range(frames):
        lo, hi = edges[i], edges[i + 1]
        e = ev[(ev["end"] > lo) & (ev["end"] <= hi)]
        step = int((step_end <= hi).sum()) if has_steps else i + 1
        yield Update(
            events=e, memory=mem[(mem["time"] > lo) & (mem["time"] <= hi)],
            links=links[(links["end"] > lo) & (links["end"] <= hi)],
            step=step, steps=steps, progress=(i + 1) / frames, t=float(hi),
        )
