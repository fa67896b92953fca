"""The cuda_ipc fast path on real GPUs: immediates through GPU-visible memory, writes larger than the
staging ring between two GPUs (staged and direct), paged writes split into several staging groups,
and the switch back to the previous path. Real bytes between real processes, checked by CRC32.

Without a GPU only the path selection's argument checks run.
"""

from __future__ import annotations

import importlib.util
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from transport import BackendUnavailable, Engine, Target
from transport.backends.cuda_ipc import MODE_ENV, STAGE_BYTES, make_path
from transport.testing import PeerProcess

pytestmark = pytest.mark.timeout(300)


def _gpus() -> int:
    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


GPU = [pytest.mark.gpu, pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")]
PEER_BYTES = STAGE_BYTES + (16 << 20)  # larger than a lane's staging ring
TARGETS = [pytest.param("cuda:0", id="1gpu", marks=GPU),
           pytest.param("cuda:1", id="2gpu", marks=[*GPU, pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs")])]


def rand(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)


def crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a))


def cuda_buf(data: np.ndarray):  # type: ignore[no-untyped-def]
    import torch

    return torch.from_numpy(data).to("cuda:0")


@pytest.fixture(scope="module", params=TARGETS)
def peer(request):  # type: ignore[no-untyped-def]
    with PeerProcess("cuda_ipc", PEER_BYTES, device=request.param) as p:
        yield p


def test_immediates_arrive_through_gpu_memory(peer) -> None:  # type: ignore[no-untyped-def]
    data = rand(8 << 20, seed=1)
    with Engine("cuda_ipc", lanes=2) as eng:
        src = eng.register(cuda_buf(data))
        sizes = [1 + 977 * i for i in range(64)]
        offs = np.cumsum([0] + sizes[:-1])
        ts = [eng.write(src, peer.desc, n, src_offset=int(o), dst_offset=int(o), imm=81) for n, o in zip(sizes, offs)]
        for t in ts:
            t.result(60)
        page = 16 << 10
        eng.write_paged(src, peer.desc, page_bytes=page, src_pages=np.arange(64), dst_pages=np.arange(64) + 128,
                        imm=82).result(60)
        eng.write_batch(src, [Target(peer.desc, 4096, 4096 * i, (4 << 20) + 8192 * i) for i in range(32)],
                        imm=83).result(60)
        assert peer.call("expect", 81, 64, 20) == 64
        assert peer.call("expect", 82, 1, 20) == 1
        assert peer.call("expect", 83, 1, 20) == 1
        for n, o in zip(sizes, offs):
            assert peer.crc(int(o), n) == crc(data[o:o + n])
        assert peer.crc(128 * page, 64 * page) == crc(data[:64 * page])
        for i in range(32):
            assert peer.crc((4 << 20) + 8192 * i, 4096) == crc(data[4096 * i:4096 * (i + 1)])
        used = eng._path.used
        assert used["imm_gpu"] == 66 and used["imm_socket"] == 0 and used["imm_host"] == 0, dict(used)
        own = eng._path._mailbox.path  # the writer registered a CUDA region: it has a mailbox too
        assert own.exists()
    assert not own.exists()  # and it went with the engine


@pytest.mark.parametrize("mode", ["staged", "direct"])
def test_write_larger_than_the_staging_ring(peer, mode) -> None:  # type: ignore[no-untyped-def]
    size = PEER_BYTES - 3
    data = rand(size + 5, seed=2)
    imm = {"staged": 84, "direct": 87}[mode]  # the peer is shared by both modes: it counts totals per imm
    with Engine("cuda_ipc", lanes=1, peer=mode) as eng:
        src = eng.register(cuda_buf(data))
        for _ in range(2):  # the second write reuses the lane's staging ring
            eng.write(src, peer.desc, size, src_offset=5, dst_offset=1, imm=imm).result(120)
            assert peer.crc(1, size) == crc(data[5:])
            peer.call("fill", 0)
        assert peer.call("expect", imm, 2, 20) == 2


def test_paged_write_in_several_staging_groups(peer) -> None:  # type: ignore[no-untyped-def]
    page = 64 << 10
    npages = PEER_BYTES // page - 8
    assert npages * page > STAGE_BYTES
    data = rand(npages * page, seed=3)
    perm = np.random.default_rng(4).permutation(npages)
    with Engine("cuda_ipc", lanes=2) as eng:
        src = eng.register(cuda_buf(data))
        eng.write_paged(src, peer.desc, page_bytes=page, src_pages=np.arange(npages), dst_pages=perm,
                        imm=85).result(120)
        got = np.frombuffer(peer.read(0, npages * page), np.uint8).reshape(npages, page)
        assert np.array_equal(got[perm], data.reshape(npages, page))
        assert peer.call("expect", 85, 1, 20) == 1


def test_legacy_path_behind_the_switch(peer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from transport.backends.cuda_ipc_legacy import LegacyCudaIpcPath

    monkeypatch.setenv(MODE_ENV, "legacy")
    data = rand(1 << 20, seed=5)
    with Engine("cuda_ipc", lanes=2) as eng:
        assert isinstance(eng._path, LegacyCudaIpcPath)
        src = eng.register(cuda_buf(data))
        eng.write(src, peer.desc, 1 << 20, imm=86).result(60)
        eng.write_paged(src, peer.desc, page_bytes=4096, src_pages=[3, 1], dst_pages=[300, 301], imm=86).result(60)
        assert peer.call("expect", 86, 2, 20) == 2
        assert peer.crc(0, 1 << 20) == crc(data)
        assert peer.crc(300 * 4096, 4096) == crc(data[3 * 4096:4 * 4096])
        assert peer.crc(301 * 4096, 4096) == crc(data[4096:8192])


def test_path_options_are_checked() -> None:
    view = SimpleNamespace(name="e", lanes=1, address=None, _log=lambda s: None)
    with pytest.raises(BackendUnavailable, match="path must be 'fast' or 'legacy'"):
        make_path(view, path="quick")
    if _gpus():
        with pytest.raises(BackendUnavailable, match="peer must be 'staged' or 'direct'"):
            make_path(view, peer="sideways")
