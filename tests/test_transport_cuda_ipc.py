"""The cuda_ipc fast path on real GPUs: immediates through GPU-visible memory, writes larger than the
staging ring between two GPUs (staged and direct), paged writes split into several staging groups,
the page-copy kernel at every size and alignment, and the switch back to the previous path. Real
bytes between real processes, checked by CRC32.

Without a GPU: the path selection's argument checks, the paged-write validation, and the posting
logic itself driven with a stand-in CUDA runtime that records every call (what is launched with
which arguments and offsets, that posting never synchronises, that ring slots come back).
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import time
import zlib
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from transport import BackendUnavailable, Engine, OutOfRange, Target
from transport.backends.cuda_ipc import (
    MODE_ENV,
    STAGE_BYTES,
    CudaIpcPath,
    _HostRing,
    _Remote,
    make_path,
)
from transport.testing import CudaTensorStandIn, PeerProcess, PinnedStandIn

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
# paged writes through the engine, checked page by page: (page bytes, pages, source offset, destination offset):
# odd pages at odd offsets, aligned ones, pages of three 4 KiB chunks and a bit, 64 KiB pages at odd offsets
PAGED_CASES = [(1000, 700, 3, 5), (4096, 300, 0, 8), (12296, 200, 16, 0), (65536, 40, 1, 1)]


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
    with pytest.raises(BackendUnavailable, match="pages must be one of launch, graph, resident"):
        CudaIpcPath(view, pages="persistent", runtime=(None, None))
    with pytest.raises(BackendUnavailable, match="resident_ctas must be an integer"):
        CudaIpcPath(view, resident_ctas=-1, runtime=(None, None))
    for bad in (-1, 1.5, True, "16M"):
        with pytest.raises(BackendUnavailable, match="index_device_page must be an integer >= 0"):
            CudaIpcPath(view, index_device_page=bad, runtime=(None, None))
        with pytest.raises(BackendUnavailable, match="idle_naps must be an integer 0..100000"):
            CudaIpcPath(view, idle_naps=bad, runtime=(None, None))
    if _gpus():
        with pytest.raises(BackendUnavailable, match="peer must be 'staged' or 'direct'"):
            make_path(view, peer="sideways")


# ---- the page-copy kernel on a GPU: every size and alignment against numpy ------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")
@pytest.mark.parametrize("page", [1, 3, 16, 1000, 4096, 4100, 3 * 4096 + 8, 65536])
@pytest.mark.parametrize("shift", [(0, 0), (1, 8), (8, 4)])
def test_copy_pages_kernel_matches_numpy(page: int, shift: tuple[int, int]) -> None:
    import torch

    from kernels._cuda import copy_pages

    n = 64 if page < 16384 else 16
    nslots = 2 * n + 3
    rng = np.random.default_rng(page)
    data = rand(nslots * page + 64, seed=page)
    src = torch.from_numpy(data).to("cuda:0")
    dst = torch.zeros(nslots * page + 64, dtype=torch.uint8, device="cuda:0")
    sp, dp = rng.choice(nslots, n, replace=False), rng.choice(nslots, n, replace=False)
    offs = torch.from_numpy(np.concatenate([sp * page, dp * page]).astype(np.int64)).to("cuda:0")
    s0, d0 = shift
    copy_pages(src.data_ptr() + s0, dst.data_ptr() + d0, offs.data_ptr(), n, page, 0,
               torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = np.zeros_like(data)
    for a, b in zip(sp, dp):
        want[d0 + b * page:d0 + (b + 1) * page] = data[s0 + a * page:s0 + (a + 1) * page]
    assert np.array_equal(dst.cpu().numpy(), want)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")
@pytest.mark.parametrize("page", [1, 1000, 4096, 3 * 4096 + 8, 65536])
@pytest.mark.parametrize("strides", [None, (1, 1), (2, 3)])
def test_copy_pages_idx_kernel_matches_numpy(page: int, strides: tuple[int, int] | None) -> None:
    """Page i from src + idx[i] * ss to dst + idx[n + i] * ds: strides of one page (`copy_pages_pg`) or of pages
    with gaps after them (`copy_pages_idx`), the bases misaligned by a few bytes."""
    import torch

    from kernels._cuda import index_copier

    n = 48 if page < 16384 else 12
    ss, ds = (page, page) if strides is None else (strides[0] * page + 3, strides[1] * page + 8)
    nslots = 2 * n
    rng = np.random.default_rng(page + ss)
    data = rand(nslots * ss + 64, seed=page)
    src = torch.from_numpy(data).to("cuda:0")
    dst = torch.zeros(nslots * ds + 64, dtype=torch.uint8, device="cuda:0")
    sp, dp = rng.choice(nslots, n, replace=False), rng.choice(nslots, n, replace=False)
    idx = torch.from_numpy(np.concatenate([sp, dp]).astype(np.int64)).to("cuda:0")
    torch.cuda.synchronize()
    index_copier(0)(src.data_ptr() + 5, dst.data_ptr() + 1, idx.data_ptr(), n, page, ss, ds,
                    torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = np.zeros(dst.numel(), np.uint8)
    for a, b in zip(sp, dp):
        want[1 + b * ds:1 + b * ds + page] = data[5 + a * ss:5 + a * ss + page]
    assert np.array_equal(dst.cpu().numpy(), want)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")
def test_resident_copier_takes_jobs_and_stops() -> None:
    """The resident copier alone: more jobs than its ring holds (the host waits for a free slot), each checked
    against numpy, then a clean stop."""
    import torch

    from kernels._cuda import ResidentPages

    page, n, jobs = 4096 + 16, 40, 150
    data = rand(2 * n * page, seed=21)
    src = torch.from_numpy(data).to("cuda:0")
    dst = torch.zeros(jobs * n * page, dtype=torch.uint8, device="cuda:0")
    idx = torch.empty(jobs * 2 * n, dtype=torch.int64, pin_memory=True)
    rng = np.random.default_rng(22)
    want = []
    for j in range(jobs):
        sp = rng.choice(2 * n, n, replace=False)
        dp = rng.permutation(n) + j * n
        idx[j * 2 * n:(j + 1) * 2 * n] = torch.from_numpy(np.concatenate([sp, dp]))
        want.append((sp, dp))
    torch.cuda.synchronize()
    res = ResidentPages(0, torch, ctas=8, depth=16)
    try:
        tickets = []
        for j in range(jobs):
            while True:
                got = res.post(src.data_ptr(), dst.data_ptr(), idx.data_ptr() + 16 * n * j, n, page, page, page)
                if got is not None:
                    break
                assert res.alive()
            tickets.append(got)
        for tk in tickets:
            for _ in range(200_000):
                if res.finished(tk):
                    break
                time.sleep(1e-5)
            assert res.finished(tk), tk
    finally:
        assert res.stop(10)
    torch.cuda.synchronize()
    got = dst.cpu().numpy().reshape(jobs * n, page)
    pages = data.reshape(2 * n, page)
    for sp, dp in want:
        assert np.array_equal(got[dp], pages[sp])


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")
def test_resident_paged_writes_through_the_engine(peer) -> None:  # type: ignore[no-untyped-def]
    if peer.desc.device != "cuda:0":
        pytest.skip("one-GPU case")
    data = rand(4 << 20, seed=23)
    with Engine("cuda_ipc", lanes=2, pages="resident", resident_ctas=8) as eng:
        src = eng.register(cuda_buf(data))
        for page, n, so, do in PAGED_CASES:
            rng = np.random.default_rng(page)
            sp, dp = rng.permutation(n), rng.permutation(n)
            peer.call("fill", 0)
            peer.crc(0, 1)  # the target's fill is done (the copier starts at once: no stream orders it after it)
            eng.write_paged(src, peer.desc, page_bytes=page, src_pages=sp, dst_pages=dp, src_offset=so,
                            dst_offset=do, imm=88).result(60)
            got = np.frombuffer(peer.read(do, n * page), np.uint8).reshape(n, page)
            want = data[so:so + n * page].reshape(n, page)
            assert np.array_equal(got[dp], want[sp]), (page, n)
        ts = [eng.write_paged(src, peer.desc, page_bytes=4096, src_pages=[i], dst_pages=[i]) for i in range(30)]
        for t in ts:  # 30 in flight at once
            t.result(60)
        assert peer.crc(0, 30 * 4096) == crc(data[:30 * 4096])
        assert peer.call("expect", 88, 4, 20) == 4
        used = eng._path.used
        assert used["resident"] == 34 and used["imm_host"] == 4, dict(used)
    assert eng._path._resident == {}


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")
@pytest.mark.parametrize("pages", ["launch", "graph"])
def test_paged_writes_of_odd_pages_and_offsets(peer, pages: str) -> None:  # type: ignore[no-untyped-def]
    if peer.desc.device != "cuda:0":
        pytest.skip("one-GPU case")
    data = rand(4 << 20, seed=11)
    with Engine("cuda_ipc", lanes=2, pages=pages) as eng:
        eng._path.index_device_bytes = 0  # type: ignore[union-attr]  # small writes take the device copy too
        src = eng.register(cuda_buf(data))
        for page, n, so, do in PAGED_CASES:
            rng = np.random.default_rng(page)
            sp, dp = rng.permutation(n), rng.permutation(n)
            peer.call("fill", 0)
            eng.write_paged(src, peer.desc, page_bytes=page, src_pages=sp, dst_pages=dp, src_offset=so,
                            dst_offset=do).result(60)
            got = np.frombuffer(peer.read(do, n * page), np.uint8).reshape(n, page)
            want = data[so:so + n * page].reshape(n, page)
            assert np.array_equal(got[dp], want[sp]), (page, n)
        if pages == "graph":  # 64 in flight at once: more than the ring's slots (the rest are launched)
            ts = [eng.write_paged(src, peer.desc, page_bytes=4096, src_pages=[i], dst_pages=[i]) for i in range(64)]
            for t in ts:
                t.result(60)
            assert peer.crc(0, 64 * 4096) == crc(data[:64 * 4096])
        used = eng._path.used  # a one-page write finding the ring full is one memcpy
        # launched: the 64 KiB pages read their indices from a device copy of the slot
        assert used["pages_device_idx"] == (1 if pages == "launch" else 0), dict(used)
        assert used["pages"] + used["graph"] + used["memcpy"] == len(PAGED_CASES) + (64 if pages == "graph" else 0)
        assert used["graph"] >= (len(PAGED_CASES) if pages == "graph" else 0) and used["torch"] == 0, dict(used)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")
def test_large_paged_write_is_one_kernel(peer) -> None:  # type: ignore[no-untyped-def]
    """A 64 MiB paged write (4096 pages of 16 KiB, permuted both ways) is one page kernel: its immediate arrives
    once, through GPU memory, and every page lands in place."""
    if peer.desc.device != "cuda:0":
        pytest.skip("one-GPU case")
    page, n = 16 << 10, 4096
    data = rand(n * page, seed=12)
    sp, dp = np.random.default_rng(13).permutation(n), np.random.default_rng(14).permutation(n)
    imm = 88  # the peer is shared: it counts totals per imm
    with Engine("cuda_ipc", lanes=2) as eng:
        src = eng.register(cuda_buf(data))
        peer.call("fill", 0)
        eng.write_paged(src, peer.desc, page_bytes=page, src_pages=sp, dst_pages=dp, imm=imm).result(60)
        assert peer.call("expect", imm, 1, 20) == 1
        got = np.frombuffer(peer.read(0, n * page), np.uint8).reshape(n, page)
        assert np.array_equal(got[dp], data.reshape(n, page)[sp])
        used = eng._path.used
        assert used["pages"] == 1 and used["imm_gpu"] == 1 and used["kernel"] == 0, dict(used)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="no CUDA GPU")
@pytest.mark.parametrize("index_device_page", [0, 64 << 10, 4096])
def test_paged_writes_in_flight_reuse_ring_slots_and_their_device_copies(peer, index_device_page: int) -> None:  # type: ignore[no-untyped-def]
    """48 paged writes of 8 x 64 KiB pages posted back to back over two lanes (more than the ring's 32 slots, so
    slots and their parts of the device mirror are reused while other writes are in flight), each with its own
    page permutation into its own part of the target, then 16 KiB pages: every page lands where its indices
    say, whether the kernels read the indices from device memory (pages >= index_device_page) or the slot."""
    if peer.desc.device != "cuda:0":
        pytest.skip("one-GPU case")
    page, n, writes = 64 << 10, 8, 48
    data = rand(64 * page, seed=31)
    rng = np.random.default_rng(32)
    with Engine("cuda_ipc", lanes=2, index_device_page=index_device_page) as eng:
        eng._path.index_device_bytes = 0  # type: ignore[union-attr]  # these small writes take it too
        src = eng.register(cuda_buf(data))
        peer.call("fill", 0)
        plans = [(rng.choice(64, n, replace=False), rng.permutation(n) + w * n) for w in range(writes)]
        ts = [eng.write_paged(src, peer.desc, page_bytes=page, src_pages=sp, dst_pages=dp) for sp, dp in plans]
        for t in ts:
            t.result(60)
        got = np.frombuffer(peer.read(0, writes * n * page), np.uint8).reshape(writes * n, page)
        want = data.reshape(64, page)
        for sp, dp in plans:
            assert np.array_equal(got[dp], want[sp])
        small = 16 << 10
        sp16, dp16 = rng.permutation(64), rng.permutation(64)
        eng.write_paged(src, peer.desc, page_bytes=small, src_pages=sp16, dst_pages=dp16).result(60)
        got16 = np.frombuffer(peer.read(0, 64 * small), np.uint8).reshape(64, small)
        assert np.array_equal(got16[dp16], data[:64 * small].reshape(64, small)[sp16])
        used = eng._path.used
        device = (writes if index_device_page and page >= index_device_page else 0) + (
            1 if index_device_page and small >= index_device_page else 0)
        assert used["pages_device_idx"] == device and used["pages"] + used["memcpy"] == writes + 1, dict(used)


# ---- the posting logic without a GPU: a stand-in CUDA runtime records every call -------------------------

class _Rt:
    """Records the CUDA runtime calls; synchronising while `posting` is set is an error."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.posting = False
        self.busy = False  # the source's current stream still has work queued
        self._ev = itertools.count(1)

    def _rec(self, *call: Any) -> None:
        assert not (self.posting and call[0] in ("eventSynchronize", "streamSynchronize")), call
        self.calls.append(call)

    def getDevice(self) -> int:
        return 0

    def setDevice(self, dev: int) -> None:
        self._rec("setDevice", dev)

    def streamQuery(self, stream: int) -> int:
        self._rec("streamQuery", stream)
        return 600 if self.busy else 0

    def eventCreateWithFlags(self, flags: int) -> int:
        return next(self._ev)

    def eventRecord(self, ev: int, stream: int) -> None:
        self._rec("eventRecord", ev, stream)

    def streamWaitEvent(self, stream: int, ev: int, flags: int) -> None:
        self._rec("streamWaitEvent", stream, ev)

    def memcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> None:
        self._rec("memcpyAsync", dst, src, n, stream)

    def eventSynchronize(self, ev: int) -> None:
        self._rec("eventSynchronize", ev)

    def eventQuery(self, ev: int) -> int:
        return 600  # not ready: only a caller waiting in result() completes a write here (no race with the poller)

    def eventDestroy(self, ev: int) -> None:
        return None


LANE_STREAM = 0x5000
SRC_PTR, DST_PTR = 1 << 40, 1 << 41


def _fake_torch() -> Any:
    torch = pytest.importorskip("torch")
    stream = SimpleNamespace(cuda_stream=LANE_STREAM, synchronize=lambda: None)
    return SimpleNamespace(uint8=torch.uint8, cuda=SimpleNamespace(Stream=lambda device=None: stream),
                           empty=lambda n, dtype=None, pin_memory=False, device=None: torch.empty(n, dtype=dtype),
                           _C=SimpleNamespace(_cuda_getCurrentRawStream=lambda dev: 0))


@pytest.fixture
def posting(monkeypatch):  # type: ignore[no-untyped-def]
    """A tcp engine pair whose writer moves CUDA-like regions through `CudaIpcPath` on a recording runtime."""
    import kernels._cuda as kc

    rt, launches = _Rt(), []
    nargs = {"copy_pages": 6, "copy_pages_idx": 8, "copy_pages_pg": 5, "post_imm": 3}

    names: list[str] = []
    fail_at: dict[str, int] = {}  # kernel name -> its launch (counted from 1) that fails

    def launch(fn: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, shared: int, stream: int,
               params: int, extra: int) -> None:
        assert rt.posting, "a launch outside posting"
        name = names[fn - 1]  # the function handle names the kernel, as the driver's does
        if name in fail_at:
            fail_at[name] -= 1
            if not fail_at[name]:
                raise RuntimeError(f"{name}: launch failed (stand-in)")
        ptrs = (ctypes.c_void_p * nargs.get(name, 4)).from_address(params)
        args = tuple(ctypes.c_uint64.from_address(p).value for p in ptrs)
        launches.append((name, gx, bx, stream, args))

    def raw(device: int, name: str) -> Any:
        """The kernel launcher with a stand-in `cuLaunchKernel` that reads the argument words back through the
        pointer array the driver would read."""
        if name not in names:
            names.append(name)
        r = kc._Raw.__new__(kc._Raw)
        r.fn, r.ptr, r.launch, r.rt = None, names.index(name) + 1, launch, rt
        return r

    monkeypatch.setattr(kc, "_raw", raw)
    nbytes = 32 << 20
    with Engine("tcp", lanes=2) as tgt, Engine("tcp", lanes=2) as eng:
        dst = tgt.register(np.zeros(nbytes, np.uint8)).descriptor
        src = eng.register(np.zeros(nbytes, np.uint8))
        src.flat = CudaTensorStandIn(nbytes, SRC_PTR)
        eng.connect(dst)
        path = CudaIpcPath(eng, runtime=(_fake_torch(), rt))
        path.handles = lambda s, d: True  # type: ignore[method-assign]
        path._opened[(dst.engine, dst.region)] = _Remote(CudaTensorStandIn(nbytes, DST_PTR))
        eng._path, old = path, eng._path
        try:
            yield SimpleNamespace(eng=eng, src=src, dst=dst, rt=rt, launches=launches, path=path, fail_at=fail_at)
        finally:
            eng._path = old
            path.close()


def _post(fx: Any, fn: Any) -> Any:
    fx.rt.posting = True
    try:
        return fn()
    finally:
        fx.rt.posting = False


def test_paged_posting_is_one_launch_of_page_indices_and_never_synchronises(posting) -> None:  # type: ignore[no-untyped-def]
    import kernels._cuda as kc

    fx = posting
    page, n = 32 << 10, 256
    rng = np.random.default_rng(7)
    sp, dp = rng.permutation(n), rng.permutation(n)
    t = _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=sp, dst_pages=dp,
                                             src_offset=64, dst_offset=128))
    assert len(fx.launches) == 1
    name, grid, threads, stream, (s_ptr, d_ptr, idx_ptr, count, pg) = fx.launches[0]
    assert name == "copy_pages_pg"  # strides of one page: the five-argument kernel
    # the offsets ride on the base addresses: the kernel computes every page's address from its index
    assert (s_ptr, d_ptr, count, pg, stream) == (SRC_PTR + 64, DST_PTR + 128, n, page, LANE_STREAM)
    assert threads == 32 * kc.PAGE_WARPS and grid == n * (page // 4096) // kc.PAGE_WARPS  # a warp per 4 KiB chunk
    ring = fx.path._ring
    slot = (idx_ptr - ring.ptr) // _HostRing.SLOT
    words = ring.words[slot * _HostRing.SLOT // 8:][:2 * n]
    assert np.array_equal(words[:n], sp) and np.array_equal(words[n:], dp)  # the caller's indices as they are
    names = [c[0] for c in fx.rt.calls]
    # producers idle: no ordering event; the device already current: no device query; one completion event
    assert names == ["streamQuery", "eventRecord"], names
    assert slot not in ring.free  # the kernel may still read it
    t.result(5)
    assert fx.rt.calls[-1][0] == "eventSynchronize" and slot in ring.free
    assert fx.path.used["pages"] == 1 and fx.path.used["kernel"] == 0


def test_graph_posting_stores_the_job_in_a_slot_and_launches_its_graph(posting, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """pages="graph": the six job words and the caller's indices go into a ring slot, then one launch of that
    slot's graph on the lane's stream; no kernel launch, no synchronise; the slot comes back on completion."""
    import kernels._cuda as kc

    fx = posting
    launched: list[Any] = []

    class Graphs:
        def __init__(self, device: int, slots: list[int], grid: int = 0) -> None:
            self.slots = slots

        def launch(self, slot_ptr: int, stream_ptr: int) -> None:
            assert fx.rt.posting and slot_ptr in self.slots
            launched.append((slot_ptr, stream_ptr))

        def close(self) -> None:
            launched.append("closed")

    monkeypatch.setattr(kc, "GraphPages", Graphs)
    fx.path.pages = "graph"
    ring_words = kc.JOB_HEADER
    page, n = 32 << 10, 256
    rng = np.random.default_rng(9)
    sp, dp = rng.permutation(n), rng.permutation(n)
    for k, (ss, ds, so, do) in enumerate([(page, page, 64, 128), (3 * page, 2 * page, 3, 5)]):
        t = _post(fx, lambda ss=ss, ds=ds, so=so, do=do: fx.eng.write_paged(
            fx.src, fx.dst, page_bytes=page, src_pages=sp, dst_pages=dp, src_stride=ss, dst_stride=ds, src_offset=so,
            dst_offset=do))
        assert fx.launches == [] and len(launched) == k + 1
        slot_ptr, stream = launched[-1]
        ring = fx.path._ring
        words = ring.words[(slot_ptr - ring.ptr) // 8:][:ring_words + 2 * n]
        assert stream == LANE_STREAM
        assert words[:6].tolist() == [SRC_PTR + so, DST_PTR + do, n, page, ss, ds]
        assert np.array_equal(words[ring_words:ring_words + n], sp) and np.array_equal(words[ring_words + n:], dp)
        slot = (slot_ptr - ring.ptr) // _HostRing.SLOT
        assert slot not in ring.free
        t.result(5)
        assert slot in ring.free
    assert [c[0] for c in fx.rt.calls].count("eventSynchronize") == 2 and "streamSynchronize" not in str(fx.rt.calls)
    assert fx.path.used["graph"] == 2 and fx.path.used["pages"] == 0


def test_graph_posting_falls_back_to_a_launch(posting, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import kernels._cuda as kc

    def no_graphs(device: int, slots: list[int], grid: int = 0) -> Any:
        raise RuntimeError("no graphs here")

    monkeypatch.setattr(kc, "GraphPages", no_graphs)
    fx = posting
    fx.path.pages = "graph"
    for _ in range(2):  # tried once, then launched without trying again
        _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=4096, src_pages=[1, 2],
                                             dst_pages=[3, 4])).result(5)
    assert [c[0] for c in fx.launches] == ["copy_pages_pg"] * 2
    assert fx.path.used["pages"] == 2 and fx.path.used["graph"] == 0 and fx.path._graphs == {0: None}


def test_kernel_launcher_finds_the_function_handle() -> None:
    """`RawModule.get_function` gives a RawKernel whose handle lives in `.kernel.ptr`: the launcher must find it
    there (it used to read `.ptr` alone, found nothing and took CuPy's per-argument launch, ~11 µs a launch
    against ~5 µs through `cuLaunchKernel` on one H200)."""
    pytest.importorskip("cupy")
    import kernels._cuda as kc

    raw = kc._Raw(SimpleNamespace(kernel=SimpleNamespace(ptr=0x1234)))
    assert raw.ptr == 0x1234 and raw.launch is not None
    assert kc._Raw(SimpleNamespace(ptr=0x99)).ptr == 0x99
    assert kc._Raw(SimpleNamespace()).launch is None  # no handle: CuPy's own launch


def test_paged_posting_with_strides_and_offsets(posting) -> None:  # type: ignore[no-untyped-def]
    fx = posting
    sp, dp = [5, 0, 9], [2, 7, 1]  # a list of ints, not an int64 array: converted once by the engine
    t = _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=1000, src_pages=sp, dst_pages=dp,
                                             src_stride=4096, dst_stride=8192, src_offset=3, dst_offset=5))
    t.result(5)
    name, _grid, _threads, _stream, (s_ptr, d_ptr, idx_ptr, count, pg, cpp, ss, ds) = fx.launches[-1]
    assert (name, s_ptr, d_ptr, count, pg, cpp, ss, ds) == ("copy_pages_idx", SRC_PTR + 3, DST_PTR + 5, 3, 1000, 1,
                                                            4096, 8192)
    ring = fx.path._ring
    assert ring.words[(idx_ptr - ring.ptr) // 8:][:6].tolist() == sp + dp
    assert fx.path.used["pages"] == 1 and len(ring.free) == _HostRing.SLOTS


def test_ring_gives_the_slot_freed_last_first() -> None:
    ring = _HostRing(SimpleNamespace(uint8=np.uint8, empty=lambda n, dtype=None, pin_memory=False: PinnedStandIn(n)))
    a = ring.take(8)
    b = ring.take(8)
    assert a is not None and b is not None and a[0] != b[0]
    ring.give([a[0]])
    again = ring.take(16)
    assert again is not None and again[0] == a[0] and again[2] == ring.ptr + a[0] * _HostRing.SLOT
    assert ring.take(_HostRing.SLOT // 8 + 1) is None  # more than a slot holds


def test_a_completed_write_releases_its_callback(posting) -> None:  # type: ignore[no-untyped-def]
    """The completion callback (for a paged write it holds the engine's index lists) is dropped when the write
    completes, in the completing thread, not later when the poller drops the write."""
    import weakref

    from transport.backends.base import Pieces
    from transport.completion import Transfer

    fx = posting
    got: list[Any] = []

    class Callback:
        def __call__(self, exc: BaseException | None) -> None:
            got.append(exc)

    def post(t: Transfer) -> weakref.ref[Callback]:
        cb = Callback()
        _post(fx, lambda: fx.path.submit(t, fx.src, fx.dst, Pieces.one(0, 0, 4096), cb))
        return weakref.ref(cb)

    t = Transfer(0, "one write", None)
    ref = post(t)
    assert ref() is not None and len(fx.path._queue) == 1  # held while the write is in flight
    for hook in t.hooks:  # what a caller waiting in result() runs
        hook()
    assert got == [None] and ref() is None and len(fx.path._queue) == 1  # released; the poller has not looked yet


def test_a_failed_page_launch_moves_the_write_through_the_range_kernel(posting) -> None:  # type: ignore[no-untyped-def]
    """The page kernel's launch fails (no index copy queued): its slot goes back at once, every page moves through
    the range kernel with its byte offsets (in 16-byte words), one completion event for the write; later paged
    writes go straight to the range kernel."""
    fx = posting
    fx.fail_at["copy_pages_pg"] = 1
    page, n = 8 << 10, 4096
    rng = np.random.default_rng(22)
    sp, dp = rng.permutation(n), rng.permutation(n)
    t = _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=sp, dst_pages=dp, imm=7))
    assert [x[0] for x in fx.launches] == ["copy_ranges_16"] and not fx.path._pages_ok
    ring = fx.path._ring
    _name, _grid, _threads, stream, (s_ptr, d_ptr, r_ptr, count) = fx.launches[0]
    assert (s_ptr, d_ptr, count, stream) == (SRC_PTR, DST_PTR, n, LANE_STREAM)  # 8 KiB pieces: no split
    words = ring.words[(r_ptr - ring.ptr) // 8:][:3 * count]
    assert np.array_equal(words[:count], sp * page // 16) and np.array_equal(words[count:2 * count], dp * page // 16)
    assert (words[2 * count:] == page // 16).all()
    assert [c[0] for c in fx.rt.calls].count("eventRecord") == 1 and "streamSynchronize" not in str(fx.rt.calls)
    assert len(ring.free) == _HostRing.SLOTS - 1  # the page kernel's slot back at once, the range list's held
    t.result(5)
    assert len(ring.free) == _HostRing.SLOTS
    assert fx.path.used["pages"] == 0 and fx.path.used["kernel"] == 1 and fx.path.used["imm_socket"] == 1
    fx.launches.clear()
    _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=sp[:8], dst_pages=dp[:8])
          ).result(5)
    assert [x[0] for x in fx.launches] == ["copy_ranges_16"]


def test_posting_orders_after_busy_producers_and_single_writes_are_one_memcpy(posting) -> None:  # type: ignore[no-untyped-def]
    fx = posting
    fx.rt.busy = True
    t = _post(fx, lambda: fx.eng.write(fx.src, fx.dst, 3 << 20, src_offset=5, dst_offset=7))
    names = [c[0] for c in fx.rt.calls]
    assert names == ["streamQuery", "eventRecord", "streamWaitEvent", "memcpyAsync", "eventRecord"], names
    assert fx.rt.calls[3][1:] == ("memcpyAsync", DST_PTR + 7, SRC_PTR + 5, 3 << 20, LANE_STREAM)[1:]
    assert fx.rt.calls[1][2] == 0 and fx.rt.calls[2][1] == LANE_STREAM  # record on the source's stream, wait on the lane
    assert not fx.launches
    t.result(5)
    # a batch of unequal pieces to one region: the general range kernel, its list in a ring slot
    t = _post(fx, lambda: fx.eng.write_batch(fx.src, [Target(fx.dst, 100 + i, 1000 * i, 2000 * i) for i in range(5)]))
    t.result(5)
    assert len(fx.launches) == 1 and fx.path.used["kernel"] == 1 and len(fx.path._ring.free) == _HostRing.SLOTS
    name, grid, threads, stream, (s_ptr, d_ptr, r_ptr, count) = fx.launches[0]
    ring = fx.path._ring
    words = ring.words[(r_ptr - ring.ptr) // 8:][:3 * count]  # 1-byte words: the lengths are odd
    assert (name, s_ptr, d_ptr, count, stream) == ("copy_ranges_1", SRC_PTR, DST_PTR, 5, LANE_STREAM)
    assert words.tolist() == [1000 * i for i in range(5)] + [2000 * i for i in range(5)] + [100 + i for i in range(5)]


def test_paged_write_validation() -> None:
    with Engine("tcp", lanes=1) as tgt, Engine("tcp", lanes=1) as eng:
        dst = tgt.register(np.zeros(1 << 20, np.uint8)).descriptor
        src = eng.register(np.zeros(1 << 20, np.uint8))
        for sp, dp in [([-1], [0]), ([0], [-5]), ([1 << 61], [0]), ([0], [1 << 62])]:
            with pytest.raises(OutOfRange, match="page indices must be >= 0"):
                eng.write_paged(src, dst, page_bytes=64, src_pages=sp, dst_pages=dp)
        with pytest.raises(OutOfRange, match="source page falls outside"):
            eng.write_paged(src, dst, page_bytes=4096, src_pages=[255, 256], dst_pages=[0, 1])
        with pytest.raises(OutOfRange, match="outside the peer's region"):
            eng.write_paged(src, dst, page_bytes=4096, src_pages=[0, 1], dst_pages=[0, 256], dst_offset=0)
        with pytest.raises(OutOfRange, match="source page falls outside"):
            eng.write_paged(src, dst, page_bytes=4096, src_pages=[0, 255], dst_pages=[0, 1], src_offset=1)
        eng.write_paged(src, dst, page_bytes=4096, src_pages=[255], dst_pages=[0]).result(10)
        # a source index beyond the (smaller) destination region is fine: the lists are bounded one by one
        small_buf = np.zeros(16 << 10, np.uint8)
        small = tgt.register(small_buf).descriptor
        src_buf = np.frombuffer(src.view, np.uint8)
        src_buf[:] = np.random.default_rng(3).integers(0, 255, src_buf.size, dtype=np.uint8)
        eng.write_paged(src, small, page_bytes=4096, src_pages=[200, 7], dst_pages=[3, 0]).result(10)
        eng.write_paged(src, small, page_bytes=1000, src_pages=[9], dst_pages=[1], src_stride=4096, dst_stride=8192,
                        src_offset=5, dst_offset=3).result(10)
        assert np.array_equal(small_buf[3 * 4096:4 * 4096], src_buf[200 * 4096:201 * 4096])
        assert np.array_equal(small_buf[:3], src_buf[7 * 4096:7 * 4096 + 3])
        assert np.array_equal(small_buf[8195:9195], src_buf[5 + 9 * 4096:5 + 9 * 4096 + 1000])
        with pytest.raises(OutOfRange, match="outside the peer's region"):
            eng.write_paged(src, small, page_bytes=4096, src_pages=[0], dst_pages=[4])
        assert not eng._pending


class _FakeCopier:
    """Stands in for `kernels._cuda.ResidentPages`: records the jobs, finishes them when told."""

    def __init__(self, device: int, torch: Any, ctas: int = 0) -> None:
        self.jobs: list[tuple[int, ...]] = []
        self.full = False
        self.stopped = False
        self.lock = __import__("threading").Lock()

    def post(self, *job: int) -> int | None:
        if self.full:
            return None
        self.jobs.append(job)
        return len(self.jobs)

    def finished(self, ticket: int) -> bool:
        return True

    def alive(self) -> bool:
        return not self.stopped

    def stop(self, timeout: float = 5.0) -> bool:
        self.stopped = True
        return True


def test_resident_posting_falls_back_to_a_launch_when_it_must(posting, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """pages="resident": a paged write is a job for the copier (its indices in a ring slot, no launch, no event);
    a busy source stream or a full copier ring launches the page kernel instead; close stops the copier."""
    import kernels._cuda as kc

    made: list[_FakeCopier] = []
    monkeypatch.setattr(kc, "ResidentPages", lambda *a, **k: made.append(_FakeCopier(*a, **k)) or made[-1])
    fx = posting
    fx.path.pages = "resident"
    sp, dp = [4, 1, 7], [0, 9, 3]

    def paged(**kw: Any) -> Any:
        return _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=4096, src_pages=sp, dst_pages=dp,
                                                    src_offset=8, dst_offset=16, **kw))
    paged().result(5)
    (res,) = made
    (job,) = res.jobs
    ring = fx.path._ring
    assert job[:2] == (SRC_PTR + 8, DST_PTR + 16) and job[3:] == (3, 4096, 4096, 4096)
    assert ring.words[(job[2] - ring.ptr) // 8:][:6].tolist() == sp + dp
    assert not fx.launches and [c[0] for c in fx.rt.calls] == ["streamQuery"]  # no event: the copier's done word
    assert len(ring.free) == _HostRing.SLOTS  # the slot came back with the completion
    fx.rt.busy = True  # the source's producers still run: the lane's stream orders the copy after them
    paged().result(5)
    assert len(res.jobs) == 1 and [x[0] for x in fx.launches] == ["copy_pages_pg"]
    fx.rt.busy, res.full = False, True
    paged(imm=5).result(5)
    assert len(fx.launches) == 2 and fx.path.used["resident_full"] == 1
    res.full = False
    paged(imm=6).result(5)  # no mailbox here: the immediate goes as a notice once the copy is done
    assert len(res.jobs) == 2 and fx.path.used["resident"] == 2 and fx.path.used["imm_socket"] == 2
    fx.path.close()
    assert res.stopped and fx.path._resident == {}


def test_large_pages_read_their_indices_from_a_device_copy_of_the_slot(posting) -> None:  # type: ignore[no-untyped-def]
    """Pages of >= 64 KiB (index_device_page) in a write of more than index_device_bytes (64 MiB): the slot's 2n
    indices are copied on the lane's stream into that slot's part of the device mirror (one memcpyAsync, before
    the launch) and the kernel reads them there; the slot stays taken until the write completed; smaller pages or
    smaller writes read the slot itself (no copy)."""
    fx = posting
    page, n = 64 << 10, 40
    assert fx.path.index_device_bytes == 64 << 20
    _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=range(n),
                                         dst_pages=range(n))).result(5)
    assert "memcpyAsync" not in [c[0] for c in fx.rt.calls] and fx.path.used["pages_device_idx"] == 0
    fx.rt.calls.clear()
    fx.path.index_device_bytes = n * page - 1  # the stand-in's regions are 32 MiB: a lower bar for this test
    rng = np.random.default_rng(41)
    sp, dp = rng.permutation(n), rng.permutation(n)
    t = _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=sp, dst_pages=dp))
    ring = fx.path._ring
    mirror = fx.path._mirrors[0][1]
    name, _grid, _threads, stream, (s_ptr, d_ptr, idx_ptr, count, pg) = fx.launches[-1]
    slot = (idx_ptr - mirror) // _HostRing.SLOT
    assert (name, s_ptr, d_ptr, count, pg, stream) == ("copy_pages_pg", SRC_PTR, DST_PTR, n, page, LANE_STREAM)
    assert idx_ptr == mirror + slot * _HostRing.SLOT
    names = [c[0] for c in fx.rt.calls]
    assert names == ["streamQuery", "memcpyAsync", "eventRecord"], names
    assert fx.rt.calls[1][1:] == (idx_ptr, ring.ptr + slot * _HostRing.SLOT, 16 * n, LANE_STREAM)
    words = ring.words[slot * _HostRing.SLOT // 8:][:2 * n]
    assert np.array_equal(words[:n], sp) and np.array_equal(words[n:], dp)
    assert slot not in ring.free  # the copy and the kernel may still read it
    t.result(5)
    assert slot in ring.free and fx.path.used["pages_device_idx"] == 1
    # 32 KiB pages: the kernel reads the slot through mapped memory, no copy
    fx.rt.calls.clear()
    _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=32 << 10, src_pages=sp, dst_pages=dp)).result(5)
    assert "memcpyAsync" not in [c[0] for c in fx.rt.calls]
    assert ring.ptr <= fx.launches[-1][4][2] < ring.ptr + ring.SLOT * ring.SLOTS
    # the threshold is an option: 0 turns the copy off, a smaller one takes smaller pages
    fx.path.index_device_page = 0
    _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=sp, dst_pages=dp)).result(5)
    fx.path.index_device_page, fx.path.index_device_bytes = 4096, 0
    _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=4096, src_pages=sp, dst_pages=dp)).result(5)
    assert fx.path.used["pages_device_idx"] == 2 and fx.path.used["pages"] == 5
    assert len(ring.free) == _HostRing.SLOTS


def test_a_failed_index_copy_falls_back_to_the_slot(posting, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The copy into device memory fails: this write's kernel reads the slot, later ones never try again."""
    fx = posting
    logs: list[str] = []
    monkeypatch.setattr(fx.eng, "_log", logs.append)

    def broken(dst: int, src: int, n: int, kind: int, stream: int) -> None:
        raise RuntimeError("cudaErrorInvalidValue (stand-in)")

    monkeypatch.setattr(fx.rt, "memcpyAsync", broken)
    fx.path.index_device_bytes = 0
    page, n = 64 << 10, 8
    for _ in range(2):
        _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=range(n),
                                             dst_pages=range(n))).result(5)
        ring = fx.path._ring
        assert ring.ptr <= fx.launches[-1][4][2] < ring.ptr + ring.SLOT * ring.SLOTS
    assert fx.path.index_device_page == 0 and fx.path.used["pages_device_idx"] == 0 and fx.path.used["pages"] == 2
    assert sum("copying page indices" in m for m in logs) == 1, logs


def test_a_failed_launch_after_the_index_copy_keeps_the_slot_until_completion(posting) -> None:  # type: ignore[no-untyped-def]
    """The index copy is queued, then the kernel's launch fails: the copy may still read the slot, so the slot goes
    back with the write's completion (not at once), and the pages move through the range kernel."""
    fx = posting
    fx.fail_at["copy_pages_pg"] = 1
    fx.path.index_device_bytes = 0
    page, n = 64 << 10, 8
    t = _post(fx, lambda: fx.eng.write_paged(fx.src, fx.dst, page_bytes=page, src_pages=range(n),
                                             dst_pages=range(n)))
    ring = fx.path._ring
    copy = [c for c in fx.rt.calls if c[0] == "memcpyAsync"]
    assert len(copy) == 1
    slot = (copy[0][2] - ring.ptr) // _HostRing.SLOT
    assert [x[0] for x in fx.launches] == ["copy_ranges_16"] and not fx.path._pages_ok
    assert slot not in ring.free
    t.result(5)
    assert len(ring.free) == _HostRing.SLOTS


def test_the_poller_completes_writes_nobody_waits_for_when_woken_and_while_napping(posting, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """result(timeout < 1 s) runs no hooks: only the poller completes the write. Blocked (after `idle_naps` naps
    with nothing queued), a submit wakes it; napping, a submit leaves it be (no wake-up is released) and the
    nap's end finds the write."""
    fx = posting
    path = fx.path
    assert path.idle_naps == 0  # by default it blocks at once
    monkeypatch.setattr(fx.rt, "eventQuery", lambda ev: 0)
    path.idle_naps = 2
    deadline = time.monotonic() + 5
    while not path._sleeping:  # two naps of 200 µs, then blocked
        assert time.monotonic() < deadline, "the poller never blocked"
        time.sleep(1e-3)
    t = _post(fx, lambda: fx.eng.write(fx.src, fx.dst, 4096))
    assert not path._sleeping  # woken by the submit
    path.idle_naps = 10 ** 6  # from now on it naps while the queue is empty
    t.result(0.9)
    time.sleep(5e-3)
    assert not path._sleeping
    t = _post(fx, lambda: fx.eng.write(fx.src, fx.dst, 4096))
    assert path._wake.locked() and not path._sleeping  # napping: no wake-up released
    t.result(0.9)
