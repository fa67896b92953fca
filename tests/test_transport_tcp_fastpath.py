"""The tcp fast path: the buffered reader under partial reads, inline sends that the socket takes only in
part (the rest goes to the lane's sender and nothing cuts into it), and a peer that stops reading and dies.

Real sockets and a real peer process; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import zlib

import numpy as np
import pytest

from transport import Engine, PeerGone
from transport.backends import tcp as wire
from transport.testing import PeerProcess

pytestmark = pytest.mark.timeout(180)
KiB, MiB = 1 << 10, 1 << 20


def _dribble(sock: socket.socket, data: bytes, seed: int) -> None:
    """Send `data` in random small pieces with short pauses, so the reader sees every kind of partial read."""
    rng = np.random.default_rng(seed)
    i = 0
    while i < len(data):
        k = int(rng.integers(1, 97))
        sock.sendall(data[i:i + k])
        i += k
        if rng.random() < 0.05:
            time.sleep(0.001)
    sock.shutdown(socket.SHUT_WR)


def test_reader_reassembles_headers_and_payloads_split_anywhere() -> None:
    """Headers and payloads cut at random points, payloads smaller, equal to and larger than the reader's
    buffer, headers straddling its end: every message comes out whole."""
    lengths = [0, 1, 39, 40, 41, 100, 127, 128, 129, 300, 5000, 3, 64, 0, 1000]
    rng = np.random.default_rng(1)
    payloads = [rng.integers(0, 255, n, dtype=np.uint8).tobytes() for n in lengths]
    stream = b"".join(wire.pack(wire.WRITE, tid=i, length=len(p)) + p for i, p in enumerate(payloads))
    a, b = socket.socketpair()
    try:
        b.settimeout(30)
        writer = threading.Thread(target=_dribble, args=(a, stream, 2), daemon=True)
        writer.start()
        reader = wire.Reader(b, size=128)
        for i, p in enumerate(payloads):
            msg = reader.header()
            assert msg[0] == wire.WRITE and msg[4] == i and msg[8] == len(p)
            if i % 3 == 2:  # some payloads through read_bytes, the others into a view (zero copy path)
                assert reader.read_bytes(len(p)) == p
            else:
                dst = bytearray(len(p) + 8)
                reader.read_into(memoryview(dst)[4:4 + len(p)])
                assert bytes(dst[4:4 + len(p)]) == p and dst[:4] == b"\0" * 4 and dst[-4:] == b"\0" * 4
        with pytest.raises(PeerGone):
            reader.header()
        writer.join(10)
    finally:
        a.close()
        b.close()


def test_send_some_returns_the_unsent_tail() -> None:
    """A non-blocking gathered send stops where the socket is full and returns exactly the rest."""
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        data = np.random.default_rng(3).integers(0, 255, 4 * MiB, dtype=np.uint8).tobytes()
        bufs = [data[:40], memoryview(data)[40:3 * MiB], data[3 * MiB:]]
        rest = wire.send_some(a, bufs)
        sent = len(data) - sum(len(r) for r in rest)
        assert rest and 0 < sent < len(data)
        got = bytearray()

        def drain() -> None:
            b.settimeout(30)
            while len(got) < len(data):
                chunk = b.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        wire.send_gather(a, rest)
        t.join(30)
        assert bytes(got) == data
    finally:
        a.close()
        b.close()


def test_inline_writes_that_overflow_small_socket_buffers_land_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight threads write 300 KiB slots over one lane whose socket buffers hold ~16 KiB, some writes
    cancelled right after posting: the socket takes each inline send only in part, the rest goes through the
    sender thread, no message cuts into another, and every write not cancelled lands byte for byte."""
    partial = []
    real = wire.send_some

    def spy(sock: socket.socket, bufs: list, native: bool = False) -> list:  # type: ignore[type-arg]
        rest = real(sock, bufs, native)
        if rest:
            partial.append(sum(len(r) for r in rest))
        return rest

    monkeypatch.setattr(wire, "send_some", spy)
    slot, threads, per = 300 * KiB, 8, 4
    n = threads * per
    data = np.random.default_rng(5).integers(0, 255, n * slot, dtype=np.uint8)
    with Engine(lanes=1, sockbuf=16 * KiB) as rx, Engine(lanes=1, sockbuf=16 * KiB) as tx:
        got = np.zeros(n * slot, np.uint8)
        dst = rx.register(got)
        src = tx.register(data.copy())
        tx.connect(dst.descriptor)
        kept: list = []  # type: ignore[type-arg]
        errors: list[BaseException] = []

        def worker(w: int) -> None:
            try:
                for j in range(per):
                    i = w * per + j
                    t = tx.write(src, dst.descriptor, slot, src_offset=i * slot, dst_offset=i * slot, timeout=60)
                    if i % 7 == 3:
                        t.cancel()
                    else:
                        kept.append((i, t))
            except BaseException as exc:  # noqa: BLE001 - surfaced below
                errors.append(exc)

        ws = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(threads)]
        for w in ws:
            w.start()
        for w in ws:
            w.join(60)
        assert not errors and not any(w.is_alive() for w in ws)
        for _i, t in kept:
            t.result(60)
        for i, _ in kept:
            a = i * slot
            assert zlib.crc32(got[a:a + slot]) == zlib.crc32(data[a:a + slot]), f"slot {i} corrupted"
        # the link survived the cancelled ones: one more write lands
        tx.write(src, dst.descriptor, 1000, dst_offset=0).result(30)
        assert tx.peers and not any("dropped" in line for line in rx.log)
    assert partial, "no inline send was left partial: the socket buffers did not fill as intended"


def test_writes_never_block_on_a_stopped_peer_and_fail_when_it_dies() -> None:
    """The peer stops reading (SIGSTOP): posting more writes than its sockets can hold returns at once (the
    caller's inline send never blocks); the peer is killed: every write fails with `PeerGone`, in bounded
    time."""
    p = PeerProcess("tcp", 8 * MiB, lanes=1)
    try:
        with Engine(lanes=2) as eng:
            src = eng.register(np.random.default_rng(7).integers(0, 255, 8 * MiB, dtype=np.uint8))
            eng.write(src, p.desc, 64 * KiB).result(30)  # connected and warm
            assert p.proc.pid is not None
            os.kill(p.proc.pid, signal.SIGSTOP)
            posted: list = []  # type: ignore[type-arg]

            def post() -> None:
                for i in range(48):  # 48 MiB: far more than the socket buffers of a stopped reader hold
                    posted.append(eng.write(src, p.desc, 1 * MiB, src_offset=(i % 7) * MiB,
                                            dst_offset=(i % 7) * MiB, imm=9))

            poster = threading.Thread(target=post, daemon=True)
            poster.start()
            poster.join(30)
            assert not poster.is_alive(), "write() blocked on a peer that stopped reading"
            assert len(posted) == 48
            assert not all(t.done() for t in posted)
            p.kill()  # SIGKILL ends a stopped process too
            t0 = time.monotonic()
            failed = 0
            for t in posted:
                try:
                    t.result(30)
                except PeerGone:
                    failed += 1
            assert failed > 0
            assert time.monotonic() - t0 < 30
            with pytest.raises(PeerGone):
                eng.write(src, p.desc, 10).result(10)
    finally:
        if p.proc.is_alive() and p.proc.pid is not None:
            os.kill(p.proc.pid, signal.SIGCONT)
        p.close()


def test_bench_reports_the_per_write_overhead_of_batches_over_raw_sends() -> None:
    """`ratios()` sets each batch against the back-to-back raw sends of the same shape measured beside it."""
    from transport.bench import BenchReport, _row

    rows = [_row("tcp", "single", 64 * KiB, 4, [200e-6]), _row("baseline", "raw_socket", 64 * KiB, 1, [100e-6])]
    for k, eng_us, raw_us in ((16, 60.0, 45.0), (256, 70.0, 62.0)):
        rows.append(_row("tcp", "batch", 64 * KiB * k, 4, [eng_us * k * 1e-6], writes=k, write_bytes=64 * KiB))
        rows.append(_row("baseline", "raw_socket_batch", 64 * KiB * k, 1, [raw_us * k * 1e-6], writes=k,
                         write_bytes=64 * KiB))
    r = BenchReport(rows).ratios()
    assert r["batch_max_overhead_us_per_write"] == pytest.approx(15.0)
    assert r["batch_min_ratio_vs_raw_socket_batch"] == pytest.approx(45.0 / 60.0)
    assert r["min_ratio_vs_raw_socket_ge_64KiB"] == pytest.approx(0.5)
