"""Hostile and careless use of the transport: each defect found by the hardening review has a test.

Every test here failed before its fix; the engines are in this process (fast) except where a
real second process is the point.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from transport import (
    AuthError,
    Engine,
    InvalidArgument,
    MemoryDescriptor,
    OutOfRange,
    TransferTimeout,
    UnknownDescriptor,
)
from transport.backends import tcp as wire

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def pair():  # type: ignore[no-untyped-def]
    with Engine("tcp", lanes=2, secret="s3cret") as a, Engine("tcp", lanes=2, secret="s3cret") as b:
        dst = b.register(np.zeros(1 << 20, np.uint8))
        src = a.register(np.arange(1 << 20, dtype=np.uint32).view(np.uint8)[: 1 << 20].copy())
        yield a, b, src, dst


def test_receiver_enforces_send_length(pair) -> None:  # type: ignore[no-untyped-def]
    """A peer that knows the secret announces a 1 GiB SEND: the receiver drops the link at once
    instead of allocating 1 GiB and waiting for it."""
    a, b, _, _ = pair
    socks, _hello = wire.connect_link(None, b.address.to_dict(), 1, b"s3cret",
                                      {"name": "evil", "address": a.address.to_dict()}, None, 5)
    try:
        socks[0].sendall(wire.pack(wire.SEND, length=1 << 30))
        socks[0].settimeout(5)
        t0 = time.monotonic()
        assert socks[0].recv(1) == b"", "the receiver kept the link open"
        assert time.monotonic() - t0 < 4
        assert any("SEND" in line for line in b.log)
    finally:
        for s in socks:
            s.close()


def test_receiver_bounds_paged_page_count(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, _, dst = pair
    socks, _ = wire.connect_link(None, b.address.to_dict(), 1, b"s3cret",
                                 {"name": "evil2", "address": a.address.to_dict()}, None, 5)
    try:
        # 2^31 page offsets (16 GiB of u64) announced for a write of 4 KiB
        socks[1].sendall(wire.pack(wire.PAGED, region=dst.id, count=1 << 31, offset=4096, length=4096))
        socks[1].settimeout(5)
        assert socks[1].recv(1) == b""
    finally:
        for s in socks:
            s.close()


def test_wrong_secret_is_an_auth_error(pair) -> None:  # type: ignore[no-untyped-def]
    _, b, _, dst = pair
    with Engine("tcp", lanes=1, secret="wrong") as intruder:
        with pytest.raises(AuthError):
            intruder.connect(b.address)
        src = intruder.register(np.zeros(64, np.uint8))
        with pytest.raises(AuthError):
            intruder.write(src, dst.descriptor, 64).result(5)


def test_timeout_honoured_on_a_fresh_link() -> None:
    """A peer that accepts but never answers the handshake: write(timeout=2) gives up after ~2 s and says so."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    try:
        with Engine("tcp", lanes=1) as a:
            src = a.register(np.zeros(64, np.uint8))
            fake = MemoryDescriptor.from_dict({"address": {"name": "mute", "host": "127.0.0.1",
                                                           "port": ls.getsockname()[1]}, "region": 1, "nbytes": 64})
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout, match="2 s"):
                a.write(src, fake, 64, timeout=2).result(30)
            assert time.monotonic() - t0 < 3.5
    finally:
        ls.close()


def test_imm_must_fit_32_bits(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, src, dst = pair
    for bad in (1 << 32, -1):
        with pytest.raises(InvalidArgument, match="imm"):
            a.write(src, dst.descriptor, 8, imm=bad)
        with pytest.raises(InvalidArgument, match="imm"):
            a.write_imm(dst.descriptor, bad)
        with pytest.raises(InvalidArgument, match="imm"):
            a.expect(bad, 1)
    with pytest.raises(InvalidArgument, match="tag"):
        a.send(dst.descriptor, b"x", tag=1 << 40)
    assert not a._pending


def test_region_ids_and_sizes_out_of_range_are_typed(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, src, dst = pair
    d = dst.descriptor.to_dict()
    for field, value in (("region", 1 << 40), ("region", -3), ("nbytes", -1), ("nbytes", 1 << 70)):
        with pytest.raises(UnknownDescriptor, match=field):
            MemoryDescriptor.from_dict({**d, field: value})
    with pytest.raises(UnknownDescriptor):
        MemoryDescriptor.from_dict({**d, "region": "1x"})
    assert not a._pending


@pytest.mark.parametrize("blob", [b"\xff\xfe garbage", b"[]", b'"x"', b"{", b"null", b'{"address": 5}', b"9" * 5000])
def test_garbage_descriptor_is_typed(blob: bytes) -> None:
    with pytest.raises(UnknownDescriptor):
        MemoryDescriptor.from_bytes(blob)


def test_write_from_deregistered_region_fails(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, src, dst = pair
    a.deregister(src)
    with pytest.raises(UnknownDescriptor, match="deregistered"):
        a.write(src, dst.descriptor, 64)
    with pytest.raises(UnknownDescriptor):
        a.write_paged(src, dst.descriptor, page_bytes=64, src_pages=[0], dst_pages=[0])
    assert not a._pending


def test_bad_argument_does_not_hurt_another_write(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, src, dst = pair
    a.connect(dst.descriptor)
    good = [a.write(src, dst.descriptor, 256 << 10, dst_offset=i * (256 << 10), imm=4) for i in range(4)]
    for kw in ({"src_offset": 0.0}, {"dst_offset": "0"}, {"length": 1.5}, {"src_offset": True}, {"length": -1}):
        length = kw.pop("length", 64)
        with pytest.raises(InvalidArgument):
            a.write(src, dst.descriptor, length, **kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        a.write_paged(src, dst.descriptor, page_bytes=64.0, src_pages=[0], dst_pages=[1])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        a.write_paged(src, dst.descriptor, page_bytes=64, src_pages=[0.5], dst_pages=[1])
    for t in good:
        t.result(30)
    assert b.expect(4, 4, timeout=10).result(10) == 4
    assert a.write(src, dst.descriptor, 64).result(10) is None  # the link is still alive
    assert not a._pending


def test_no_pending_leak_on_raising_calls(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, src, dst = pair
    calls = [
        lambda: a.write(src, dst.descriptor, 1 << 30),
        lambda: a.write(src, dst.descriptor, 8, dst_offset=(1 << 20) - 4),
        lambda: a.write_paged(src, dst.descriptor, page_bytes=64, src_pages=[0, 1], dst_pages=[0]),
        lambda: a.write_batch(src, [(dst.descriptor, 8, 0, 1 << 21)]),
        lambda: a.write_imm("nobody", 1),
    ]
    for call in calls:
        with pytest.raises((OutOfRange, InvalidArgument, UnknownDescriptor, ValueError)):
            call()
    assert not a._pending


def test_engine_log_is_bounded(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, _, _ = pair
    for i in range(20_000):
        a._log(f"line {i}")
    assert len(a.log) <= 1000 and a.log[-1] == "line 19999"


def test_idle_unauthenticated_connections_do_not_starve_a_write(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, src, dst = pair
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection((b.address.host, b.address.port), timeout=5))
        time.sleep(0.3)
        with Engine("tcp", lanes=2, secret="s3cret") as c:
            s2 = c.register(np.ones(4096, np.uint8))
            t0 = time.monotonic()
            c.write(s2, dst.descriptor, 4096, imm=9).result(10)
            took = time.monotonic() - t0
        assert took < 3.0, f"a real write took {took:.2f} s behind 200 idle connections"  # starved: 10 s handshake timeout
        assert b.listener_stats()["pending_handshakes"] <= wire.MAX_PENDING_HANDSHAKES
    finally:
        for s in idle:
            s.close()


def test_callbacks_and_lane_threads_survive_a_raising_callback(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, src, dst = pair
    seen = threading.Event()

    def bad(_t):  # type: ignore[no-untyped-def]
        seen.set()
        raise RuntimeError("user callback bug")

    a.write(src, dst.descriptor, 64, callback=bad).result(10)
    assert seen.wait(5)
    a.write(src, dst.descriptor, 64).result(10)


def test_two_engines_writing_to_each_other_do_not_deadlock() -> None:
    """Both sides flood the same lanes with writes to each other (small socket buffers): every ack
    still gets through, because no receiver waits on a socket the other side is not reading."""
    with Engine("tcp", lanes=1, secret="s3cret", sockbuf=1 << 16) as a, \
            Engine("tcp", lanes=1, secret="s3cret", sockbuf=1 << 16) as b:
        n, size = 24, 1 << 20
        da, db = a.register(np.zeros(n * size, np.uint8)), b.register(np.zeros(n * size, np.uint8))
        sa, sb = a.register(np.ones(n * size, np.uint8)), b.register(np.full(n * size, 2, np.uint8))
        a.connect(db.descriptor)
        ta: list = []
        tb: list = []
        fa = threading.Thread(target=lambda: ta.extend(
            a.write(sa, db.descriptor, size, src_offset=i * size, dst_offset=i * size) for i in range(n)))
        fb = threading.Thread(target=lambda: tb.extend(
            b.write(sb, da.descriptor, size, src_offset=i * size, dst_offset=i * size) for i in range(n)))
        fa.start(), fb.start()
        fa.join(30), fb.join(30)
        for t in ta + tb:
            t.result(30)
        assert (db.obj == 1).all() and (da.obj == 2).all()
