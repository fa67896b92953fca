"""Batched submission (`write_batch`) and the fast paths, on every backend installed here.

Real bytes between real processes, checked by CRC32; a batch counts one immediate per peer.
On a GPU host: cuda_ipc within one GPU and, with two GPUs, across them (paged and batched),
with the CuPy range-copy kernel and with the torch fallback.
"""

from __future__ import annotations

import importlib.util
import zlib

import numpy as np
import pytest

from transport import Engine, InvalidArgument, OutOfRange, Target, wait_all
from transport.testing import PeerProcess

pytestmark = pytest.mark.timeout(300)


def _gpus() -> int:
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _nixl() -> bool:
    return importlib.util.find_spec("nixl") is not None


GPU = [pytest.mark.gpu, pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")]
GPU2 = [pytest.mark.gpu, pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs")]
KINDS = [
    pytest.param(("tcp", "cpu", "cpu", "auto"), id="tcp"),
    pytest.param(("nixl", "cpu", "cpu", "auto"), id="nixl",
                 marks=[pytest.mark.slow, pytest.mark.skipif(not _nixl(), reason="nixl not installed")]),
    pytest.param(("cuda_ipc", "cuda:0", "cuda:0", "auto"), id="cuda_ipc", marks=GPU),
    pytest.param(("cuda_ipc", "cuda:0", "cuda:0", "torch"), id="cuda_ipc-torch", marks=GPU),
    pytest.param(("cuda_ipc", "cuda:0", "cuda:1", "auto"), id="cuda_ipc-2gpu", marks=GPU2),
    pytest.param(("cuda_ipc", "cuda:0", "cuda:1", "torch"), id="cuda_ipc-2gpu-torch", marks=GPU2),
]
NBYTES = 4 << 20


def rand(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a))


def _engine(kind: tuple[str, str, str, str], lanes: int = 2) -> Engine:
    backend, _, _, kernel = kind
    return Engine(backend, lanes=lanes, kernel=kernel) if backend == "cuda_ipc" else Engine(backend, lanes=lanes)


def _buf(eng: Engine, device: str, data: np.ndarray):  # type: ignore[no-untyped-def]
    buf = eng.alloc(data.size, device)
    if device.startswith("cuda"):
        import torch

        buf.copy_(torch.from_numpy(data))
    else:
        buf[:] = data
    return buf


@pytest.fixture(scope="module", params=KINDS)
def kind(request):  # type: ignore[no-untyped-def]
    return request.param


@pytest.fixture(scope="module")
def peers(kind):  # type: ignore[no-untyped-def]
    backend, _, tdev, _ = kind
    with PeerProcess(backend, NBYTES, device=tdev) as p1, PeerProcess(backend, NBYTES, device=tdev) as p2:
        yield p1, p2


@pytest.fixture(scope="module")
def engine(kind):  # type: ignore[no-untyped-def]
    with _engine(kind) as e:
        yield e


def test_batch_to_one_peer_many_sizes(engine, peers, kind) -> None:  # type: ignore[no-untyped-def]
    p1, _ = peers
    p1.call("fill", 0)
    sizes = [1, 7, 4096, 0, 65536, 3 << 20 | 3, 100, 8192]
    data = rand(sum(sizes) + 1000, seed=1)
    src = engine.register(_buf(engine, kind[1], data))
    targets, so, do = [], 500, 0
    for n in sizes:
        targets.append(Target(p1.desc, n, so, do))
        so, do = so + n, do + n + 13
    t = engine.write_batch(src, targets, imm=71)
    t.result(60)
    for tg in targets:
        assert p1.crc(tg.dst_offset, tg.length) == crc(data[tg.src_offset:tg.src_offset + tg.length])
    assert p1.call("expect", 71, 1, 10) == 1  # one imm for the whole batch
    if kind[0] != "tcp":
        assert engine._path.handles(src, p1.desc)


def test_batch_dispatch_to_two_peers(engine, peers, kind) -> None:  # type: ignore[no-untyped-def]
    p1, p2 = peers
    k, size = 64, 3000
    data = rand(2 * k * size, seed=2)
    src = engine.register(_buf(engine, kind[1], data))
    perm = np.random.default_rng(3).permutation(k)
    targets = [Target(p.desc, size, (j * k + i) * size, int(perm[i]) * size)
               for j, p in enumerate((p1, p2)) for i in range(k)]
    engine.write_batch(src, [(tg.dst, tg.length, tg.src_offset, tg.dst_offset)
                             for tg in targets], imm=72).result(60)
    for j, p in enumerate((p1, p2)):
        got = np.frombuffer(p.read(0, k * size), np.uint8).reshape(k, size)
        want = data[j * k * size:(j + 1) * k * size].reshape(k, size)
        assert np.array_equal(got[perm], want)
        assert p.call("expect", 72, 1, 10) == 1


def test_paged_layer_write(engine, peers, kind) -> None:  # type: ignore[no-untyped-def]
    p1, _ = peers
    page, npages = 16 << 10, 128
    data = rand(page * npages, seed=4)
    src = engine.register(_buf(engine, kind[1], data))
    dst_pages = np.random.default_rng(5).permutation(2 * npages)[:npages]
    engine.write_paged(src, p1.desc, page_bytes=page, src_pages=np.arange(npages), dst_pages=dst_pages,
                       imm=73).result(60)
    got = np.frombuffer(p1.read(0, page * 2 * npages), np.uint8).reshape(2 * npages, page)
    assert np.array_equal(got[dst_pages], data.reshape(npages, page))
    assert p1.call("expect", 73, 1, 10) == 1


def test_many_batches_in_flight(engine, peers, kind) -> None:  # type: ignore[no-untyped-def]
    p1, _ = peers
    nb, k, size = 20, 32, 1024
    data = rand(nb * k * size, seed=6)
    src = engine.register(_buf(engine, kind[1], data))
    ts = [engine.write_batch(src, [Target(p1.desc, size, (b * k + i) * size, (b * k + i) * size) for i in range(k)],
                             imm=74) for b in range(nb)]
    wait_all(ts, timeout=60)
    assert p1.call("expect", 74, nb, 20) == nb
    assert p1.crc(0, nb * k * size) == crc(data)


def test_batch_checks_before_queueing(engine, peers, kind) -> None:  # type: ignore[no-untyped-def]
    p1, _ = peers
    src = engine.register(_buf(engine, kind[1], rand(4096)))
    before = len(engine._pending)
    with pytest.raises(OutOfRange):
        engine.write_batch(src, [Target(p1.desc, 100, 0, 0), Target(p1.desc, 100, 0, NBYTES - 10)])
    with pytest.raises(OutOfRange):
        engine.write_batch(src, [Target(p1.desc, 100, 4090, 0)])
    with pytest.raises(InvalidArgument):
        engine.write_batch(src, [Target(p1.desc, 100, 0.0, 0)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        engine.write_batch(src, [(p1.desc, 100, 0, 0, 0, 0)])
    with pytest.raises(InvalidArgument):
        engine.write_batch(src, [])
    assert len(engine._pending) == before
