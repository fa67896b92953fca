"""CUDA IPC backend: device-to-device writes between processes of one host (one GPU or several).

A registered CUDA tensor's descriptor carries its CUDA IPC handle (through
`torch.multiprocessing.reductions.reduce_tensor`) and the name of the receiver's imm mailbox
(`cuda_ipc_mailbox`). A writer on the same host (same boot) opens the peer's memory once per
registration (cached until the peer revokes it) and enqueues its copies in the caller's
thread with raw CUDA runtime calls (CuPy's bindings: a microsecond each, no torch dispatch):

- per (device, lane), created once: a stream, an event that orders the lane after the source's
  current stream (record + wait, only when that stream still has work queued: the producers of
  the source finish first), a lock; completion events come from a per-device pool and go back to
  it; no device switch when the device is already current;
- one contiguous write on one GPU: one `cudaMemcpyAsync`;
- a paged write on one GPU (equal pages, a whole layer): the engine hands over its checked page
  indices (`submit_pages`); they are copied as they are into a slot of a pinned host ring, and one
  `copy_pages_pg` launch (`copy_pages_idx` for strides other than the page; `kernels._cuda`: a warp
  per 4 KiB chunk, the widest word each chunk allows) computes every page's addresses from its
  index, the stride and the offset, reads the local page and writes it straight into the peer's
  page; no byte offsets, word-size, splitting or division work on the host. Pages of at least
  `index_device_page` bytes (`INDEX_DEVICE_PAGE`, 64 KiB) in a write of more than `INDEX_DEVICE_MIN_BYTES`
  (64 MiB) are read from device memory instead: one `cudaMemcpyAsync` on the lane's stream copies the slot's
  indices into the slot's part of a device mirror of the ring (allocated once per device), and the kernel reads
  them there;
- `pages="graph"` (opt-in): the same kernel started as a CUDA graph, one per ring slot, captured once
  (`kernels._cuda.GraphPages`): the job's six words and the indices go into the slot and one
  `cudaGraphLaunch` starts it (the host's cost ~3 µs against ~5 µs for the launch on one H200; the
  fixed grid made its kernel slower on the GPU, so it is not the default);
- `pages="resident"` (opt-in): those paged writes become jobs for a copier kernel that stays on the
  GPU while the engine is open (`kernels._cuda.ResidentPages`): a few stores into pinned memory
  instead of a launch, completion by a done word the kernel stores; see `CudaIpcPath`;
- other pieces (a batch of unequal writes to one region): one `copy_ranges` kernel launch, its
  range list (in words) in a ring slot; kernels are launched with `cuLaunchKernel` directly (the
  function handle of CuPy's RawKernel: ~5 µs a launch on one H200, against ~11 µs through CuPy's call);
- between two GPUs (`peer="staged"`, the default): through a staging ring of `STAGE_SLOTS`
  chunks on the destination GPU, created once per lane: chunk i goes peer-to-peer (the source
  GPU's copy engine over NVLink) while chunk i-1 is copied into the peer's memory on the
  destination GPU, so a large write runs at the peer-copy rate (copying straight into memory
  another process exported was several times slower between GPUs: 16 MiB in 473 µs against
  ~60 µs into a plain buffer, two H200s). Pieces: gather kernel on the source GPU, one peer
  copy, scatter kernel on the destination GPU. `peer="direct"`: one peer memcpy straight into
  the peer's memory;
- the immediate: on the last copy's stream, right after it, a one-thread kernel stores it into
  the receiver's mailbox (shared host memory registered with CUDA); the receiver's watcher sees
  it without any socket. No mailbox, a full ring or a failed launch: the entry is stored from
  the host once the copy completed, or (no mailbox) sent as a one-way notice on the control socket;
- completion: an event per write. A caller waiting in `result()` synchronises on it directly;
  a poller thread completes the writes nobody waits for: blocked while nothing is queued, else
  asleep until the oldest write's grace period ends (it never ticks while a caller posts, so it
  seldom takes the GIL from the posting thread), then it queries events with a back-off.

`WORKBENCH_CUDA_IPC=legacy` (or `Engine("cuda_ipc", path="legacy")`) selects the previous
path (`cuda_ipc_legacy`: torch streams, events and copies per write, immediates over the
control socket); `WORKBENCH_CUDA_IPC_PEER=direct|staged` chooses the cross-GPU copy.
Writes that are not CUDA→CUDA on one host fall back to the TCP lanes.
"""

from __future__ import annotations

import base64
import itertools
import os
import pickle
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from transport.backends.base import DataPath, Done, EngineView, Pieces
from transport.completion import Transfer
from transport.descriptors import MemoryDescriptor
from transport.errors import BackendUnavailable, TransportError
from transport.memory import Region

MODE_ENV = "WORKBENCH_CUDA_IPC"  # fast (default) or legacy
PEER_ENV = "WORKBENCH_CUDA_IPC_PEER"  # staged (default) or direct
PAGES_ENV = "WORKBENCH_CUDA_IPC_PAGES"  # how a paged write on one GPU is started (PAGES_MODES)
PAGES_MODES = ("launch", "graph", "resident")
RESIDENT_CTAS = 0  # CTAs of the resident page copier (pages="resident"); 0: one per SM
CHUNK = 64 << 10  # bytes per CUDA block of the range-copy kernel (long pieces are split into chunks)
# Page indices read from device memory (`index_device_page`): the page kernel reading its indices from mapped pinned
# host memory ran at 0.61-0.69 of a memcpy with 64 KiB pages on one H200 (the 16 warps of a page read the same host
# words at once), 0.91 with the indices in device memory; 16-32 KiB pages ran at 0.89 either way (0.90-0.91 from
# device memory: less than the index upload costs). So pages of at least this many bytes get their indices copied
# into a device mirror of the ring slot first (one cudaMemcpyAsync on the lane's stream, before the kernel). The
# copy costs ~10 µs of GPU time (CUDA events, 64 KiB pages: 64 MiB 50.0 against 56.9 µs from host memory, 256 MiB
# 154.1 against 218.2) and ~5-7 µs of host time before the launch, so only writes of more than
# INDEX_DEVICE_MIN_BYTES take it (at 64 MiB it measured no faster end to end).
INDEX_DEVICE_PAGE = 64 << 10
INDEX_DEVICE_MIN_BYTES = 64 << 20
MEMCPY_HOST_TO_DEVICE = 1
STAGE_CHUNK = 8 << 20  # bytes per staging slot between two GPUs
STAGE_SLOTS = 8  # staging slots per lane (64 MiB on the destination GPU)
STAGE_BYTES = STAGE_CHUNK * STAGE_SLOTS
GRACE_S = 200e-6  # the poller leaves a write this long to a caller waiting in result()
TICK_S = 50e-6
# Once its queue is empty the poller may nap `idle_naps` grace periods (a submit does not wake it: it looks at the
# queue when the nap ends) before it blocks until a submit wakes it. Back-to-back writes of one engine then find it
# napping (no wake per write: 2-5 µs less posting on the CPU stand-in, `benchmarks/cuda_ipc_posting.py`), but the
# napping pollers of idle engines in the same process take the GIL every grace period. In one H200 call with three
# engines interleaved in one process, posting rose (256 MiB in 16 KiB pages 93-166 µs against 59-103 µs for the
# previous tree's one engine; not separated from the extra engines themselves), so it is opt-in.
IDLE_NAPS = 0
MAX_TICK_S = 1e-3
MEMCPY_DEFAULT = 4  # cudaMemcpyDefault (unified addressing picks the direction)
EVENT_DISABLE_TIMING = 2
NOT_READY = 600  # cudaErrorNotReady
PEER_ALREADY_ENABLED = 704
HOST_REGISTER_PORTABLE_MAPPED = 3
CAN_USE_HOST_POINTER = 91  # cudaDevAttrCanUseHostPointerForRegisteredMem


class _NoRuntime(Exception):
    """CuPy's CUDA runtime bindings are missing: the legacy path serves instead."""


def make_path(engine: EngineView, path: str | None = None, on_imm: Callable[[int, int, str], Any] | None = None,
              **options: Any) -> DataPath:
    """The cuda_ipc data path: `fast` (default) or `legacy` (option `path`, else `$WORKBENCH_CUDA_IPC`)."""
    mode = path if path is not None else os.environ.get(MODE_ENV, "fast")
    if mode not in ("fast", "legacy"):
        raise BackendUnavailable(f"cuda_ipc: path must be 'fast' or 'legacy' (option path= or ${MODE_ENV}), "
                                 f"got {mode!r}")
    if mode == "fast":
        try:
            return CudaIpcPath(engine, on_imm=on_imm, **options)
        except _NoRuntime as exc:
            engine._log(f"cuda_ipc: fast path unavailable ({exc}); using the legacy path")
    from transport.backends.cuda_ipc_legacy import LegacyCudaIpcPath

    return LegacyCudaIpcPath(engine, **{k: v for k, v in options.items() if k == "kernel"})


def _runtime() -> tuple[Any, Any]:
    """torch (with a visible GPU) and CuPy's CUDA runtime bindings."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise BackendUnavailable("cuda_ipc needs torch with CUDA") from exc
    if not torch.cuda.is_available():
        raise BackendUnavailable("cuda_ipc: no CUDA device is visible (use backend='tcp')")
    try:
        import cupy  # noqa: F401 - sets up the CUDA libraries its runtime bindings load
        from cupy.cuda import runtime as rt
    except Exception as exc:  # noqa: BLE001 - no CuPy, or one that cannot load its CUDA libraries
        raise _NoRuntime(f"CuPy's CUDA runtime: {type(exc).__name__}: {exc}") from exc
    return torch, rt


def _word(*values: int) -> int:
    """The widest word (16, 8, 4, 2 or 1 bytes) dividing every value."""
    acc = 0
    for v in values:
        acc |= int(v)
    for w in (16, 8, 4, 2):
        if acc % w == 0:
            return w
    return 1


def _split(src: np.ndarray, dst: np.ndarray, length: np.ndarray, limit: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop empty pieces and split those longer than `limit` bytes into pieces of at most `limit`."""
    if not (length > 0).all():
        keep = length > 0
        src, dst, length = src[keep], dst[keep], length[keep]
    if length.size and int(length.max()) > limit:
        k = -(-length // limit)
        rep = np.repeat(np.arange(length.size), k)
        j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        src, dst, length = src[rep] + j * limit, dst[rep] + j * limit, np.minimum(limit, length[rep] - j * limit)
    return src, dst, length


class _PageIdx:
    """A paged write as the engine checked it: `idx` holds the n source page indices then the n destination
    indices (int64, the engine's own array); page i moves `page` bytes from `so + idx[i] * ss` to
    `do + idx[n + i] * ds`. The page kernels take it as it is; `pieces()` gives the byte offsets the other
    copies need."""

    __slots__ = ("idx", "n", "page", "ss", "ds", "so", "do")

    def __init__(self, idx: np.ndarray, page: int, ss: int, ds: int, so: int, do: int) -> None:
        self.idx, self.n, self.page, self.ss, self.ds, self.so, self.do = idx, idx.size // 2, page, ss, ds, so, do

    def __len__(self) -> int:
        return self.n

    def pieces(self) -> Pieces:
        n = self.n
        src = self.idx[:n] * self.ss
        dst = self.idx[n:] * self.ds
        if self.so:
            src += self.so
        if self.do:
            dst += self.do
        return Pieces(src, dst, np.full(n, self.page, np.int64), self.page)


class _HostRing:
    """Pinned host slots holding the range lists the copy kernel reads (device-readable through unified
    addressing: no upload). A slot goes back to the ring when the write that read it completed."""

    SLOT = (256 << 10) + 4096  # a graph job of 16384 pages (its header and 2 x 16384 indices) fits
    SLOTS = 32

    def __init__(self, torch: Any) -> None:
        self.buf = torch.empty(self.SLOT * self.SLOTS, dtype=torch.uint8, pin_memory=True)
        self.bytes = memoryview(self.buf.numpy())  # for struct.pack_into
        self.words = self.buf.numpy().view(np.int64)
        self.ptr = int(self.buf.data_ptr())
        # pop and extend are atomic: no lock. The slot freed last is taken first: its lines are still in the host's
        # caches (handed out in turn, each large write copied its indices into memory untouched for 31 writes;
        # with the callback release in `_complete`, 16 384 pages posted in 53-63 µs against 124-287 µs, one H200)
        self.free: deque[int] = deque(range(self.SLOTS - 1, -1, -1))

    def take(self, nwords: int) -> tuple[int, np.ndarray, int] | None:
        """(slot, writable view of `nwords` words, device-readable address), or None when none is free."""
        if nwords * 8 > self.SLOT:
            return None
        try:
            i = self.free.pop()
        except IndexError:
            return None
        off = i * self.SLOT // 8
        return i, self.words[off:off + nwords], self.ptr + i * self.SLOT

    def give(self, slots: list[int]) -> None:
        self.free.extend(slots)

    def slot_ptrs(self) -> list[int]:
        """Every slot's device-readable address."""
        return [self.ptr + i * self.SLOT for i in range(self.SLOTS)]


class _Lane:
    """A stream on one device for one lane, its ordering event and lock (created once)."""

    __slots__ = ("dev", "stream", "ptr", "prod", "lock")

    def __init__(self, dev: int, stream: Any, prod: int) -> None:
        self.dev, self.stream, self.ptr, self.prod = dev, stream, int(stream.cuda_stream), prod
        self.lock = threading.Lock()


class _Cross:
    """Staging between two GPUs for one lane: a ring of chunks on the destination GPU, a grow-only gather
    buffer on the source GPU, and the events that order them (created once)."""

    __slots__ = ("stage", "stage_ptr", "gather", "gather_ptr", "copied", "freed", "bdone", "bdone_set")

    def __init__(self) -> None:
        self.stage: Any = None
        self.stage_ptr = 0
        self.gather: Any = None
        self.gather_ptr = 0
        self.copied: list[int] = []
        self.freed: list[int] = []
        self.bdone = 0
        self.bdone_set = False


class _Remote:
    __slots__ = ("tensor", "ptr", "dev")

    def __init__(self, tensor: Any) -> None:
        self.tensor, self.ptr, self.dev = tensor, int(tensor.data_ptr()), int(tensor.device.index)


def _done_nothing(exc: BaseException | None) -> None:
    """A completed write's callback once it ran."""


class _Pending:
    """One submitted write: its completion event and what to do once it completed (whoever sees it first)."""

    __slots__ = ("done", "fired", "lock", "ev", "dev", "t0", "slots", "host_imm", "notice", "res", "ticket")

    def __init__(self, done: Done) -> None:
        self.done, self.fired, self.lock = done, False, threading.Lock()
        self.ev = 0  # the completion event, or 0 for a write the resident copier runs (`res`, `ticket`)
        self.res: Any = None
        self.ticket = 0
        self.dev = 0
        self.t0 = 0.0
        self.slots: list[int] = []
        self.host_imm: tuple[Any, int, int, int] | None = None  # (outbox, address, word, seq)
        self.notice: tuple[MemoryDescriptor, int, int] | None = None  # (dst, imm, tid) over the control socket


class _Device:
    """Tracks the calling thread's current device; switches only when needed and restores at the end."""

    __slots__ = ("rt", "prev", "cur")

    def __init__(self, rt: Any) -> None:
        self.rt = rt
        self.prev = self.cur = rt.getDevice()

    def use(self, dev: int) -> None:
        if self.cur != dev:
            self.rt.setDevice(dev)
            self.cur = dev

    def restore(self) -> None:
        if self.cur != self.prev:
            self.rt.setDevice(self.prev)
            self.cur = self.prev


class CudaIpcPath(DataPath):
    """The data path of `Engine(backend="cuda_ipc")`.

    kernel: `auto` (the CuPy range-copy kernel when CuPy works, else torch), `cupy` or `torch`.
    peer: `staged` (default, or `$WORKBENCH_CUDA_IPC_PEER`) or `direct`: how a write crosses GPUs.
    pages: `launch` (default, or `$WORKBENCH_CUDA_IPC_PAGES`): a paged write on one GPU is one kernel launch;
    `graph`: one `cudaGraphLaunch` of the ring slot's graph (`kernels._cuda.GraphPages`; falls back to the
    launch when graphs cannot be made or the ring is full); `resident`: it is a job for a copier kernel that
    stays on the GPU while the engine is open (`kernels._cuda.ResidentPages`, `resident_ctas` CTAs, 0: one per
    SM), started with a few stores instead of a launch.
    Opt-in: those CTAs stay on the GPU (without MPS other processes' kernels on it are time-sliced with
    them) and a device-wide synchronise in this process (`torch.cuda.synchronize()`) waits until the engine
    closes. Writes whose source stream is still busy, or that find the copier's ring full, are launched.
    index_device_page: a launched paged write of pages of at least this many bytes (default `INDEX_DEVICE_PAGE`,
    64 KiB) and more than `INDEX_DEVICE_MIN_BYTES` in all (the attribute `index_device_bytes`) has its indices
    copied from the ring slot into device memory on the lane's stream before its kernel, which then reads them
    there (not through mapped host memory); 0: the kernel always reads the ring slot.
    idle_naps: grace periods the poller naps once nothing is queued before it blocks (0, the default: it blocks at
    once and each submit that finds it blocked wakes it; see `IDLE_NAPS`).
    """

    name = "cuda_ipc"
    imm_in_batches = True  # a batch to one peer region is one submission: the path posts its immediate

    def __init__(self, engine: EngineView, kernel: str = "auto", peer: str | None = None,
                 on_imm: Callable[[int, int, str], Any] | None = None, runtime: tuple[Any, Any] | None = None,
                 pages: str | None = None, resident_ctas: int = RESIDENT_CTAS,
                 index_device_page: int = INDEX_DEVICE_PAGE, idle_naps: int = IDLE_NAPS) -> None:
        """runtime: (torch, CUDA runtime) to use instead of torch and CuPy's bindings (tests without a GPU
        drive the posting logic with stand-ins that record the calls)."""
        if kernel not in ("auto", "cupy", "torch"):
            raise BackendUnavailable(f"cuda_ipc: kernel must be auto, cupy or torch, got {kernel!r}")
        peer = peer if peer is not None else os.environ.get(PEER_ENV, "staged")
        if peer not in ("staged", "direct"):
            raise BackendUnavailable(f"cuda_ipc: peer must be 'staged' or 'direct' (option peer= or ${PEER_ENV}), "
                                     f"got {peer!r}")
        pages = pages if pages is not None else os.environ.get(PAGES_ENV, "launch")
        if pages not in PAGES_MODES:
            raise BackendUnavailable(f"cuda_ipc: pages must be one of {', '.join(PAGES_MODES)} (option pages= or "
                                     f"${PAGES_ENV}), got {pages!r}")
        if isinstance(resident_ctas, bool) or not isinstance(resident_ctas, int) or not 0 <= resident_ctas <= 1024:
            raise BackendUnavailable(f"cuda_ipc: resident_ctas must be an integer 0..1024 (0: one per SM), "
                                     f"got {resident_ctas!r}")
        if (isinstance(index_device_page, bool) or not isinstance(index_device_page, int)
                or index_device_page < 0):
            raise BackendUnavailable(f"cuda_ipc: index_device_page must be an integer >= 0 (the page size in bytes "
                                     f"from which a paged write's indices are copied to device memory; 0: never), "
                                     f"got {index_device_page!r}")
        if isinstance(idle_naps, bool) or not isinstance(idle_naps, int) or not 0 <= idle_naps <= 100_000:
            raise BackendUnavailable(f"cuda_ipc: idle_naps must be an integer 0..100000 (grace periods the poller naps "
                                     f"once idle; 0: it blocks at once), got {idle_naps!r}")
        torch, rt = runtime if runtime is not None else _runtime()
        super().__init__(engine)
        self.torch = torch
        self.rt = rt
        self.kernel = kernel
        self.peer = peer
        self.on_imm = on_imm
        self._raw_stream = getattr(getattr(torch, "_C", None), "_cuda_getCurrentRawStream", None)
        self.used: Counter[str] = Counter()  # how bytes and immediates moved: memcpy, kernel, peer, imm_gpu, …
        self._lanes: dict[tuple[int, int], _Lane] = {}
        self._cross: dict[tuple[int, int, int], _Cross] = {}
        self._events: dict[int, list[int]] = {}
        self._all_events: list[tuple[int, int]] = []
        self._peer_ok: set[tuple[int, int]] = set()
        self._host_ptr_ok: dict[int, bool] = {}
        self._opened: dict[tuple[str, int], _Remote] = {}
        self._outboxes: dict[str, Any] = {}
        self._registered: list[int] = []
        self._mailbox: Any = None
        self._mailbox_failed = False
        self._gpu_imm = True
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._ring: _HostRing | None = None
        self._pages_ok = True  # the page-copy kernel works (cleared on its first failure)
        self._copy_pages: dict[int, Callable[..., None]] = {}  # per device: copy_pages_idx bound to it
        self.pages = pages
        self.resident_ctas = resident_ctas
        self.index_device_page = index_device_page
        self.index_device_bytes = INDEX_DEVICE_MIN_BYTES
        self._mirrors: dict[int, Any] = {}  # device -> a device buffer the size of the host ring, or None
        self._resident: dict[int, Any] = {}  # device -> kernels._cuda.ResidentPages (pages="resident"), or None
        self._graphs: dict[int, Any] = {}  # device -> kernels._cuda.GraphPages (pages="graph"), or None
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Lock()  # guards the queue and the poller's state
        self._wake = threading.Lock()  # released: a wake-up is pending for the poller (acquired: none)
        self._wake.acquire()
        self._sleeping = False  # the poller is blocked until a submit wakes it (not napping)
        self._closed = False
        self.idle_naps = idle_naps
        self._poller = threading.Thread(target=self._poll, name=f"wbt-{engine.name}-ipc", daemon=True)
        self._poller.start()

    # registration ------------------------------------------------------------
    def describe(self, region: Region) -> dict[str, Any]:
        if not region.is_cuda:
            return {}
        from torch.multiprocessing.reductions import reduce_tensor

        fn, args = reduce_tensor(region.flat)
        extra = {"ipc": base64.b64encode(pickle.dumps((fn, args))).decode()}
        box = self._receiver_mailbox()
        if box is not None:
            extra["mbox"] = box.name
        return extra

    def _receiver_mailbox(self) -> Any:
        if self._mailbox is None and not self._mailbox_failed and self.on_imm is not None:
            from transport.backends.cuda_ipc_mailbox import Mailbox, MailboxError

            with self._lock:
                if self._mailbox is None and not self._mailbox_failed:
                    try:
                        self._mailbox = Mailbox(self.on_imm, self.engine._log, thread_name=f"wbt-{self.engine.name}-mbox")
                    except MailboxError as exc:
                        self._mailbox_failed = True
                        self.engine._log(f"cuda_ipc: no imm mailbox ({exc}); immediates come over the control socket")
        return self._mailbox

    def forget_remote(self, peer: str, region: int) -> None:
        with self._lock:
            self._opened.pop((peer, region), None)

    def handles(self, src: Region, dst: MemoryDescriptor) -> bool:
        return (src.is_cuda and dst.device.startswith("cuda") and "ipc" in dst.extra
                and dst.address.hostid == self.engine.address.hostid)

    @property
    def confirms_delivery(self) -> bool:
        return True

    @property
    def delivers_imm(self) -> bool:
        return True

    def _remote(self, dst: MemoryDescriptor) -> _Remote:
        key = (dst.engine, dst.region)
        r = self._opened.get(key)
        if r is None:
            with self._lock:
                r = self._opened.get(key)
                if r is None:
                    fn, args = pickle.loads(base64.b64decode(dst.extra["ipc"]))
                    t = fn(*args)
                    if t.numel() < dst.nbytes:
                        raise TransportError(f"cuda_ipc: the peer's region {dst.region} maps {t.numel()} bytes, "
                                             f"the descriptor claims {dst.nbytes}")
                    r = self._opened[key] = _Remote(t)
        return r

    # per-device resources (created once) --------------------------------------
    def _lane(self, dev: int, lane: int, d: _Device) -> _Lane:
        key = (dev, lane)
        la = self._lanes.get(key)
        if la is None:
            with self._lock:
                la = self._lanes.get(key)
                if la is None:
                    d.use(dev)
                    la = self._lanes[key] = _Lane(dev, self.torch.cuda.Stream(device=dev), self._new_event(dev))
        return la

    def _new_event(self, dev: int) -> int:
        """A fresh event on `dev` (the caller made `dev` current)."""
        ev = int(self.rt.eventCreateWithFlags(EVENT_DISABLE_TIMING))
        self._all_events.append((dev, ev))
        return ev

    def _event(self, dev: int) -> int:
        pool = self._events.get(dev)
        if pool:
            try:
                return pool.pop()
            except IndexError:
                pass
        with self._lock:
            return self._new_event(dev)

    def _give_event(self, dev: int, ev: int) -> None:
        self._events.setdefault(dev, []).append(ev)

    def _current_stream(self, dev: int) -> int:
        if self._raw_stream is not None:
            return int(self._raw_stream(dev))
        return int(self.torch.cuda.current_stream(dev).cuda_stream)

    def _enable_peer(self, a: int, b: int, d: _Device) -> None:
        if (a, b) in self._peer_ok:
            return
        for x, y in ((a, b), (b, a)):
            d.use(x)
            try:
                if self.rt.deviceCanAccessPeer(x, y):
                    self.rt.deviceEnablePeerAccess(y)
            except Exception as exc:  # noqa: BLE001 - already enabled (704) is fine; else the driver stages
                if getattr(exc, "status", None) != PEER_ALREADY_ENABLED:
                    self.engine._log(f"cuda_ipc: peer access {x}->{y}: {exc}")
        self._peer_ok.add((a, b))

    def _cross_state(self, lane: int, sdev: int, ddev: int, d: _Device) -> _Cross:
        key = (lane, sdev, ddev)
        x = self._cross.get(key)
        if x is None:
            torch = self.torch
            x = _Cross()
            d.use(ddev)
            x.stage = torch.empty(STAGE_BYTES, dtype=torch.uint8, device=f"cuda:{ddev}")
            x.stage_ptr = int(x.stage.data_ptr())
            x.freed = [self._new_event(ddev) for _ in range(STAGE_SLOTS)]
            x.bdone = self._new_event(ddev)
            d.use(sdev)
            x.copied = [self._new_event(sdev) for _ in range(STAGE_SLOTS)]
            self._cross[key] = x
        return x

    # data path ---------------------------------------------------------------
    def submit_pages(self, t: Transfer, src: Region, dst: MemoryDescriptor, index: np.ndarray, page: int, ss: int,
                     ds: int, so: int, do: int, done: Done, imm: int | None = None) -> None:
        """A paged write as the engine checked it, its page indices as they are (`Engine._submit_pages`): on one
        GPU the page kernel computes each page's addresses from them; elsewhere they become byte offsets."""
        self.submit(t, src, dst, _PageIdx(index, page, ss, ds, so, do), done, imm)  # type: ignore[arg-type]

    def submit(self, t: Transfer, src: Region, dst: MemoryDescriptor, pieces: Pieces, done: Done,
               imm: int | None = None) -> None:
        rt = self.rt
        rem = self._remote(dst)
        flat = src.flat
        sdev = flat.device.index
        pg = pieces if type(pieces) is _PageIdx else None
        if pg is not None and (rem.dev != sdev or not self._pages_ok or self.kernel == "torch"):
            pieces, pg = pg.pieces(), None
        lane_i = next(self._rr) % self.lanes
        t.lanes = (lane_i,)
        p = _Pending(done)
        d = _Device(rt)
        try:
            if pg is None or self.pages != "resident" or not self._post_resident(t, dst, flat, rem, pg, p, d, imm):
                la = self._lane(sdev, lane_i, d)
                with la.lock:
                    d.use(sdev)
                    cur = self._current_stream(sdev)
                    if rt.streamQuery(cur) != 0:  # the source's producers still run: they finish first
                        rt.eventRecord(la.prod, cur)
                        rt.streamWaitEvent(la.ptr, la.prod, 0)
                    if rem.dev == sdev:
                        self._local(la, flat, rem, pieces, p)
                        last = la
                    else:
                        last = self._across(la, lane_i, flat, rem, pieces, p, d)
                    d.use(last.dev)
                    if imm is not None:
                        self._post_imm(t, dst, imm, last, p)
                    p.dev = last.dev
                    p.ev = self._event(last.dev)
                    rt.eventRecord(p.ev, last.ptr)
        except BaseException:
            if p.slots and self._ring is not None:
                self._ring.give(p.slots)
            raise
        finally:
            d.restore()
        p.t0 = time.perf_counter()
        t.hooks.append(lambda: self._finish(p))  # a caller waiting in result() completes it itself
        with self._cond:
            self._queue.append(p)
            if self._sleeping:  # blocked, not napping: wake it (one C call, no Condition.notify)
                self._wakeup()

    def _post_resident(self, t: Transfer, dst: MemoryDescriptor, flat: Any, rem: _Remote, pg: _PageIdx,
                       p: _Pending, d: _Device, imm: int | None) -> bool:
        """Hand a paged write on one GPU to the resident copier: its indices into a ring slot, one job into
        the copier's ring. False (the caller launches it) while the source's stream is busy (the lane's
        stream orders the copy after those producers; the copier cannot), when no copier runs or its ring
        or the slot ring is full."""
        dev = rem.dev
        d.use(dev)
        if self.rt.streamQuery(self._current_stream(dev)) != 0:
            return False
        ring = self._host_ring()  # allocated before the copier starts (pinned allocations may synchronise)
        res = self._resident.get(dev, False)
        if res is False:
            res = self._start_resident(dev, d)
        if res is None:
            return False
        got = ring.take(2 * pg.n)
        if got is None:
            return False
        slot, view, ptr = got
        view[:] = pg.idx
        with res.lock:
            ticket = res.post(int(flat.data_ptr()) + pg.so, rem.ptr + pg.do, ptr, pg.n, pg.page, pg.ss, pg.ds)
        if ticket is None:
            ring.give([slot])
            self.used["resident_full"] += 1
            return False
        p.slots.append(slot)
        p.res, p.ticket, p.dev = res, ticket, dev
        if imm is not None:
            self._post_imm(t, dst, imm, None, p)
        self.used["resident"] += 1
        return True

    def _start_resident(self, dev: int, d: _Device) -> Any:
        def make() -> Any:
            from kernels._cuda import ResidentPages

            d.use(dev)
            return ResidentPages(dev, self.torch, ctas=self.resident_ctas)

        return self._once(self._resident, dev, make, "resident page copier")

    def _once(self, cache: dict[int, Any], dev: int, make: Any, what: str,
              then: str = "paged writes are launched") -> Any:
        """`cache[dev]`, made by `make()` on first use: None for good where it cannot be made (no CuPy, NVRTC,
        memory or graphs), and `then` says what serves instead (logged once)."""
        with self._lock:
            got = cache.get(dev, False)
            if got is not False:
                return got
            try:
                got = make()
            except Exception as exc:  # noqa: BLE001 - the launch path remains
                self.engine._log(f"cuda_ipc: no {what} on cuda:{dev} ({type(exc).__name__}: {exc}); {then}")
                got = None
            cache[dev] = got
        return got

    def _host_ring(self) -> _HostRing:
        ring = self._ring
        if ring is None:
            with self._lock:
                if self._ring is None:
                    self._ring = _HostRing(self.torch)
                ring = self._ring
        return ring

    def _local(self, la: _Lane, flat: Any, rem: _Remote, pieces: Pieces, p: _Pending) -> None:
        if type(pieces) is _PageIdx:
            if self._pages(la, int(flat.data_ptr()), rem.ptr, pieces, p):
                return
            pieces = pieces.pieces()
        if len(pieces) == 1:
            n = int(pieces.length[0])
            if n:
                self.rt.memcpyAsync(rem.ptr + int(pieces.dst[0]), int(flat.data_ptr()) + int(pieces.src[0]), n,
                                    MEMCPY_DEFAULT, la.ptr)
            self.used["memcpy"] += 1
            return
        if pieces.page and self._pages_ok and self.kernel != "torch":  # equal pieces: byte offsets as indices
            pg = _PageIdx(np.concatenate((pieces.src, pieces.dst)), pieces.page, 1, 1, 0, 0)
            if self._pages(la, int(flat.data_ptr()), rem.ptr, pg, p):
                return
        self._ranges(la, flat, rem.tensor, pieces.src, pieces.dst, pieces.length, p)

    def _pages(self, la: _Lane, src_ptr: int, dst_ptr: int, pg: _PageIdx, p: _Pending) -> bool:
        """Equal pages (a paged write) on one GPU: their page indices go into a pinned ring slot as they are and
        one `copy_pages_pg` / `copy_pages_idx` launch moves them, computing each page's addresses from its index,
        the strides and the offsets (no byte offsets, splitting or word-size arithmetic on the host: the kernel
        picks the word per 4 KiB chunk), on the lane's stream. A write of pages of at least `index_device_page`
        bytes and more than `index_device_bytes` in all first copies the slot into its part of the device mirror
        (`_device_index`) and the kernel reads the indices there.
        False when no slot is free or the kernel is unavailable (the caller moves the pages another way)."""
        if self.pages == "graph" and self._pages_graph(la, src_ptr, dst_ptr, pg, p):
            return True
        n, page = pg.n, pg.page
        ring = self._host_ring()
        got = ring.take(2 * n)
        if got is None:
            return False
        slot, view, ptr = got
        queued = False  # a copy of the slot into the device mirror is queued: the slot stays with the write
        try:
            launch = self._copy_pages.get(la.dev)
            if launch is None:
                from kernels._cuda import index_copier

                launch = self._copy_pages[la.dev] = index_copier(la.dev)
            view[:] = pg.idx
            if page >= self.index_device_page > 0 and n * page > self.index_device_bytes:
                dptr = self._device_index(la, slot, ptr, 2 * n)
                queued = dptr != ptr
                ptr = dptr
            # submit made the lane's device current
            launch(src_ptr + pg.so, dst_ptr + pg.do, ptr, n, page, pg.ss, pg.ds, la.ptr)
        except Exception as exc:  # noqa: BLE001 - no CuPy / no NVRTC: the range path (or torch) does the rest
            self._pages_ok = False
            if queued:  # the queued index copy still reads the slot: it goes back with the write's completion
                p.slots.append(slot)
            else:
                ring.give([slot])
            if self.kernel == "cupy":
                if queued:  # the caller gives the write's slots back at once when posting fails
                    self.rt.streamSynchronize(la.ptr)
                raise TransportError(f"cuda_ipc: the CuPy page-copy kernel failed: {exc}") from exc
            self.engine._log(f"cuda_ipc: page-copy kernel unavailable ({type(exc).__name__}: {exc})")
            return False
        p.slots.append(slot)
        self.used["pages"] += 1
        return True

    def _device_index(self, la: _Lane, slot: int, host_ptr: int, nwords: int) -> int:
        """Copy `nwords` index words from ring slot `slot` (at `host_ptr`) into that slot's part of the device mirror
        of the ring on the lane's stream (ordered before the kernel launched next on it; the slot, and with it its
        part of the mirror, stays with the write until it completed) and return the mirror's address; `host_ptr`
        when no mirror can be had (the kernel then reads the slot through mapped memory)."""
        mirror = self._mirrors.get(la.dev, False)
        if mirror is False:
            mirror = self._once(self._mirrors, la.dev, lambda: self._make_mirror(la.dev), "device index buffer",
                                "page kernels read their indices from pinned host memory")
        if mirror is None:
            return host_ptr
        dptr = int(mirror[1]) + slot * _HostRing.SLOT
        try:
            self.rt.memcpyAsync(dptr, host_ptr, 8 * nwords, MEMCPY_HOST_TO_DEVICE, la.ptr)
        except Exception as exc:  # noqa: BLE001 - the kernel reads the slot through mapped memory from now on
            self.index_device_page = 0
            self.engine._log(f"cuda_ipc: copying page indices to cuda:{la.dev} failed ({type(exc).__name__}: {exc}); "
                             "page kernels read them from pinned host memory")
            return host_ptr
        self.used["pages_device_idx"] += 1
        return dptr

    def _make_mirror(self, dev: int) -> tuple[Any, int]:
        """A device buffer on `dev` (current) the size of the host ring: slot i's indices go to byte i * SLOT."""
        torch = self.torch
        buf = torch.empty(_HostRing.SLOT * _HostRing.SLOTS, dtype=torch.uint8, device=f"cuda:{dev}")
        return buf, int(buf.data_ptr())

    def _pages_graph(self, la: _Lane, src_ptr: int, dst_ptr: int, pg: _PageIdx, p: _Pending) -> bool:
        """`pages="graph"`: the job (six words, then the page indices as they are) into a ring slot and one
        `cudaGraphLaunch` of that slot's graph (`kernels._cuda.GraphPages`, captured once per slot). False when
        no graph can be made or no slot is free (the caller launches the kernel)."""
        from kernels._cuda import JOB_HEADER, store_job

        ring = self._host_ring()
        gp = self._graphs.get(la.dev, False)
        if gp is False:
            gp = self._start_graphs(la.dev, ring)
        if gp is None:
            return False
        got = ring.take(JOB_HEADER + 2 * pg.n)
        if got is None:
            return False
        slot, view, ptr = got
        try:
            store_job(ring.bytes, slot * ring.SLOT, src_ptr + pg.so, dst_ptr + pg.do, pg.n, pg.page, pg.ss, pg.ds)
            view[JOB_HEADER:] = pg.idx
            gp.launch(ptr, la.ptr)  # submit made the lane's device current
        except Exception as exc:  # noqa: BLE001 - the kernel is launched instead from now on
            ring.give([slot])
            self._graphs[la.dev] = None
            self.engine._log(f"cuda_ipc: graph launch of a paged write failed ({type(exc).__name__}: {exc}); "
                             "paged writes are launched")
            return False
        p.slots.append(slot)
        self.used["graph"] += 1
        return True

    def _start_graphs(self, dev: int, ring: _HostRing) -> Any:
        def make() -> Any:
            from kernels._cuda import GraphPages

            return GraphPages(dev, ring.slot_ptrs())

        return self._once(self._graphs, dev, make, "page-copy graphs")

    def _across(self, la: _Lane, lane_i: int, flat: Any, rem: _Remote, pieces: Pieces, p: _Pending,
                d: _Device) -> _Lane:
        """Copy to another GPU; returns the lane whose stream holds the last operation."""
        rt = self.rt
        sdev, ddev = la.dev, rem.dev
        self._enable_peer(sdev, ddev, d)
        src_ptr = int(flat.data_ptr())
        self.used["peer"] += 1
        if len(pieces) == 1 and self.peer == "direct":
            n = int(pieces.length[0])
            d.use(sdev)
            if n:
                rt.memcpyAsync(rem.ptr + int(pieces.dst[0]), src_ptr + int(pieces.src[0]), n, MEMCPY_DEFAULT, la.ptr)
            self.used["memcpy"] += 1
            return la
        lb = self._lane(ddev, lane_i, d)
        x = self._cross_state(lane_i, sdev, ddev, d)
        d.use(sdev)
        if x.bdone_set:  # the last write of this lane finished reading the staging ring
            rt.streamWaitEvent(la.ptr, x.bdone, 0)
        if len(pieces) == 1:
            self._staged_contiguous(la, lb, x, src_ptr + int(pieces.src[0]), rem.ptr + int(pieces.dst[0]),
                                    int(pieces.length[0]), d)
        else:
            so, do, ln = _split(pieces.src, pieces.dst, pieces.length, STAGE_BYTES)
            start = 0
            while start < ln.size:  # groups of pieces that fit the staging ring
                ends = np.cumsum(ln[start:])
                stop = start + max(1, int(np.searchsorted(ends, STAGE_BYTES, side="right")))
                self._staged_pieces(la, lb, x, flat, rem, so[start:stop], do[start:stop], ln[start:stop], p, d)
                start = stop
        d.use(ddev)
        rt.eventRecord(x.bdone, lb.ptr)
        x.bdone_set = True
        return lb

    def _staged_contiguous(self, la: _Lane, lb: _Lane, x: _Cross, src: int, dst: int, n: int, d: _Device) -> None:
        """n bytes src (source GPU) -> dst (peer's memory on the destination GPU) in pipelined chunks: peer
        copies on the source lane, local copies on the destination lane, one round of slots at a time."""
        rt = self.rt
        chunks = [(o, min(STAGE_CHUNK, n - o)) for o in range(0, n, STAGE_CHUNK)]
        for r0 in range(0, len(chunks), STAGE_SLOTS):
            rnd = chunks[r0:r0 + STAGE_SLOTS]
            d.use(la.dev)
            for j, (o, k) in enumerate(rnd):
                if r0:
                    rt.streamWaitEvent(la.ptr, x.freed[j], 0)  # slot j was read by the previous round
                rt.memcpyAsync(x.stage_ptr + j * STAGE_CHUNK, src + o, k, MEMCPY_DEFAULT, la.ptr)
                rt.eventRecord(x.copied[j], la.ptr)
            d.use(lb.dev)
            for j, (o, k) in enumerate(rnd):
                rt.streamWaitEvent(lb.ptr, x.copied[j], 0)
                rt.memcpyAsync(dst + o, x.stage_ptr + j * STAGE_CHUNK, k, MEMCPY_DEFAULT, lb.ptr)
                rt.eventRecord(x.freed[j], lb.ptr)
        self.used["memcpy"] += 1

    def _staged_pieces(self, la: _Lane, lb: _Lane, x: _Cross, flat: Any, rem: _Remote, so: np.ndarray,
                       do: np.ndarray, n: np.ndarray, p: _Pending, d: _Device) -> None:
        """Pieces (total <= the staging ring) to another GPU: gather on the source GPU, one peer copy, scatter
        on the destination GPU."""
        rt = self.rt
        total = int(n.sum())
        if not total:
            return
        at = np.zeros(n.size, np.int64)
        np.cumsum(n[:-1], out=at[1:])
        d.use(la.dev)
        if x.gather is None or x.gather.numel() < total:
            if x.gather is not None:
                x.gather.record_stream(la.stream)  # freed only after this lane's queued work
            x.gather = self.torch.empty(max(total, 1 << 20), dtype=self.torch.uint8, device=flat.device)
            x.gather_ptr = int(x.gather.data_ptr())
        self._ranges(la, flat, x.gather, so, at, n, p)
        rt.memcpyAsync(x.stage_ptr, x.gather_ptr, total, MEMCPY_DEFAULT, la.ptr)
        rt.eventRecord(x.copied[0], la.ptr)
        d.use(lb.dev)
        rt.streamWaitEvent(lb.ptr, x.copied[0], 0)
        self._ranges(lb, x.stage, rem.tensor, at, do, n, p)
        rt.eventRecord(x.freed[0], lb.ptr)
        d.use(la.dev)
        rt.streamWaitEvent(la.ptr, x.freed[0], 0)  # the next group overwrites the staging ring

    def _ranges(self, lane: _Lane, a: Any, b: Any, so: np.ndarray, do: np.ndarray, n: np.ndarray,
                p: _Pending) -> None:
        """b[do[i]:do[i]+n[i]] = a[so[i]:so[i]+n[i]] on `lane`'s stream (a and b on its device, current)."""
        if self.kernel != "torch":
            try:
                self._ranges_kernel(lane, a, b, so, do, n, p)
                return
            except Exception as exc:  # noqa: BLE001 - no CuPy / no NVRTC: torch does the same moves
                if self.kernel == "cupy":
                    raise TransportError(f"cuda_ipc: the CuPy copy kernel failed: {exc}") from exc
                self.engine._log(f"cuda_ipc: CuPy copy kernel unavailable ({type(exc).__name__}: {exc}); using torch")
                self.kernel = "torch"
        torch = self.torch
        with torch.cuda.stream(lane.stream):
            dev = a.device
            page = int(n[0]) if n.size else 0
            if n.size and (n == page).all():  # equal pages: one gather and one scatter over word indices
                w = min(8, _word(page, a.data_ptr(), b.data_ptr(), np.bitwise_or.reduce(so),
                                 np.bitwise_or.reduce(do)))
                dt = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w]
                av, bv = a[: a.numel() // w * w].view(dt), b[: b.numel() // w * w].view(dt)
                ar = torch.arange(page // w, device=dev)
                si = torch.from_numpy(so // w).to(dev, non_blocking=True)[:, None] + ar
                di = torch.from_numpy(do // w).to(dev, non_blocking=True)[:, None] + ar
                bv[di.reshape(-1)] = av[si.reshape(-1)]
            else:
                for x, y, k in zip(so.tolist(), do.tolist(), n.tolist()):
                    b.narrow(0, y, k).copy_(a.narrow(0, x, k), non_blocking=True)
        self.used["torch"] += 1

    def _ranges_kernel(self, lane: _Lane, a: Any, b: Any, so: np.ndarray, do: np.ndarray, n: np.ndarray,
                       p: _Pending) -> None:
        from kernels._cuda import copy_ranges

        a_ptr, b_ptr = int(a.data_ptr()), int(b.data_ptr())
        w = _word(a_ptr, b_ptr, np.bitwise_or.reduce(so), np.bitwise_or.reduce(do), np.bitwise_or.reduce(n))
        s, t, k = _split(so, do, n, CHUNK)
        count = int(k.size)
        if not count:
            return
        if self._ring is None:
            with self._lock:
                if self._ring is None:
                    self._ring = _HostRing(self.torch)
        got = self._ring.take(3 * count)
        if got is not None:  # the kernel reads the list from pinned host memory
            slot, view, ptr = got
            p.slots.append(slot)
            if w == 1:
                view[:count], view[count:2 * count], view[2 * count:] = s, t, k
            else:
                np.floor_divide(s, w, out=view[:count])
                np.floor_divide(t, w, out=view[count:2 * count])
                np.floor_divide(k, w, out=view[2 * count:])
        else:  # no free slot: upload the list on the lane's stream (ordered before the kernel)
            torch = self.torch
            r = np.concatenate([s // w, t // w, k // w]).astype(np.int64, copy=False)
            with torch.cuda.stream(lane.stream):
                dev_r = torch.from_numpy(r).pin_memory().to(a.device, non_blocking=True)
            dev_r.record_stream(lane.stream)
            ptr = int(dev_r.data_ptr())
            self.used["upload"] += 1
        copy_ranges(a_ptr, b_ptr, ptr, count, w, lane.dev, lane.ptr)
        self.used["kernel"] += 1

    # immediates --------------------------------------------------------------
    def _outbox(self, dst: MemoryDescriptor) -> Any:
        name = dst.extra.get("mbox")
        if not isinstance(name, str):
            return None
        box = self._outboxes.get(name, False)
        if box is not False:
            return box
        from transport.backends.cuda_ipc_mailbox import MailboxError, Outbox

        with self._lock:
            box = self._outboxes.get(name, False)
            if box is not False:
                return box
            box = None
            try:
                box = Outbox(name, self.engine.name)
                try:
                    self.rt.hostRegister(box.address, box.nbytes, HOST_REGISTER_PORTABLE_MAPPED)
                    self._registered.append(box.address)
                except Exception as exc:  # noqa: BLE001 - entries are then stored from the host
                    self.engine._log(f"cuda_ipc: cannot register the imm mailbox with CUDA ({exc}); "
                                     "immediates are posted from the host")
                    self._gpu_imm = False
            except (MailboxError, OSError, ValueError) as exc:
                self.engine._log(f"cuda_ipc: imm mailbox of {dst.engine}: {exc}; immediates over the control socket")
                box = None
            self._outboxes[name] = box
        return box

    def _post_imm(self, t: Transfer, dst: MemoryDescriptor, imm: int, last: _Lane | None, p: _Pending) -> None:
        """Post the immediate after the copy on `last`'s stream (its device is current); with no lane (the
        resident copier's writes) the host stores it once the copy completed."""
        from transport.backends.cuda_ipc_mailbox import pack

        box = self._outbox(dst)
        got = box.reserve() if box is not None else None
        if got is None:
            p.notice = (dst, imm, t.tid)
            self.used["imm_socket"] += 1
            return
        addr, seq = got
        word = pack(imm, dst.region)
        if last is not None and self._gpu_imm and self._host_pointer_ok(last.dev):
            try:
                from kernels._cuda import post_imm

                post_imm(addr, word, seq, last.dev, last.ptr)
                self.used["imm_gpu"] += 1
                return
            except Exception as exc:  # noqa: BLE001 - the host stores it once the copy completed
                self._gpu_imm = False
                self.engine._log(f"cuda_ipc: the imm kernel failed ({type(exc).__name__}: {exc}); "
                                 "immediates are posted from the host")
        p.host_imm = (box, addr, word, seq)
        self.used["imm_host"] += 1

    def _host_pointer_ok(self, dev: int) -> bool:
        ok = self._host_ptr_ok.get(dev)
        if ok is None:
            try:
                ok = bool(self.rt.deviceGetAttribute(CAN_USE_HOST_POINTER, dev))
            except Exception:  # noqa: BLE001
                ok = False
            self._host_ptr_ok[dev] = ok
        return ok

    # completion --------------------------------------------------------------
    def _complete(self, p: _Pending, exc: BaseException | None) -> None:
        with p.lock:
            if p.fired:
                return
            p.fired = True
        if exc is None and p.ev:
            self._give_event(p.dev, p.ev)
        if p.slots and self._ring is not None:
            self._ring.give(p.slots)
        if exc is None:
            try:
                if p.host_imm is not None:
                    box, addr, word, seq = p.host_imm
                    box.write_host(addr, word, seq)
                if p.notice is not None:
                    dst, imm, tid = p.notice
                    notify = getattr(self.engine, "_notify_imm", None)
                    if notify is not None:
                        notify(dst, imm, tid)
            except Exception as e:  # noqa: BLE001
                exc = TransportError(f"cuda_ipc: delivering the immediate failed: {e}")
        done, p.done = p.done, _done_nothing  # what the callback holds (a paged write's index lists) is freed
        try:                                  # in this thread, usually the caller's, not later in the poller's
            done(exc)
        except Exception as e:  # noqa: BLE001 - never let one completion stop the poller
            self.engine._log(f"cuda_ipc: completion callback failed: {e}")

    def _finish(self, p: _Pending) -> None:
        """Wait for `p` in the calling thread (GIL released while the GPU finishes) and complete it."""
        if p.fired:
            return
        if p.res is not None:
            self._wait_resident(p)
            return
        try:
            self.rt.eventSynchronize(p.ev)
        except Exception as exc:  # noqa: BLE001
            self._complete(p, TransportError(f"cuda_ipc: the copy failed on the GPU: {exc}"))
            return
        self._complete(p, None)

    def _wait_resident(self, p: _Pending) -> None:
        """Wait for the resident copier's done word of `p`: read it back to back (the copy usually takes tens
        of microseconds), every 1024 reads check the copier still runs and sleep 20 µs."""
        res, ticket = p.res, p.ticket
        k = 0
        while not res.finished(ticket):
            k += 1
            if not k & 1023:
                if not res.alive():
                    self._complete(p, TransportError("cuda_ipc: the resident page copier stopped before the write "
                                                     "finished"))
                    return
                time.sleep(20e-6)
        self._complete(p, None)

    def _wakeup(self) -> None:
        """Wake the blocked poller (the caller holds `_cond`)."""
        self._sleeping = False
        try:
            self._wake.release()
        except RuntimeError:  # a wake-up is pending already (the poller left its wait before consuming one)
            pass

    def _poll(self) -> None:
        """Complete the writes nobody waits for. Once nothing is queued it naps `idle_naps` grace periods (looking
        at the queue after each; a submit does not wake it), then blocks until a submit wakes it (a released
        lock: one C call in the posting thread); with writes queued it sleeps until the earliest write's grace
        period ends, when a caller waiting in result() has usually completed it already, then queries events with
        a back-off. While writes come back to back it runs about once per grace period, not once per write."""
        wake = self._wake
        while True:
            naps = 0
            while True:
                with self._cond:
                    if self._closed:
                        return  # pending completions never fire after close (see DataPath.close)
                    if self._queue:
                        self._sleeping = False
                        items = list(itertools.islice(self._queue, 64))
                        break
                    deep = naps >= self.idle_naps  # napping: a submit does not wake it, the nap's end does
                    self._sleeping = deep
                wake.acquire(True, 1.0 if deep else GRACE_S)  # a wake-up (consumed), or the time is up
                naps += 1
            now = time.perf_counter()
            finished: list[_Pending] = []
            wait = MAX_TICK_S
            for p in items:
                if p.fired:
                    finished.append(p)
                    continue
                age = now - p.t0
                if age < GRACE_S:
                    wait = min(wait, GRACE_S - age)
                    continue
                if p.res is not None:
                    st = 0 if p.res.finished(p.ticket) else NOT_READY if p.res.alive() else -1
                else:
                    st = self.rt.eventQuery(p.ev)
                if st == 0:
                    self._complete(p, None)
                    finished.append(p)
                elif st == NOT_READY:
                    wait = min(wait, max(TICK_S, age / 8))
                else:
                    why = "the resident page copier stopped" if st == -1 else f"CUDA error {st}"
                    self._complete(p, TransportError(f"cuda_ipc: the copy failed on the GPU ({why})"))
                    finished.append(p)
            if finished:
                gone = set(map(id, finished))
                with self._cond:
                    self._queue = deque(q for q in self._queue if id(q) not in gone)
                    if not self._queue:
                        continue
                if len(finished) == len(items):
                    continue  # the rest of a long queue: look at it now
            time.sleep(wait)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            if self._sleeping:
                self._wakeup()
        self._poller.join(5)
        rt = self.rt
        for dev, res in list(self._resident.items()):  # it finishes the jobs posted, then exits
            if res is not None and not res.stop():
                self.engine._log(f"cuda_ipc: the resident page copier on cuda:{dev} did not stop within 5 s")
        self._resident.clear()
        try:  # queued copies and imm kernels may still touch the staging, the mailboxes, the events
            for la in list(self._lanes.values()):
                la.stream.synchronize()
        except Exception as exc:  # noqa: BLE001
            self.engine._log(f"cuda_ipc: close: {exc}")
        for gp in self._graphs.values():
            if gp is not None:
                gp.close()
        self._graphs.clear()
        self._mirrors.clear()  # the lanes' queued index copies and kernels finished above
        for addr in self._registered:
            try:
                rt.hostUnregister(addr)
            except Exception:  # noqa: BLE001
                pass
        self._registered.clear()
        for box in self._outboxes.values():
            if box is not None:
                box.close()
        self._outboxes.clear()
        if self._mailbox is not None:
            self._mailbox.close()
            self._mailbox = None
        for _dev, ev in self._all_events:
            try:
                rt.eventDestroy(ev)
            except Exception:  # noqa: BLE001
                pass
        self._all_events.clear()
        self._events.clear()
        with self._lock:
            self._opened.clear()
            self._cross.clear()
