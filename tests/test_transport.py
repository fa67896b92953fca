"""Conformance suite of the transport, parameterised over every backend installed here.

Every test moves real bytes between real processes (`transport.testing.PeerProcess`) and
verifies them by CRC32 of the exact range; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
import zlib

import numpy as np
import pytest

from transport import (
    AuthError,
    Cancelled,
    Engine,
    MemoryDescriptor,
    OutOfRange,
    PeerGone,
    TransferTimeout,
    UnknownDescriptor,
    wait_all,
)
from transport.testing import PeerProcess

pytestmark = pytest.mark.timeout(300)


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _nixl() -> bool:
    return importlib.util.find_spec("nixl") is not None


KINDS = [
    pytest.param(("tcp", "cpu"), id="tcp"),
    pytest.param(("tcp", "cuda:0"), id="tcp-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")]),
    pytest.param(("cuda_ipc", "cuda:0"), id="cuda_ipc",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")]),
    pytest.param(("nixl", "cpu"), id="nixl",  # slow: each NIXL engine starts a worker (~5 s here)
                 marks=[pytest.mark.slow,
                        pytest.mark.skipif(not _nixl(), reason="nixl not installed (pip install 'workbench[rdma]')")]),
]
PEER_BYTES = 8 << 20


def make_buf(engine: Engine, device: str, data: np.ndarray):  # type: ignore[no-untyped-def]
    """`data` in memory the engine's backend moves natively (`Engine.alloc`)."""
    buf = engine.alloc(data.size, device)
    if device.startswith("cuda"):
        import torch

        buf.copy_(torch.from_numpy(data))
    else:
        buf[:] = data
    return buf


def rand(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a))


@pytest.fixture(scope="module", params=KINDS)
def kind(request):  # type: ignore[no-untyped-def]
    return request.param


@pytest.fixture(scope="module")
def peer(kind):  # type: ignore[no-untyped-def]
    backend, device = kind
    with PeerProcess(backend, PEER_BYTES, device=device, lanes=2) as p:
        yield p


@pytest.fixture(scope="module")
def engine(kind):  # type: ignore[no-untyped-def]
    backend, _ = kind
    with Engine(backend, lanes=4) as e:
        yield e


def test_descriptor_round_trips(engine, kind) -> None:  # type: ignore[no-untyped-def]
    r = engine.register(make_buf(engine, kind[1], rand(4096)))
    d = MemoryDescriptor.from_bytes(r.descriptor.to_bytes())
    assert d == r.descriptor and d.nbytes == 4096 and d.address.port == engine.address.port
    assert d.device == kind[1].replace("cuda:0", "cuda:0")


@pytest.mark.parametrize("size", [1, 4097, 3 << 20 | 5])
def test_write_every_byte(engine, peer, kind, size) -> None:  # type: ignore[no-untyped-def]
    data = rand(size + 100, seed=size)
    src = engine.register(make_buf(engine, kind[1], data))
    t = engine.write(src, peer.desc, size, src_offset=100, dst_offset=7, imm=3)
    t.result(timeout=60)
    assert peer.crc(7, size) == crc(data[100:100 + size])
    assert peer.call("expect", 3, 1, 10) >= 1
    if kind[0] != "tcp":  # the backend's own data path moved it, not the TCP fallback
        assert engine._path.handles(src, peer.desc)


def test_out_of_order_lanes_still_count(kind, peer) -> None:  # type: ignore[no-untyped-def]
    backend, device = kind
    # data lane 0 sleeps before each message, so later writes on other lanes land first
    with Engine(backend, lanes=4, chaos={"lane_delay": {0: 0.05}}) as eng:
        n, size = 24, 20000
        data = rand(n * size, seed=5)
        src = eng.register(make_buf(eng, device, data))
        ts = [eng.write(src, peer.desc, size, src_offset=i * size, dst_offset=i * size, imm=11) for i in range(n)]
        wait_all(ts, timeout=60)
        assert peer.call("expect", 11, n, 30) == n
        assert peer.crc(0, n * size) == crc(data)
        if backend == "tcp":
            order = sorted(range(n), key=lambda i: ts[i].completed)
            assert order != list(range(n)), "delivery was not reordered; the chaos lane delay had no effect"


def test_sharded_write_counts_one_imm_after_all_shards(kind, peer) -> None:  # type: ignore[no-untyped-def]
    backend, device = kind
    with Engine(backend, lanes=4, chaos={"lane_delay": {1: 0.05}}) as eng:
        size = 4 << 20
        data = rand(size, seed=9)
        src = eng.register(make_buf(eng, device, data))
        t = eng.write(src, peer.desc, size, imm=12)
        t.result(60)
        if backend == "tcp":
            assert len(set(t.lanes)) == 4
        assert peer.call("expect", 12, 1, 10) == 1
        assert peer.crc(0, size) == crc(data)


def test_paged_write_with_strides_and_offsets(engine, peer, kind) -> None:  # type: ignore[no-untyped-def]
    page, ss, ds, so, do = 3000, 4096, 5000, 123, 17
    src_pages, dst_pages = [5, 0, 9, 3, 7, 1], [2, 8, 0, 11, 4, 6]
    data = rand(so + 10 * ss + page, seed=21)
    peer.call("fill", 0)
    src = engine.register(make_buf(engine, kind[1], data))
    t = engine.write_paged(src, peer.desc, page_bytes=page, src_pages=src_pages, dst_pages=dst_pages,
                           src_stride=ss, dst_stride=ds, src_offset=so, dst_offset=do, imm=21)
    t.result(60)
    for sp, dp in zip(src_pages, dst_pages):
        a, b = so + sp * ss, do + dp * ds
        assert peer.crc(b, page) == crc(data[a:a + page]), f"page {sp}->{dp}"
    assert peer.crc(0, do) == crc(np.zeros(do, np.uint8))  # nothing outside the pages
    assert peer.call("expect", 21, 1, 10) == 1


def test_paged_write_in_runs_of_pages(engine, peer, kind) -> None:  # type: ignore[no-untyped-def]
    """Pages of a KV cache's layout (each offset starts a page of a region of whole pages) in a few runs of
    consecutive pages on both sides: device memory over tcp is copied run by run."""
    page = 4096
    src_pages, dst_pages = [3, 4, 5, 6, 10, 11, 40, 41, 42], [100, 101, 102, 50, 51, 52, 53, 7, 8]
    data = rand(64 * page, seed=22)
    peer.call("fill", 0)
    src = engine.register(make_buf(engine, kind[1], data))
    engine.write_paged(src, peer.desc, page_bytes=page, src_pages=src_pages, dst_pages=dst_pages, imm=22).result(60)
    for sp, dp in zip(src_pages, dst_pages):
        assert peer.crc(dp * page, page) == crc(data[sp * page:(sp + 1) * page]), f"page {sp}->{dp}"
    assert peer.crc(9 * page, 41 * page) == crc(np.zeros(41 * page, np.uint8))  # nothing between the runs
    assert peer.call("expect", 22, 1, 10) == 1


def test_many_pages_split_over_lanes(engine, peer, kind) -> None:  # type: ignore[no-untyped-def]
    page, npages = 4096, 1024
    data = rand(page * npages, seed=4)
    perm = np.random.default_rng(1).permutation(npages)
    src = engine.register(make_buf(engine, kind[1], data))
    engine.write_paged(src, peer.desc, page_bytes=page, src_pages=np.arange(npages), dst_pages=perm).result(60)
    got = np.frombuffer(peer.read(0, page * npages), np.uint8).reshape(npages, page)
    assert np.array_equal(got[perm], data.reshape(npages, page))


def test_imm_only_counter_and_callbacks(engine, peer) -> None:  # type: ignore[no-untyped-def]
    seen = []
    ts = [engine.write_imm(peer.address, 31, callback=lambda t: seen.append(t.tid)) for _ in range(5)]
    wait_all(ts, timeout=30)
    assert peer.call("expect", 31, 5, 10) == 5
    deadline = time.monotonic() + 5
    while len(seen) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(seen) == 5


def test_receiver_counts_writes_from_peer(engine, peer, kind) -> None:  # type: ignore[no-untyped-def]
    dst = engine.register(make_buf(engine, kind[1], np.zeros(1 << 20, np.uint8)))
    fut = engine.expect(41, 3, timeout=60)
    got = []
    engine.expect(41, 1, callback=lambda t: got.append(1))  # consumes one more below
    crcs = [peer.call("write", dst.descriptor.to_bytes(), i * 1000, 1000, 41, i) for i in range(4)]
    fut.result(60)
    assert engine.counter.wait(41, 4, timeout=10) == 4
    host = dst.obj if isinstance(dst.obj, np.ndarray) else dst.obj.cpu().numpy()
    for i, c in enumerate(crcs):
        assert crc(host[i * 1000:(i + 1) * 1000]) == c


def test_async_and_future_styles(engine, peer, kind) -> None:  # type: ignore[no-untyped-def]
    data = rand(50000, seed=3)
    src = engine.register(make_buf(engine, kind[1], data))

    async def go() -> None:
        await engine.write(src, peer.desc, 50000, imm=51)

    asyncio.run(asyncio.wait_for(go(), 60))
    assert peer.crc(0, 50000) == crc(data)


def test_scatter_group_and_barrier(kind) -> None:  # type: ignore[no-untyped-def]
    backend, device = kind
    with PeerProcess(backend, 1 << 20, device=device) as p1, PeerProcess(backend, 1 << 20, device=device) as p2, \
            Engine(backend, lanes=2) as eng:
        data = rand(2 * 70000, seed=8)
        src = eng.register(make_buf(eng, device, data))
        g = eng.group([p1.desc, p2.desc])
        wait_all(g.scatter(src, [p1.desc, p2.desc], 70000, dst_offset=10, imm=61), timeout=60)
        assert p1.crc(10, 70000) == crc(data[:70000]) and p2.crc(10, 70000) == crc(data[70000:])
        assert p1.call("expect", 61, 1, 10) == 1 and p2.call("expect", 61, 1, 10) == 1
        # barrier among three processes
        everyone = [eng.address.to_bytes(), p1.address.to_bytes(), p2.address.to_bytes()]
        p1.conn.send(("barrier", everyone, 30))
        p2.conn.send(("barrier", everyone, 30))
        eng.barrier([p1.address, p2.address], timeout=30)
        assert p1._reply(30) and p2._reply(30)


def test_out_of_range_and_unknown_rejected(engine, peer, kind) -> None:  # type: ignore[no-untyped-def]
    src = engine.register(make_buf(engine, kind[1], rand(1 << 20)))
    with pytest.raises(OutOfRange):
        engine.write(src, peer.desc, 100, dst_offset=PEER_BYTES - 50)
    with pytest.raises(OutOfRange):
        engine.write(src, peer.desc, 100, src_offset=(1 << 20) - 10)
    with pytest.raises(OutOfRange):
        engine.write_paged(src, peer.desc, page_bytes=4096, src_pages=[0], dst_pages=[PEER_BYTES // 4096])
    peer.call("fill", 0)
    # a forged descriptor that claims more memory than the peer registered: the peer rejects it
    big = MemoryDescriptor(peer.desc.address, peer.desc.region, PEER_BYTES * 2, "cpu")
    with pytest.raises(OutOfRange):
        engine.write(src, big, 4096, dst_offset=PEER_BYTES + 10).result(30)
    missing = MemoryDescriptor(peer.desc.address, 999, PEER_BYTES, "cpu")
    with pytest.raises(UnknownDescriptor):
        engine.write(src, missing, 4096).result(30)
    assert peer.crc(0, PEER_BYTES) == crc(np.zeros(PEER_BYTES, np.uint8))  # nothing landed
    with pytest.raises(UnknownDescriptor):
        MemoryDescriptor.from_bytes(b'{"region": 1}')


def test_timeout_and_cancel(engine, peer, kind) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        engine.expect(99, 1, timeout=0.3).result(10)
    assert time.monotonic() - t0 < 5
    with pytest.raises(TransferTimeout):
        engine.expect(98, 1).result(timeout=0.2)
    e = engine.expect(97, 1)
    assert e.cancel()
    with pytest.raises(Cancelled):
        e.result(1)
    # a write on a lane that sleeps is cancelled before it is sent
    if kind[0] == "tcp":
        with Engine("tcp", lanes=1, chaos={"lane_delay": {0: 0.3}}) as slow:
            src = slow.register(make_buf(slow, kind[1], rand(1000)))
            slow.connect(peer.desc)
            first = slow.write(src, peer.desc, 1000)
            second = slow.write(src, peer.desc, 1000)
            assert second.cancel()
            with pytest.raises(Cancelled):
                second.result(5)
            first.result(30)


def test_send_recv(engine, peer) -> None:  # type: ignore[no-untyped-def]
    with Engine("tcp", lanes=1) as other:
        other.send(engine.address, b"hello", tag=5).result(5)
        m = engine.recv(5, timeout=10)
        assert m.data == b"hello" and m.peer == other.name
        with pytest.raises(TransferTimeout):
            engine.recv(6, timeout=0.2)


def test_wrong_secret_is_refused(engine) -> None:  # type: ignore[no-untyped-def]
    with Engine("tcp", lanes=1, secret="not-the-secret") as intruder:
        with pytest.raises(AuthError):
            intruder.connect(engine.address)


def test_receiver_killed_mid_transfer_fails_fast(kind) -> None:  # type: ignore[no-untyped-def]
    backend, device = kind
    size = 64 << 20
    p = PeerProcess(backend, size, device=device)
    try:
        with Engine(backend, lanes=2, chaos={"lane_delay": {0: 0.02, 1: 0.02}}) as eng:
            src = eng.register(make_buf(eng, device, rand(size)))
            ts = [eng.write(src, p.desc, size, imm=1) for _ in range(8)]
            time.sleep(0.1)
            p.kill()
            t0 = time.monotonic()
            errors = []
            for t in ts:
                try:
                    t.result(30)
                except PeerGone as exc:
                    errors.append(exc)
            if backend == "tcp":  # the delayed lanes keep writes in flight; device copies may all finish first
                assert errors, "no write failed although the peer was killed"
            assert time.monotonic() - t0 < 20
            with pytest.raises(PeerGone):
                eng.write(src, p.desc, 10).result(10)
    finally:
        p.close()


def test_writer_killed_mid_transfer_fails_expectation(kind) -> None:  # type: ignore[no-untyped-def]
    backend, device = kind
    size = 16 << 20
    p = PeerProcess(backend, size, device=device)
    try:
        with Engine(backend, lanes=2) as eng:
            dst = eng.register(make_buf(eng, device, np.zeros(size, np.uint8)))
            exp = eng.expect(77, 10**9, peer=p.address, timeout=60)
            p.call("flood", dst.descriptor.to_bytes(), size, 77)
            eng.counter.wait(77, 2, timeout=60)
            p.kill()
            t0 = time.monotonic()
            with pytest.raises(PeerGone):
                exp.result(30)
            assert time.monotonic() - t0 < 20
    finally:
        p.close()


@pytest.mark.slow
def test_one_gib_write(kind) -> None:  # type: ignore[no-untyped-def]
    backend, device = kind
    size = 1 << 30
    with PeerProcess(backend, size, device=device, lanes=4) as p, Engine(backend, lanes=4) as eng:
        data = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8)
        src = eng.register(make_buf(eng, device, data))
        eng.write(src, p.desc, size, imm=5).result(300)
        assert p.call("expect", 5, 1, 30) == 1
        assert p.crc(0, size) == crc(data)


def test_short_soak_zero_lost_zero_corrupted(kind) -> None:  # type: ignore[no-untyped-def]
    if kind[1] != "cpu":
        pytest.skip("the soak verifies through shared host memory")
    from transport.bench import soak

    r = soak(3000, kind[0], lanes=4, batch=500, chaos={"lane_delay": {2: 0.0005}})
    assert r["writes"] == 3000 and r["lost"] == 0 and r["corrupted"] == 0, r
