"""Completion objects: `Transfer` (a future of one operation) and `ImmCounter` (immediates by value).

Completion is by counting immediates, never by message order: `expect(imm, n)` is done
when `n` writes (or imm-only writes) tagged `imm` have fully landed, in whatever order the
lanes delivered them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from time import perf_counter
from typing import Any

from transport.errors import Cancelled, PeerGone, TransferTimeout, TransportError

_log = logging.getLogger(__name__)
PENDING, DONE, FAILED = 0, 1, 2


class Transfer:
    """Handle of one submitted operation (write, paged write, imm, send, expect).

    `result(timeout)` blocks and raises the transport error if it failed; `add_done_callback`
    takes `fn(transfer)`; `await transfer` works in asyncio; `cancel()` fails it with `Cancelled`.

    A light future: one plain lock guards the state, and a waiting thread sleeps on a second lock that
    completion releases (made only when a thread has to wait), so a write that is already complete when its
    caller asks costs no condition variable (`concurrent.futures.Future` builds one per object).
    """

    __slots__ = ("tid", "_what", "peer", "nbytes", "_remaining", "_lock", "_on_cancel", "submitted", "completed",
                 "lanes", "peers", "hooks", "lane", "_state", "_value", "_waiter", "_callbacks")

    def __init__(self, tid: int, what: str | tuple[Any, ...], peer: str | None, parts: int = 1, nbytes: int = 0,
                 on_cancel: Callable[[Transfer], None] | None = None) -> None:
        self.tid = tid
        self._what = what  # the description, or (format, *args) made into it when first asked for (`what`)
        self.peer = peer
        self.nbytes = nbytes
        self._remaining = parts
        self._lock = threading.Lock()
        self._on_cancel = on_cancel
        self.submitted = perf_counter()
        self.completed: float | None = None
        self.lanes: tuple[int, ...] = ()
        self.peers: tuple[str, ...] = ()  # every peer of a multi-peer batch (else empty: see `peer`)
        self.hooks: list[Callable[[], Any]] = []  # a data path's way to finish it in the waiting thread
        self.lane: Any = None  # a tcp lane whose acks complete it: the waiting caller reads them (`Lane.read_acks`)
        self._state = PENDING
        self._value: Any = None  # the result, or the exception once failed
        self._waiter: threading.Lock | None = None  # held until completion while a thread waits
        self._callbacks: list[Callable[[Transfer], Any]] | None = None

    @property
    def what(self) -> str:
        """What the operation is, for errors and logs ("write 65536 B to peer/3")."""
        w = self._what
        if type(w) is not str:
            w = self._what = w[0] % w[1:]
        return w  # type: ignore[return-value]

    # -- completion (engine side) --
    def part_done(self, n: int = 1) -> bool:
        """Count `n` finished parts; resolve when none remain. True when this call resolved it."""
        with self._lock:
            if self._state:
                return False
            self._remaining -= n
            if self._remaining > 0:
                return False
            self.completed = perf_counter()
            self._state = DONE
            waiter, callbacks = self._waiter, self._callbacks
        self._wake(waiter, callbacks)
        return True

    def succeed(self, value: Any = None) -> bool:
        return self._settle(DONE, value)

    def fail(self, exc: BaseException) -> bool:
        return self._settle(FAILED, exc)

    def _settle(self, state: int, value: Any) -> bool:
        """Resolve once with `value` (the result, or the exception when FAILED); False if already resolved."""
        with self._lock:
            if self._state:
                return False  # already resolved (failed, cancelled, timed out)
            if state == DONE:
                self.completed = perf_counter()
            self._value = value
            self._state = state
            waiter, callbacks = self._waiter, self._callbacks
        self._wake(waiter, callbacks)
        return True

    def _wake(self, waiter: threading.Lock | None, callbacks: list[Callable[[Transfer], Any]] | None) -> None:
        if waiter is not None:
            waiter.release()
        if callbacks:
            self._run(callbacks)

    def _run(self, callbacks: list[Callable[[Transfer], Any]]) -> None:
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # as concurrent.futures does: one bad callback neither stops the others nor the engine
                _log.exception("exception calling callback for %r", self)

    # -- user side --
    def _wait(self, timeout: float | None) -> bool:
        """Block until resolved or `timeout` passed; True when resolved."""
        with self._lock:
            if self._state:
                return True
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = threading.Lock()
                waiter.acquire()
        if waiter.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            waiter.release()  # the next waiting thread, if any, goes on too
            return True
        return bool(self._state)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for completion; raise the transfer's `TransportError`, or `TransferTimeout` after `timeout`."""
        if not self._state:
            if self.lane is not None and (timeout is None or timeout >= 1.0):
                self.lane.read_acks(self)  # the ack is read by this thread, not handed over by another
            if self.hooks and not self._state and (timeout is None or timeout >= 1.0):
                for hook in list(self.hooks):  # e.g. wait for the GPU copy here instead of being woken by a poller
                    hook()
            if not self._state and not self._wait(timeout):
                raise TransferTimeout(f"{self.what}: not complete after waiting {timeout} s in result()")
        if self._state == DONE:
            return self._value
        raise self._value

    wait = result

    def done(self) -> bool:
        return self._state != PENDING

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self._state and not self._wait(timeout):
            raise TransferTimeout(f"{self.what}: not complete after {timeout} s")
        return self._value if self._state == FAILED else None

    def add_done_callback(self, fn: Callable[[Transfer], Any]) -> None:
        """Call `fn(transfer)` once it is resolved (at once, in this thread, if it already is)."""
        with self._lock:
            if not self._state:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        self._run([fn])

    def cancel(self) -> bool:
        """Fail the transfer with `Cancelled` (unsent parts are dropped); False if already done."""
        if self.fail(Cancelled(f"{self.what}: cancelled")):
            if self._on_cancel is not None:
                self._on_cancel(self)
            return True
        return False

    @property
    def seconds(self) -> float | None:
        return None if self.completed is None else self.completed - self.submitted

    @property
    def future(self) -> Future[Any]:
        """A `concurrent.futures.Future` that resolves with this transfer (made on demand)."""
        fut: Future[Any] = Future()

        def copy(t: Transfer) -> None:
            if t._state == DONE:
                fut.set_result(t._value)
            else:
                fut.set_exception(t._value)

        self.add_done_callback(copy)
        return fut

    def __await__(self):  # type: ignore[no-untyped-def]
        return asyncio.wrap_future(self.future).__await__()

    def __repr__(self) -> str:
        state = ("pending", "done", "failed")[self._state]
        return f"Transfer({self.what!r}, peer={self.peer!r}, bytes={self.nbytes}, {state})"


class _Expectation:
    __slots__ = ("imm", "n", "peer", "transfer")

    def __init__(self, imm: int, n: int, peer: str | None, transfer: Transfer) -> None:
        self.imm, self.n, self.peer, self.transfer = imm, n, peer, transfer


class ImmCounter:
    """Counts arrived immediates per value; expectations consume counts, waits read totals.

    - `expect(imm, n)` -> `Transfer` done once `n` unconsumed arrivals of `imm` exist (they are
      consumed then; arrivals before the call count too).
    - `wait(imm, total, timeout)` blocks until `total(imm) >= total` (nothing consumed).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[int, int] = defaultdict(int)
        self._total: dict[int, int] = defaultdict(int)
        self._expect: dict[int, deque[_Expectation]] = defaultdict(deque)
        self._seq = 0

    def total(self, imm: int) -> int:
        with self._cond:
            return self._total.get(imm, 0)

    def value(self, imm: int) -> int:
        """Arrivals of `imm` not yet consumed by an expectation."""
        with self._cond:
            return self._pending.get(imm, 0)

    def add(self, imm: int, n: int = 1) -> None:
        fire: list[Transfer] = []
        with self._cond:
            self._pending[imm] += n
            self._total[imm] += n
            self._match(imm, fire)
            self._cond.notify_all()
        for t in fire:
            t.succeed(imm)

    def _match(self, imm: int, fire: list[Transfer]) -> None:
        q = self._expect.get(imm)
        while q:
            e = q[0]
            if e.transfer.done():
                q.popleft()
                continue
            if self._pending[imm] < e.n:
                break
            self._pending[imm] -= e.n
            q.popleft()
            fire.append(e.transfer)

    def expect(self, imm: int, n: int, peer: str | None = None) -> Transfer:
        if n < 1:
            raise ValueError(f"expect: n must be >= 1, got {n}")
        with self._cond:
            self._seq += 1
            t = Transfer(-self._seq, f"expect(imm={imm}, n={n})", peer, parts=n)
            self._expect[imm].append(_Expectation(imm, n, peer, t))
            fire: list[Transfer] = []
            self._match(imm, fire)
        for f in fire:
            f.succeed(imm)
        return t

    def wait(self, imm: int, total: int, timeout: float | None = None) -> int:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._total.get(imm, 0) >= total, timeout)
            if not ok:
                raise TransferTimeout(f"wait(imm={imm}): {self._total.get(imm, 0)} of {total} after {timeout} s")
            return self._total[imm]

    def fail_peer(self, peer: str, exc: TransportError) -> None:
        """Fail the expectations tied to `peer` (it is gone)."""
        with self._cond:
            doomed = [e for q in self._expect.values() for e in q if e.peer == peer]
        for e in doomed:
            e.transfer.fail(PeerGone(f"{e.transfer.what}: {exc}"))

    def fail_all(self, exc: TransportError) -> None:
        with self._cond:
            doomed = [e for q in self._expect.values() for e in q]
        for e in doomed:
            e.transfer.fail(Cancelled(f"{e.transfer.what}: {exc}"))
