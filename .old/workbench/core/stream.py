"""The live telemetry stream of a real run: `Update` batches and the `RunHandle` that yields them.

A runner (`workbench.start(job)`) returns a `RunHandle` at once; the job runs in
separate processes, and while it runs the handle receives an `Update` (the new event,
memory and link rows in the `Result` schema, plus progress) every 50–100 ms. Consume them
with `for u in handle.updates(): ...` or `handle.subscribe(callback)`; `handle.wait()`
returns the measured `Result` or raises `RunFailed` naming the rank.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pandas as pd

from workbench.errors import RunFailed
from workbench.result import Result, events_frame, links_frame, memory_frame


@dataclass(frozen=True)
class Update:
    """One batch of telemetry since the previous update.

    `events` are Result-schema event rows (EVENT_COLUMNS plus `group` and `step`), `memory`
    rows (rank, category, bytes, time), `links` rows (link, start, end, GBps, utilisation);
    `step` is the last step every rank finished, `steps` the total, `progress` in [0, 1]
    and `t` seconds since the run started.
    """

    events: pd.DataFrame
    memory: pd.DataFrame
    links: pd.DataFrame
    step: int
    steps: int
    progress: float
    t: float

    @classmethod
    def empty(cls, step: int = 0, steps: int = 0, t: float = 0.0) -> Update:
        return cls(events_frame(), memory_frame(), links_frame(), step, steps,
                   step / steps if steps else 0.0, t)


_END = object()


class RunHandle:
    """A run in progress: stream its updates, wait for its `Result`, or cancel it."""

    def __init__(self, steps: int, cancel: Callable[[], None] | None = None) -> None:
        self.steps = steps
        self._cancel = cancel
        self._lock = threading.Lock()
        self._queues: list[queue.Queue[object]] = []
        self._callbacks: list[Callable[[Update], None]] = []
        self._history: list[Update] = []
        self._done = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._step = 0
        self.t0 = time.time()

    # ----- consumer side -----
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def progress(self) -> float:
        return self._step / self.steps if self.steps else 0.0

    @property
    def step(self) -> int:
        return self._step

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Every update from the start of the run, then new ones as they come; ends with the run.

        `timeout` bounds the wait for the next update (a `TimeoutError` when it passes).
        """
        q: queue.Queue[object] = queue.Queue()
        with self._lock:
            for u in self._history:
                q.put(u)
            if self._done.is_set():
                q.put(_END)
            else:
                self._queues.append(q)
        while True:
            try:
                item = q.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no telemetry update within {timeout} s") from None
            if item is _END:
                return
            assert isinstance(item, Update)
            yield item

    def subscribe(self, callback: Callable[[Update], None]) -> None:
        """Call `callback(update)` from a background thread for each update (past ones first)."""
        with self._lock:
            past = list(self._history)
            self._callbacks.append(callback)
        for u in past:
            _safe(callback, u)

    def wait(self, timeout: float | None = None) -> Result:
        """The measured `Result` once the run ends; raises `RunFailed` naming the rank that failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the run did not finish within {timeout} s (it goes on; cancel() stops it)")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop every rank now; `wait` then raises `RunFailed`."""
        if self._cancel is not None and not self.done:
            self._cancel()

    @property
    def updates_seen(self) -> int:
        return len(self._history)

    # ----- producer side (the launcher) -----
    def _emit(self, update: Update) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._step = update.step
            self._history.append(update)
            queues, callbacks = list(self._queues), list(self._callbacks)
        for q in queues:
            q.put(update)
        for cb in callbacks:
            _safe(cb, update)

    def _finish(self, result: Result | None = None, error: RunFailed | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._result, self._error = result, error
            if result is not None:
                self._step = self.steps
            self._done.set()
            queues = list(self._queues)
            self._queues.clear()
        for q in queues:
            q.put(_END)

    def __repr__(self) -> str:
        state = "failed" if self._error else "done" if self.done else "running"
        return f"RunHandle({state}, step {self._step}/{self.steps}, {len(self._history)} updates)"


def _safe(cb: Callable[[Update], None], u: Update) -> None:
    try:
        cb(u)
    except Exception as exc:  # a broken subscriber must not stop the run
        import sys

        print(f"workbench.runner: subscriber {cb!r} raised {exc!r}", file=sys.stderr)


__all__ = ["RunFailed", "RunHandle", "Update"]
