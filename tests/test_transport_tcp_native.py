"""The tcp lane loop in C (`transport/backends/_tcp_native.c`, `WORKBENCH_TCP_NATIVE`): the same bytes as the Python
loop, every pairing of a native and a Python writer and target (one process and two), a peer killed while the
caller waits, a peer that dies mid-payload, and headers the target must reject (unknown or deregistered region,
ranges outside the region, an unknown message type) sent over an authenticated raw connection.

Real engines and real sockets; every wait is bounded.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from typing import Any

import numpy as np
import pytest

from transport import Engine
from transport.backends import tcp as wire
from transport.errors import STATUS_OK, STATUS_OUT_OF_RANGE, STATUS_UNKNOWN_REGION, InvalidArgument
from transport.testing import PeerProcess

pytestmark = pytest.mark.timeout(180)
KiB, MiB = 1 << 10, 1 << 20
SIZES = (0, 1, 3, 39, 40, 41, 4 * KiB + 7, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 256 * KiB + 3, 1 * MiB, 3 * MiB + 5)
built = pytest.mark.skipif(wire._native is None, reason=f"the C lane loop is not built here "
                           f"({wire._NATIVE_MISSING}; `make install` or `python setup.py build_ext --inplace`)")


def test_the_setting_parses_and_rejects_bad_values() -> None:
    assert wire.native_enabled({wire.NATIVE_ENV: "0"}) is False
    assert wire.native_enabled({}) is (wire._native is not None)
    assert wire.native_enabled({wire.NATIVE_ENV: " 1 "}) is (wire._native is not None)
    for bad in ("yes", "2", "", "on"):
        with pytest.raises(InvalidArgument, match=wire.NATIVE_ENV):
            wire.native_enabled({wire.NATIVE_ENV: bad})


def test_a_bad_setting_fails_the_engine_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(wire.NATIVE_ENV, "true")
    with pytest.raises(InvalidArgument, match=wire.NATIVE_ENV):
        Engine("tcp")


def _engine(native: bool, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Engine:
    monkeypatch.setenv(wire.NATIVE_ENV, "1" if native else "0")
    return Engine(lanes=kw.pop("lanes", 1), **kw)


def _data_lanes(eng: Engine) -> list[wire.Lane]:
    return [lane for link in eng._all_links for lane in link.data]


def _writes(tx: Engine, src: Any, dst: Any, got: np.ndarray, data: np.ndarray) -> None:
    for i, size in enumerate(SIZES):
        for off in ((i * 337 * KiB + 13) % (4 * MiB - size), 0):  # unaligned, then aligned
            tx.write(src, dst.descriptor, size, src_offset=(off * 7 + 5) % (4 * MiB - size), dst_offset=off).result(30)
            s = (off * 7 + 5) % (4 * MiB - size)
            assert zlib.crc32(got[off:off + size].tobytes()) == zlib.crc32(data[s:s + size].tobytes()), \
                f"{size} B at {off} corrupted"


@built
@pytest.mark.parametrize("writer,target", [(True, True), (True, False), (False, True)],
                         ids=["native-native", "native-python", "python-native"])
def test_every_pairing_lands_the_same_bytes_as_the_python_loop(writer: bool, target: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Waited writes of 0 B to 3 MiB (odd sizes, unaligned offsets) land byte for byte whichever side runs the C loop,
    and the target's memory ends up identical to the all-Python run's."""
    data = np.random.default_rng(31).integers(0, 255, 4 * MiB, dtype=np.uint8)
    results = []
    for native_run in (True, False):
        with _engine(target and native_run, monkeypatch) as rx, _engine(writer and native_run, monkeypatch) as tx:
            got = np.zeros(4 * MiB, np.uint8)
            dst = rx.register(got)
            src = tx.register(data)
            tx.connect(dst.descriptor)
            _writes(tx, src, dst, got, data)
            rx_lanes, tx_lanes = _data_lanes(rx), _data_lanes(tx)
            assert all((lane._native is not None) == (target and native_run) for lane in rx_lanes)
            if target and native_run:  # the C loop landed them
                assert sum(lane._native.landed for lane in rx_lanes) >= 2 * len(SIZES) - 2
            assert all(lane.native == (writer and native_run) for lane in tx_lanes)
            assert not any("dropped" in line for line in rx.log + tx.log)
            results.append(got.copy())
    assert np.array_equal(results[0], results[1])


@built
@pytest.mark.parametrize("writer", [True, False], ids=["native-writer", "python-writer"])
def test_a_writer_and_a_target_in_two_processes_of_either_kind(writer: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer in this process and the target in another, one of them native and the other Python (and both
    native): many-lane writes, writes with an immediate, and a target that writes back over the same lanes."""
    monkeypatch.setenv(wire.NATIVE_ENV, "0" if writer else "1")  # the peer process inherits it
    p = PeerProcess("tcp", 4 * MiB, lanes=2)
    try:
        for native_here in ((writer, True) if writer else (False,)):
            with _engine(native_here, monkeypatch, lanes=2) as eng:
                data = np.random.default_rng(7).integers(0, 255, 4 * MiB, dtype=np.uint8)
                src = eng.register(data)
                for size in SIZES:
                    off = (size * 3 + 11) % (4 * MiB - size)
                    eng.write(src, p.desc, size, src_offset=off, dst_offset=off).result(30)
                    assert p.crc(off, size) == zlib.crc32(data[off:off + size].tobytes()), f"{size} B corrupted"
                eng.write(src, p.desc, 64 * KiB, imm=5).result(30)
                assert p.call("expect", 5, 1, 10) is not None
                # the peer writes back into this engine over the same link (its lanes become shared both ways)
                back = np.zeros(1 * MiB, np.uint8)
                mine = eng.register(back)
                crc = p.call("write", mine.descriptor.to_bytes(), 0, 300 * KiB + 1, None, 9)
                assert zlib.crc32(back[:300 * KiB + 1].tobytes()) == crc
                eng.write(src, p.desc, 1 * MiB).result(30)
                assert p.crc(0, 1 * MiB) == zlib.crc32(data[:1 * MiB].tobytes())
                assert not any("dropped" in line for line in eng.log)
    finally:
        p.close()


@built
def test_both_directions_at_once_hand_the_lanes_over_to_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two native engines write to each other from several threads at once: each side's receiver loop leaves C when
    its side starts writing on the lane; no message is cut into, every write lands."""
    with _engine(True, monkeypatch, lanes=2) as a, _engine(True, monkeypatch, lanes=2) as b:
        bufs = {e.name: np.zeros(2 * MiB, np.uint8) for e in (a, b)}
        dst = {e.name: e.register(bufs[e.name]) for e in (a, b)}
        data = np.random.default_rng(3).integers(0, 255, 2 * MiB, dtype=np.uint8)
        src = {e.name: e.register(data.copy()) for e in (a, b)}
        a.write(src[a.name], dst[b.name].descriptor, 4 * KiB).result(30)  # b's lanes start in C
        assert all(lane._native is not None and not lane.shared for lane in _data_lanes(b))
        errors: list[BaseException] = []

        def pump(eng: Engine, peer: Engine, seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(300):
                    n = int(rng.integers(0, 200 * KiB))
                    off = int(rng.integers(0, 2 * MiB - n))
                    eng.write(src[eng.name], dst[peer.name].descriptor, n, src_offset=off, dst_offset=off).result(30)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=pump, args=(x, y, i)) for i, (x, y) in enumerate([(a, b), (b, a)] * 2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        a.write(src[a.name], dst[b.name].descriptor, 2 * MiB).result(30)
        b.write(src[b.name], dst[a.name].descriptor, 2 * MiB).result(30)
        assert np.array_equal(bufs[a.name], data) and np.array_equal(bufs[b.name], data)
        assert any(lane.shared for lane in _data_lanes(b))
        assert not any("dropped" in line for line in a.log + b.log)


@built
def test_a_killed_peer_fails_a_native_waited_write_within_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native target is stopped, then killed while the native caller waits (in C) for its ack: `result` raises
    `PeerGone` well within the write's timeout."""
    monkeypatch.setenv(wire.NATIVE_ENV, "1")
    p = PeerProcess("tcp", 4 * MiB, lanes=1)
    try:
        with _engine(True, monkeypatch) as eng:
            src = eng.register(np.random.default_rng(5).integers(0, 255, 4 * MiB, dtype=np.uint8))
            eng.write(src, p.desc, 64 * KiB).result(30)
            assert all(lane.native for lane in _data_lanes(eng))
            assert p.kill_while_waiting(eng, src, 64 * KiB, timeout=20) < 20
    finally:
        p.close()


class _RawPeer:
    """An authenticated connection to `target` (control and one data socket) on which the test writes raw headers."""

    def __init__(self, target: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.helper = _engine(False, monkeypatch)
        socks, _ = wire.connect_link(self.helper, target.address.to_dict(), 1, self.helper._secret,
                                     self.helper._hello(), None, 10.0)
        self.ctrl, self.data = socks
        self.data.settimeout(10)
        deadline = time.monotonic() + 10
        while not any(lane._native is not None for lane in _data_lanes(target)):
            assert time.monotonic() < deadline, "the target did not start a native lane"
            time.sleep(0.01)

    def write(self, tid: int, region: int, offset: int, length: int, payload: bytes | None = None) -> None:
        self.data.sendall(wire.pack(wire.WRITE, tid=tid, region=region, offset=offset, length=length)
                          + (payload if payload is not None else bytes(length)))

    def ack(self) -> tuple[int, ...]:
        buf = wire.recv_bytes(self.data, wire.HEADER_SIZE)
        return wire.HEADER.unpack(buf)

    def close(self) -> None:
        self.ctrl.close()
        self.data.close()
        self.helper.close()


@built
def test_the_native_target_checks_every_header_as_the_python_loop_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw headers over an authenticated data socket to a native target: an unknown region, a range past the region's
    end (also one whose offset + length overflows 64 bits) are answered with their status and their payload
    drained (the next write lands where it should); a region deregistered meanwhile is unknown; an unknown message
    type drops the link."""
    with _engine(True, monkeypatch) as rx:
        got = np.zeros(64 * KiB, np.uint8)
        region = rx.register(got)
        peer = _RawPeer(rx, monkeypatch)
        try:
            payload = bytes(range(256)) * 4
            peer.write(1, region.id, 100, len(payload), payload)
            assert peer.ack()[:5] == (wire.ACK, STATUS_OK, 1, 0, 1)
            assert bytes(got[100:100 + len(payload)]) == payload
            peer.write(2, region.id + 99, 0, 16)
            assert peer.ack()[1] == STATUS_UNKNOWN_REGION
            peer.write(3, region.id, 64 * KiB - 8, 16)
            assert peer.ack()[1] == STATUS_OUT_OF_RANGE
            peer.write(4, region.id, (1 << 64) - 8, 16)
            assert peer.ack()[1] == STATUS_OUT_OF_RANGE
            peer.write(5, region.id, 0, 5, b"abcde")
            ack = peer.ack()
            assert ack[1] == STATUS_OK and ack[4] == 5 and bytes(got[:5]) == b"abcde"
            assert sum(lane._native.landed for lane in _data_lanes(rx)) == 2  # tids 1 and 5, in C
            assert np.count_nonzero(got[64 * KiB - 8:]) == 0  # nothing was written past the checks
            rx.deregister(region)
            peer.write(6, region.id, 0, 5, b"vwxyz")
            assert peer.ack()[1] == STATUS_UNKNOWN_REGION
            assert bytes(got[:5]) == b"abcde"
            peer.data.sendall(wire.pack(77, tid=7))
            deadline = time.monotonic() + 10
            while not any("dropped the link" in line and "unknown message type 77" in line for line in rx.log):
                assert time.monotonic() < deadline, rx.log[-5:]
                time.sleep(0.01)
        finally:
            peer.close()


@built
def test_a_peer_that_dies_mid_payload_drops_the_link_and_the_engine_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw peer sends a header for 256 KiB and 100 KiB of it, then closes: the native target's loop ends with the
    peer gone (its link dropped, bytes past those it received untouched), and the engine still takes writes."""
    with _engine(True, monkeypatch) as rx:
        got = np.zeros(1 * MiB, np.uint8)
        region = rx.register(got)
        peer = _RawPeer(rx, monkeypatch)
        peer.data.sendall(wire.pack(wire.WRITE, tid=1, region=region.id, offset=0, length=256 * KiB)
                          + b"\x01" * (100 * KiB))
        time.sleep(0.05)
        peer.data.shutdown(socket.SHUT_RDWR)
        peer.close()
        deadline = time.monotonic() + 10
        while any(link.alive for link in rx._all_links):
            assert time.monotonic() < deadline, "the target kept the link of a peer that died mid-payload"
            time.sleep(0.01)
        assert np.count_nonzero(got[100 * KiB:]) == 0
        with _engine(True, monkeypatch) as tx:
            data = np.random.default_rng(1).integers(0, 255, 1 * MiB, dtype=np.uint8)
            tx.write(tx.register(data), region.descriptor, 1 * MiB).result(30)
            assert np.array_equal(got, data)


@built
def test_a_caller_whose_write_is_already_done_neither_spins_nor_clears_the_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    """`read_acks` for a transfer some other route completed (here: already waited for) returns at once in C mode and
    leaves the lane's spin setting alone (a 50 ms spin makes a wrong spin plain to see)."""
    monkeypatch.setattr(wire, "SPIN_S", 0.05)
    with _engine(True, monkeypatch) as rx, _engine(True, monkeypatch) as tx:
        dst = rx.register(np.zeros(64 * KiB, np.uint8))
        src = tx.register(np.ones(64 * KiB, np.uint8))
        t = tx.write(src, dst.descriptor, 64 * KiB)
        t.result(30)
        (lane,) = _data_lanes(tx)
        deadline = time.monotonic() + 10
        while lane._ep is None:  # the receiver thread hands the lane to the caller once this side wrote on it
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert lane.native and lane.spin
        t0 = time.perf_counter()
        for _ in range(20):
            lane.read_acks(t)
        assert time.perf_counter() - t0 < 0.5, "the caller spun for a transfer that was already done"
        assert lane.spin
