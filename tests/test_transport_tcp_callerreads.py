"""The tcp "caller reads" path: acks come back on the data socket of the write, and the caller waiting for a
one-lane write reads them itself instead of being woken by the lane's receiver thread.

Real engines and real sockets (in this process, or a peer process where the peer must be stopped); every wait
is bounded.
"""

from __future__ import annotations

import statistics
import threading
import time
import zlib
from typing import Any

import numpy as np
import pytest

from transport import Engine, TransferTimeout
from transport.backends import tcp as wire
from transport.testing import PeerProcess

pytestmark = pytest.mark.timeout(180)
KiB, MiB = 1 << 10, 1 << 20


def _ack_readers(engine: Engine) -> dict[str, int]:
    """Count, per thread name, the acks `engine` handles (wraps its message handler before any link exists)."""
    seen: dict[str, int] = {}
    handle = engine._on_message

    def spy(lane: wire.Lane, msg: tuple[int, ...]) -> None:
        if msg[0] == wire.ACK:
            name = threading.current_thread().name
            seen[name] = seen.get(name, 0) + 1
        handle(lane, msg)

    engine._on_message = spy  # type: ignore[method-assign]
    return seen


def test_a_waiting_caller_reads_its_own_acks() -> None:
    """Waited one-lane writes of 4 KiB .. 256 KiB land byte for byte, and their acks come back on the data lane
    where the writing thread reads them (the lane's receiver thread and the control lane see none or few)."""
    rng = np.random.default_rng(11)
    data = rng.integers(0, 255, 4 * MiB, dtype=np.uint8)
    with Engine(lanes=1) as rx, Engine(lanes=1) as tx:
        readers = _ack_readers(tx)
        got = np.zeros(4 * MiB, np.uint8)
        dst = rx.register(got)
        src = tx.register(data)
        tx.connect(dst.descriptor)
        n = 0
        for size in (4 * KiB, 64 * KiB, 256 * KiB):
            for i in range(40):
                off = (i * 7919 * KiB) % (4 * MiB - size)
                tx.write(src, dst.descriptor, size, src_offset=off, dst_offset=off).result(30)
                assert zlib.crc32(got[off:off + size]) == zlib.crc32(data[off:off + size])
                n += 1
        me = threading.current_thread().name
        assert sum(readers.values()) >= n - 1, readers  # (acks may merge; the first write's may take the slow path)
        assert readers.get(me, 0) >= n // 2, f"the caller read {readers.get(me, 0)} of {n} acks: {readers}"
        assert not any(name.endswith("-0-rx") for name in readers), f"acks on the control lane: {readers}"


def test_peer_writes_on_the_same_lane_are_handed_to_the_receiver_thread() -> None:
    """Both engines write waited one-lane writes to each other over the one link (lanes=1, the accepting side
    writes back over the connection it accepted): a caller reading its acks meets the peer's writes and hands
    them to the lane's receiver thread; everything lands, nothing waits past its timeout."""
    n, size = 150, 48 * KiB
    with Engine("tcp", lanes=1) as a, Engine("tcp", lanes=1) as b:
        da, db = a.register(np.zeros(n * size, np.uint8)), b.register(np.zeros(n * size, np.uint8))
        sa = a.register(np.random.default_rng(1).integers(0, 255, n * size, dtype=np.uint8))
        sb = b.register(np.random.default_rng(2).integers(0, 255, n * size, dtype=np.uint8))
        a.connect(db.descriptor)
        errors: list[BaseException] = []

        def writer(eng: Engine, src: Any, dst: Any) -> None:
            try:
                for i in range(n):
                    eng.write(src, dst, size, src_offset=i * size, dst_offset=i * size).result(30)
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)

        wa = threading.Thread(target=writer, args=(a, sa, db.descriptor), daemon=True)
        wb = threading.Thread(target=writer, args=(b, sb, da.descriptor), daemon=True)
        wa.start(), wb.start()
        wa.join(120), wb.join(120)
        assert not errors and not wa.is_alive() and not wb.is_alive(), errors
        assert len(a._all_links) == 1 and len(b._all_links) == 1, "the engines used more than the one link"
        assert zlib.crc32(db.obj) == zlib.crc32(sa.obj) and zlib.crc32(da.obj) == zlib.crc32(sb.obj)


def test_acks_sent_on_the_control_lane_still_complete_promptly() -> None:
    """A receiver whose data lane cannot send (fault injection delays it) acknowledges on the control lane: the
    caller reading the data lane sees its transfer completed by the control receiver within its polling slice,
    not after giving up on the data lane."""
    with Engine(lanes=1, chaos={"lane_delay": {0: 0.001}}) as rx, Engine(lanes=1) as tx:
        readers = _ack_readers(tx)
        got = np.zeros(MiB, np.uint8)
        dst = rx.register(got)
        src = tx.register(np.full(MiB, 5, np.uint8))
        tx.connect(dst.descriptor)
        lat = []
        for i in range(30):
            t0 = time.perf_counter()
            tx.write(src, dst.descriptor, 8 * KiB, src_offset=i * 8 * KiB, dst_offset=i * 8 * KiB).result(30)
            lat.append(time.perf_counter() - t0)
        assert (got[:30 * 8 * KiB] == 5).all()
        assert any(name.endswith("-0-rx") for name in readers), f"no ack took the control lane: {readers}"
        # the caller gives up on the data lane after wire.CALLER_READ_S (0.2 s): a median far below it shows
        # that the control receiver's completion was seen at once
        assert statistics.median(lat) < wire.CALLER_READ_S / 2, f"median {statistics.median(lat):.3f} s"


def test_waiting_on_a_stopped_peer_times_out_and_recovers() -> None:
    """The peer stops (SIGSTOP) before acknowledging: `result(timeout=2)` raises `TransferTimeout` in bounded
    time (the caller's reads never block); once the peer runs again the link still works."""
    p = PeerProcess("tcp", 4 * MiB, lanes=1)
    try:
        with Engine(lanes=1) as eng:
            src = eng.register(np.random.default_rng(3).integers(0, 255, 4 * MiB, dtype=np.uint8))
            eng.write(src, p.desc, 64 * KiB).result(30)  # connected; the lane reads acks in the caller
            p.stop()
            try:
                t = eng.write(src, p.desc, 256 * KiB)
                t0 = time.monotonic()
                with pytest.raises(TransferTimeout):
                    t.result(timeout=2)
                assert time.monotonic() - t0 < 30
            finally:
                p.resume()
            eng.write(src, p.desc, 64 * KiB, dst_offset=64 * KiB).result(30)
            assert eng.peers
    finally:
        p.close()
