"""Per-rank telemetry: timed spans of compute, collectives and transfers, and memory by category.

The recorder is cheap on the hot path: a span appends one tuple to a list; a background
thread swaps the list out every `flush_s` (50 ms) and ships it, with each memory category's
peak since the last batch, to the launcher as one JSON line over a TCP socket (or to a JSONL
file under torchrun without a launcher). Compute spans are split around the collectives and
transfers that run inside them, so a rank's events never overlap.

On CPU a span boundary is a `perf_counter()` reading. On CUDA it is a timing event
(`torch.cuda.Event(enable_timing=True)`, reused from a pool) recorded on the current
stream, so the span is the interval the device spent between the two points in its
stream, and nothing synchronises the device on the hot path. `step_done` resolves the
step's events in one go: it waits for the step's last event (the training loop has
normally synchronised already) and maps each event onto the host's `perf_counter`
timeline through one anchor per step, the step's first event, recorded while the stream
is idle (the step before ended with a synchronisation), so its device time is its host
time to within a few microseconds.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

MEMORY_CATEGORIES = ("weights", "gradients", "optimizer", "activations", "buffers")


class Recorder:
    """Records spans for one rank; `enabled=False` makes every call a no-op (the baseline).

    `cuda=True` times spans with CUDA events on the current stream (resolved per step in
    `step_done`) instead of host clock readings.
    """

    def __init__(self, rank: int, enabled: bool = True, cuda: bool = False) -> None:
        self.rank = rank
        self.enabled = enabled
        self.cuda = cuda
        self.step = 0
        self.events: list[tuple[Any, ...]] = []
        self.memory: dict[str, int] = dict.fromkeys(MEMORY_CATEGORIES, 0)
        self._peak: dict[str, int] = dict.fromkeys(MEMORY_CATEGORIES, 0)  # the most each held since the last `take`
        self.steps: list[dict[str, Any]] = []
        self.cost_s = 0.0  # time spent inside the recorder on the training thread
        self._open: list[Any] | None = None  # [op, start, flops, [segments]]
        self._lock = threading.Lock()
        # CUDA only: spans whose boundaries are events, waiting for `resolve`
        self._pending: list[tuple[Any, ...]] = []
        self._marks: list[Any] = []  # events recorded since the last resolve, in stream order
        self._anchor: tuple[Any, float] | None = None  # (first event of the step, its host time)
        self._pool: list[Any] = []  # resolved events, ready to be recorded again
        self._event_cls: Any = None
        if cuda:
            import torch

            self._event_cls = torch.cuda.Event

    def _now(self) -> Any:
        """A span boundary: a host clock reading on CPU, a recorded CUDA event on CUDA."""
        if not self.cuda:
            return time.perf_counter()
        ev = self._pool.pop() if self._pool else self._event_cls(enable_timing=True)
        ev.record()
        if self._anchor is None:  # the step's first boundary: the stream is idle, so device time = host time
            self._anchor = (ev, time.perf_counter())
        self._marks.append(ev)
        return ev

    # ----- spans -----
    @contextmanager
    def compute(self, op: str, flops: float = 0.0) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        c0 = time.perf_counter()
        now = self._now()
        outer = self._open
        if outer is not None:
            outer[3].append((outer[1], now))
        self._open = [op, now, flops, []]
        self.cost_s += time.perf_counter() - c0
        try:
            yield
        finally:
            c1 = time.perf_counter()
            end = self._now()
            op_, start, fl, segs = self._open
            segs.append((start, end))
            if self.cuda:
                self._pending.append(("compute", op_, fl, segs, self.step))
            else:
                total = sum(b - a for a, b in segs) or 1e-12
                with self._lock:
                    for a, b in segs:
                        self.events.append(("compute", op_, 0, "", -1, a, b, self.step, fl * (b - a) / total))
            self._open = outer
            if outer is not None:
                outer[1] = end
            self.cost_s += time.perf_counter() - c1

    @contextmanager
    def comm(self, kind: str, op: str, nbytes: int, group: str, peer: int = -1) -> Iterator[None]:
        """A collective (`kind="collective"`) or point-to-point transfer (`"transfer"`) of `nbytes`."""
        if not self.enabled:
            yield
            return
        c0 = time.perf_counter()
        start = self._now()
        if self._open is not None:
            self._open[3].append((self._open[1], start))
        self.cost_s += time.perf_counter() - c0
        try:
            yield
        finally:
            c1 = time.perf_counter()
            end = self._now()
            ev = (kind, op, int(nbytes), group, peer, start, end, self.step, 0.0)
            if self.cuda:
                self._pending.append(ev)
            else:
                with self._lock:
                    self.events.append(ev)
            if self._open is not None:
                self._open[1] = end
            self.cost_s += time.perf_counter() - c1

    def add_event(self, kind: str, op: str, nbytes: int, group: str, peer: int, start: float, end: float,
                  step: int) -> None:
        """A collective or transfer timed elsewhere (the native engine's profiler, `native_comm`), with
        `start`/`end` on the host's `perf_counter` clock; it may overlap the compute spans."""
        if not self.enabled:
            return
        with self._lock:
            self.events.append((kind, op, int(nbytes), group, int(peer), float(start), float(end), int(step), 0.0))

    def resolve(self) -> None:
        """CUDA: turn the pending spans' events into host times (waits for the last one) and
        recycle the events. Called by `step_done`; the next boundary becomes the new anchor."""
        if not self._marks:
            return
        assert self._anchor is not None
        anchor, host = self._anchor
        self._marks[-1].synchronize()  # stream order: every earlier event is complete too
        at = {id(ev): host + anchor.elapsed_time(ev) * 1e-3 for ev in self._marks}
        rows: list[tuple[Any, ...]] = []
        for p in self._pending:
            if p[0] == "compute":
                _, op, fl, segs, step = p
                times = [(at[id(a)], at[id(b)]) for a, b in segs]
                total = sum(b - a for a, b in times) or 1e-12
                rows.extend(("compute", op, 0, "", -1, a, b, step, fl * (b - a) / total) for a, b in times)
            else:
                kind, op, nb, group, peer, a, b, step, fl = p
                rows.append((kind, op, nb, group, peer, at[id(a)], at[id(b)], step, fl))
        self._pool.extend(self._marks)
        self._marks, self._pending, self._anchor = [], [], None
        with self._lock:
            self.events.extend(rows)

    def set_memory(self, category: str, nbytes: int) -> None:
        self.memory[category] = v = int(nbytes)
        if v > self._peak[category]:
            self._peak[category] = v

    def add_memory(self, category: str, nbytes: int) -> None:
        self.set_memory(category, self.memory[category] + int(nbytes))

    def step_done(self, step: int, start: float, end: float, loss: float | None) -> None:
        if self._marks and self._open is None:
            c0 = time.perf_counter()
            self.resolve()
            self.cost_s += time.perf_counter() - c0
        with self._lock:
            self.steps.append({"step": step, "start": start, "end": end, "loss": loss, "cost_s": self.cost_s,
                               "telemetry": self.enabled})
        self.cost_s = 0.0

    def take(self) -> dict[str, Any]:
        """The records since the last call, as one JSON-ready batch."""
        with self._lock:
            ev, self.events = self.events, []
            st, self.steps = self.steps, []
        out: dict[str, Any] = {"type": "batch", "rank": self.rank, "events": ev, "steps": st}
        if self.enabled:
            # each category's most since the last batch: a peak between two samples (activations held only
            # inside a step) is not lost to when the sample was taken
            out["memory"] = [time.perf_counter(), dict(self._peak)]
            self._peak = dict(self.memory)
        return out


class Sink:
    """Where a rank's batches go: the launcher's socket (`host:port`) or a JSONL file."""

    def __init__(self, address: str | None, path: str | None) -> None:
        self._sock: socket.socket | None = None
        self._file: TextIO | None = None
        if address and address.startswith("unix:"):  # a path: reachable from other network namespaces too
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.connect(address[5:])
        elif address:
            host, _, port = address.rpartition(":")
            self._sock = socket.create_connection((host, int(port)), timeout=30)
            self._sock.settimeout(None)
        elif path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._file = open(path, "w")  # noqa: SIM115
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, separators=(",", ":")) + "\n"
        with self._lock:
            if self._sock is not None:
                self._sock.sendall(line.encode())
            elif self._file is not None:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self._sock.close()
                self._sock = None
            if self._file is not None:
                self._file.close()
                self._file = None


class Flusher(threading.Thread):
    """Ships the recorder's batches every `period` seconds (only step records when telemetry is off)."""

    def __init__(self, rec: Recorder, sink: Sink, period: float = 0.05) -> None:
        super().__init__(daemon=True, name="workbench-telemetry")
        self.rec, self.sink, self.period = rec, sink, period
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period):
            self.flush()

    def flush(self) -> None:
        if not self.rec.enabled and not self.rec.steps and not self.rec.events:
            return  # telemetry off (baseline steps): no work at all
        b = self.rec.take()
        if b["events"] or b["steps"] or "memory" in b:
            self.sink.send(b)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.flush()
