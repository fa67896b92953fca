"""`Transfer`, the light future of every transport operation: resolution once, waiting threads, timeouts,
callbacks, asyncio and the `concurrent.futures` bridge. Real threads; every wait is bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from transport import Cancelled, PeerGone, Transfer, TransferTimeout

pytestmark = pytest.mark.timeout(60)


def test_parts_resolve_once_and_later_outcomes_are_ignored() -> None:
    t = Transfer(1, "write 3 parts", "peer", parts=3)
    assert not t.done() and t.seconds is None
    assert not t.part_done() and not t.part_done()
    assert t.part_done()  # the last part resolves it, once
    assert t.done() and t.result(0.1) is None and t.exception(0.1) is None
    assert t.seconds is not None and t.seconds >= 0
    assert not t.part_done() and not t.succeed(5) and not t.fail(PeerGone("late"))
    assert t.result(0.1) is None and "done" in repr(t)


def test_failure_is_raised_by_result_and_returned_by_exception() -> None:
    t = Transfer(2, "write", "peer")
    assert t.fail(PeerGone("peer 'x' is gone"))
    with pytest.raises(PeerGone, match="is gone"):
        t.result(1.0)
    assert isinstance(t.exception(0.1), PeerGone)
    assert not t.succeed() and "failed" in repr(t)


def test_result_times_out_in_bounded_time_and_still_sees_a_later_success() -> None:
    t = Transfer(3, "write 4 B to p/1", "p")
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout, match="write 4 B to p/1"):
        t.result(0.05)
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(TransferTimeout):
        t.exception(0.01)
    t.succeed(7)
    assert t.result(0.01) == 7


def test_many_waiting_threads_all_wake_on_completion() -> None:
    t = Transfer(4, "expect", None)
    got: list[Any] = []
    started = threading.Barrier(9)

    def wait() -> None:
        started.wait(10)
        got.append(t.result(30))

    threads = [threading.Thread(target=wait) for _ in range(8)]
    for th in threads:
        th.start()
    started.wait(10)
    time.sleep(0.05)  # (not needed for correctness: waiters that come after completion return at once too)
    assert t.succeed("v")
    for th in threads:
        th.join(30)
    assert got == ["v"] * 8


def test_callbacks_run_once_in_order_and_a_failing_one_does_not_stop_the_rest() -> None:
    t = Transfer(5, "write", "p")
    seen: list[str] = []

    def bad(_t: Transfer) -> None:
        raise RuntimeError("a user callback bug")

    t.add_done_callback(lambda tr: seen.append(f"a{tr.tid}"))
    t.add_done_callback(bad)
    t.add_done_callback(lambda tr: seen.append(f"b{tr.tid}"))
    t.part_done()
    t.part_done()
    assert seen == ["a5", "b5"]
    t.add_done_callback(lambda tr: seen.append("late"))  # already resolved: runs at once
    assert seen == ["a5", "b5", "late"]


def test_cancel_fails_it_and_calls_the_cancel_hook_once() -> None:
    cancelled: list[int] = []
    t = Transfer(6, "write", "p", on_cancel=lambda tr: cancelled.append(tr.tid))
    assert t.cancel() and not t.cancel()
    with pytest.raises(Cancelled):
        t.result(1.0)
    assert cancelled == [6]


def test_await_and_the_concurrent_futures_bridge() -> None:
    ok, bad = Transfer(7, "write", "p"), Transfer(8, "write", "p")

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, lambda: threading.Thread(target=ok.succeed, args=(42,)).start())
        loop.call_later(0.02, lambda: threading.Thread(target=bad.fail, args=(PeerGone("gone"),)).start())
        value = await asyncio.wait_for(ok, 30)
        with pytest.raises(PeerGone):
            await asyncio.wait_for(bad, 30)
        return value

    assert asyncio.run(main()) == 42
    assert ok.future.result(1.0) == 42
    with pytest.raises(PeerGone):
        bad.future.result(1.0)
