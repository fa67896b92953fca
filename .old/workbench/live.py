"""The live view's data model: what a dashboard has received of a run, in the shape its traces need.

Depends only on the job core's stream (`workbench.core.stream.Update`) and the `Result` schema,
never on a runner, a simulator, plotly or widgets, so any live view (the ipywidgets dashboard,
a web page, a test) can use it:

- `LiveData`: each pushed chunk of Update rows turned into numpy arrays once; views
  (`timeline`, `predicted_timeline`, `latency`, `busiest_links`, `utilisation`, `memory`)
  cost the same however long the run has been going;
- `ServingLiveData`: the same for a serving run (finished requests, KV-cache occupancy per
  worker, KV hand-offs per link), with its prediction fed through the same views;
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
    served = np.sort(ev.loc[ev["op"] == "request", "end"].to_numpy(float)) if len(ev) and not has_steps else np.empty(0)
    if len(served):  # a serving run: progress counts finished requests, as its live stream does
        steps = len(served)
    edges = np.linspace(t_start, t_end, frames + 1)
    edges[0] = -np.inf
    for i in range(frames):
        lo, hi = edges[i], edges[i + 1]
        e = ev[(ev["end"] > lo) & (ev["end"] <= hi)]
        step = int((step_end <= hi).sum()) if has_steps else i + 1
        if len(served):
            step = int(np.searchsorted(served, hi, side="right"))
        yield Update(
            events=e, memory=mem[(mem["time"] > lo) & (mem["time"] <= hi)],
            links=links[(links["end"] > lo) & (links["end"] <= hi)],
            step=step, steps=steps, progress=(i + 1) / frames, t=float(hi),
        )


# ---------------------------------------------------------------- serving
SERVING_LATENCIES = ("ttft", "tpot", "e2el")
_REQUEST_COLUMNS = ("arrival", "end", "ttft", "tpot", "e2el", "output_tokens")


def _column(frame: pd.DataFrame, *names: str) -> np.ndarray:
    """The first of `names` that `frame` has, as floats (NaN where none)."""
    for name in names:
        if name in frame:
            return pd.to_numeric(frame[name], errors="coerce").to_numpy(float)
    return np.full(len(frame), np.nan)


def request_rows(events: pd.DataFrame | None) -> pd.DataFrame:
    """The finished requests of a serving run or simulation, in one shape (seconds): arrival, end,
    ttft, tpot, e2el, output_tokens.

    Both engines write a request as an event with op `request` (start = arrival); the runner's
    rows carry `ttft`/`tpot`/`e2el`, the simulator's `ttft_s`/`tpot_s`/`e2el_s` and `completed`.
    TPOT follows `vllm bench serve`: (E2EL − TTFT)/(output tokens − 1), NaN for one-token outputs.
    """
    if events is None or not len(events) or "op" not in events:
        return pd.DataFrame({c: np.empty(0) for c in _REQUEST_COLUMNS})
    r = events[events["op"] == "request"]
    out = pd.DataFrame({"arrival": _column(r, "start"), "end": _column(r, "end"),
                        "ttft": _column(r, "ttft", "ttft_s"), "tpot": _column(r, "tpot", "tpot_s"),
                        "e2el": _column(r, "e2el", "e2el_s"), "output_tokens": _column(r, "output_tokens")})
    ok = ~np.isnan(out["e2el"].to_numpy())
    if "completed" in r:
        ok &= r["completed"].fillna(False).astype(bool).to_numpy()
    return out[ok].reset_index(drop=True)


def transfer_label(device: str, links: Any) -> str:
    """What a KV transfer is drawn under: the simulator's `src->dst` device pair, else its first link."""
    if "->" in device:
        return device
    if isinstance(links, (tuple, list)) and links:
        return str(links[0])
    return device


class ServingLiveData:
    """What a dashboard has received of a serving run, and the same views of its prediction.

    Fed with Update rows (`add`): finished requests (op `request`), engine steps (their start
    marks when traffic began), KV-cache occupancy per worker (memory rows, category `kv_cache`)
    and KV hand-offs (op `kv_transfer`). Every view is in seconds since the first request
    arrived, so a run that started its server first and a simulation that starts at 0 overlay.
    `prediction` (a simulated serving Result) is fed through the same code once, into
    `self.predicted`; `summary()` puts both side by side with `vllm bench serve`'s names.
    """

    def __init__(self, prediction: Result | None = None, max_points: int = 4000) -> None:
        self.max_points = max_points
        self.n_events = 0
        self.n_requests = 0
        self.versions = {"requests": 0, "kv": 0, "transfers": 0}
        self._requests: list[np.ndarray] = []  # chunks of _REQUEST_COLUMNS rows
        self._kv: dict[int, list[np.ndarray]] = {}  # rank -> chunks of (time, bytes)
        self._transfers: dict[str, list[np.ndarray]] = {}  # label -> chunks of (end, GB/s, bytes)
        self.workers: dict[int, str] = {}  # rank -> worker name (the simulator names them)
        self._t0 = np.inf
        self.metrics: dict[str, Any] = {}
        self.predicted: ServingLiveData | None = None
        if prediction is not None:
            self.predicted = ServingLiveData(None, max_points)
            self.predicted.add(prediction.events, prediction.memory, prediction.links)
            self.predicted.metrics = dict(prediction.metrics)

    # ---- ingest
    def add(self, events: pd.DataFrame | None, memory: pd.DataFrame | None, links: pd.DataFrame | None = None) -> None:
        """Take one batch of Result-schema rows (`links` rows are not needed: transfers come as events)."""
        if events is not None and len(events):
            self.n_events += len(events)
            ops = events["op"].astype(str).to_numpy()
            steps = np.isin(ops, ("prefill", "decode", "mixed"))
            if steps.any():
                self._t0 = min(self._t0, float(events["start"].to_numpy(float)[steps].min()))
            req = request_rows(events) if (ops == "request").any() else None
            if req is not None and len(req):
                self._requests.append(req[list(_REQUEST_COLUMNS)].to_numpy(float))
                self._t0 = min(self._t0, float(req["arrival"].min()))
                self.n_requests += len(req)
                self.versions["requests"] += 1
            tx = events[ops == "kv_transfer"] if (ops == "kv_transfer").any() else None
            if tx is not None and len(tx):
                start, end = tx["start"].to_numpy(float), tx["end"].to_numpy(float)
                nbytes = tx["bytes"].fillna(0).to_numpy(float)
                rows = np.column_stack([end, nbytes / np.maximum(end - start, 1e-9) / 1e9, nbytes])
                labels = np.array([transfer_label(str(d), lk) for d, lk in zip(tx["device"], tx["links"])])
                for label in pd.unique(labels):
                    self._transfers.setdefault(str(label), []).append(rows[labels == label])
                self.versions["transfers"] += 1
        if memory is not None and len(memory):
            kv = memory[memory["category"].astype(str) == "kv_cache"]
            if len(kv):
                ranks = kv["rank"].to_numpy()
                rows = np.column_stack([kv["time"].to_numpy(float), kv["bytes"].to_numpy(float)])
                for r in pd.unique(ranks):
                    self._kv.setdefault(int(r), []).append(rows[ranks == r])
                if "worker" in kv:
                    for r, w in zip(ranks, kv["worker"].astype(str)):
                        self.workers.setdefault(int(r), w)
                self.versions["kv"] += 1

    # ---- views (seconds since the first request arrived)
    @property
    def t0(self) -> float:
        return float(self._t0) if np.isfinite(self._t0) else 0.0

    def requests(self) -> np.ndarray:
        """All finished requests so far as rows of (arrival, end, ttft, tpot, e2el, output_tokens)."""
        return np.concatenate(self._requests) if self._requests else np.empty((0, len(_REQUEST_COLUMNS)))

    def latency(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per latency (ttft, tpot, e2el): (finish time, seconds) of every finished request, by finish time."""
        req = self.requests()
        req = req[np.argsort(req[:, 1], kind="stable")]
        x = req[:, 1] - self.t0
        return {m: (x, req[:, 2 + i]) for i, m in enumerate(SERVING_LATENCIES)}

    def quantiles(self, q: float) -> dict[str, float]:
        """The q-th percentile (0–100) of each latency over the finished requests (NaN before the first)."""
        req = self.requests()
        out = {}
        for i, m in enumerate(SERVING_LATENCIES):
            v = req[:, 2 + i]
            v = v[~np.isnan(v)]
            out[m] = float(np.percentile(v, q)) if len(v) else float("nan")
        return out

    def throughput(self) -> tuple[np.ndarray, np.ndarray]:
        """Output tokens per second so far: tokens of the requests finished by t over (t − first arrival)."""
        req = self.requests()
        if not len(req):
            return np.empty(0), np.empty(0)
        req = req[np.argsort(req[:, 1], kind="stable")]
        x = req[:, 1] - self.t0
        tokens = np.cumsum(np.nan_to_num(req[:, 5]))
        return x, tokens / np.maximum(x, 1e-9)

    def kv(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """KV-cache bytes in use per worker rank over time (at most `max_points` samples each)."""
        out = {}
        for r in sorted(self._kv):
            rows = np.concatenate(self._kv[r])
            rows = rows[np.argsort(rows[:, 0], kind="stable")]
            if len(rows) > self.max_points:
                rows = rows[np.linspace(0, len(rows) - 1, self.max_points).astype(int)]
            out[r] = (rows[:, 0] - self.t0, rows[:, 1])
        return out

    def transfers(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per link (or device pair): (end time, GB/s) of every KV hand-off, the rate over its own span."""
        out = {}
        for label in sorted(self._transfers):
            rows = np.concatenate(self._transfers[label])
            rows = rows[np.argsort(rows[:, 0], kind="stable")][-self.max_points:]
            out[label] = (rows[:, 0] - self.t0, rows[:, 1])
        return out

    def x_max(self) -> float:
        """The latest time any view reaches (for lines drawn across a panel)."""
        ends = [self.requests()[:, 1].max() - self.t0] if self.n_requests else []
        ends += [float(x.max()) for x, _ in self.kv().values() if len(x)]
        return float(max(ends)) if ends else 0.0

    def figures(self) -> dict[str, float]:
        """The `vllm bench serve` numbers of the requests finished so far (median/p99 in ms, output tok/s)."""
        req = self.requests()
        out: dict[str, float] = {"completed": float(len(req))}
        for q, name in ((50, "median"), (99, "p99")):
            for m, value in self.quantiles(q).items():
                out[f"{name}_{m}_ms"] = value * 1e3
        for i, m in enumerate(SERVING_LATENCIES):
            v = req[:, 2 + i]
            v = v[~np.isnan(v)]
            out[f"mean_{m}_ms"] = float(v.mean()) * 1e3 if len(v) else float("nan")
        span = float(req[:, 1].max()) - self.t0 if len(req) else 0.0
        out["output_throughput"] = float(np.nansum(req[:, 5])) / span if span > 0 else float("nan")
        return out

    def summary(self) -> pd.DataFrame:
        """Measured so far beside the prediction: one row per metric (`vllm bench serve` names);
        error = simulated / measured − 1, as `workbench.compare` reports it."""
        keys = ("completed", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                "p99_tpot_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "output_throughput")
        mine = self.figures()
        theirs = self.predicted.figures() if self.predicted is not None else {}
        rows = []
        for k in keys:
            m, s = mine.get(k, float("nan")), theirs.get(k, float("nan"))
            err = s / m - 1.0 if k != "completed" and np.isfinite(m) and m != 0 and np.isfinite(s) else float("nan")
            rows.append({"metric": k, "measured": m, "simulated": s, "error": err})
        return pd.DataFrame(rows).set_index("metric")
