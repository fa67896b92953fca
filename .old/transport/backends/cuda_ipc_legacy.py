"""The previous CUDA IPC data path, kept behind `WORKBENCH_CUDA_IPC=legacy` (or `Engine("cuda_ipc", path="legacy")`).

It is the known-good path the fast one (`transport.backends.cuda_ipc`) replaced: torch streams,
events and copies for every write, immediates over the control socket. Unchanged otherwise:

A registered CUDA tensor's descriptor carries its CUDA IPC handle (through
`torch.multiprocessing.reductions.reduce_tensor`). A writer on the same host (same boot)
opens the peer's memory once per registration (cached until the peer revokes it) and
copies on a CUDA stream per lane, in the caller's thread:

- one contiguous write: one `copy_` (a device-to-device or peer-to-peer memcpy);
- many pieces (a paged write of a whole layer, a batch of writes to one region): one
  `copy_ranges` kernel (`kernels._cuda`) that reads every local page and writes it straight
  into the peer's pages; its list of ranges is written into a slot of a pinned host ring
  that the kernel reads directly (no upload); between two GPUs: one gather kernel on the
  source GPU, one peer-to-peer memcpy, one scatter kernel on the destination GPU (no
  kernel dereferences the other GPU's memory). Without CuPy the same moves run as torch
  indexing;
- a contiguous write to another GPU goes peer-to-peer into a staging buffer on that GPU,
  then into the peer's memory by a local copy: copying straight into memory that another
  process exported is several times slower between GPUs (measured on two H200s: 16 MiB in
  473 µs directly, ~60 µs into a plain buffer);
- completion: a CUDA event recorded after the copy; the engine's poller thread waits for it
  (`cudaEventSynchronize`, GIL released) and completes the transfer. The bytes are then in
  the peer's memory, so no acknowledgement round trip is needed; an immediate goes to the
  peer as a one-way notice on the engine's control socket.

Writes that are not CUDA→CUDA on one host fall back to the TCP lanes.
"""

from __future__ import annotations

import base64
import itertools
import pickle
import threading
from collections import Counter, deque
from typing import Any

import numpy as np

from transport.backends.base import DataPath, Done, EngineView, Pieces
from transport.completion import Transfer
from transport.descriptors import MemoryDescriptor
from transport.errors import BackendUnavailable, TransportError
from transport.memory import Region

CHUNK = 64 << 10  # bytes per CUDA block of the range-copy kernel (long pieces are split into chunks)


class _Busy:
    """A ring slot taken by a submission whose completion event is not recorded yet."""

    @staticmethod
    def query() -> bool:
        return False


class _HostRing:
    """Pinned host slots holding the range lists the copy kernel reads (mapped into the device's
    address space by unified addressing: no upload). A slot is reused once the event of the copy
    that read it completed; when none is free the caller uploads the list instead."""

    SLOT = 64 << 10
    SLOTS = 64

    def __init__(self, torch: Any) -> None:
        self.buf = torch.empty(self.SLOT * self.SLOTS, dtype=torch.uint8, pin_memory=True)
        self.words = self.buf.numpy().view(np.int64)
        self.ptr = int(self.buf.data_ptr())
        self.busy: list[Any] = [None] * self.SLOTS
        self.next = 0
        self.lock = threading.Lock()

    def take(self, r: np.ndarray) -> tuple[int, int] | None:
        """(slot, device-readable address of `r`'s copy), or None when no slot is free."""
        if r.nbytes > self.SLOT:
            return None
        with self.lock:
            i = self.next
            ev = self.busy[i]
            if ev is not None and not ev.query():
                return None
            self.next = (i + 1) % self.SLOTS
            self.busy[i] = _Busy
        off = i * self.SLOT // 8
        self.words[off:off + r.size] = r
        return i, self.ptr + i * self.SLOT

    def release(self, slots: list[int], event: Any) -> None:
        for i in slots:
            self.busy[i] = event


def _word(*values: int) -> int:
    """The widest word (16, 8, 4, 2 or 1 bytes) dividing every value."""
    acc = 0
    for v in values:
        acc |= int(v)
    for w in (16, 8, 4, 2):
        if acc % w == 0:
            return w
    return 1


def _ranges(src: np.ndarray, dst: np.ndarray, length: np.ndarray, word: int) -> np.ndarray:
    """int64 [3n]: source offsets, destination offsets, lengths, in words, long pieces split into chunks."""
    keep = length > 0
    s, d, n = src[keep] // word, dst[keep] // word, length[keep] // word
    cw = max(1, CHUNK // word)
    if n.size and int(n.max()) > cw:
        k = -(-n // cw)
        rep = np.repeat(np.arange(n.size), k)
        j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        s, d, n = s[rep] + j * cw, d[rep] + j * cw, np.minimum(cw, n[rep] - j * cw)
    return np.concatenate([s, d, n]).astype(np.int64, copy=False)


class _Once:
    """A completion callback that runs once, whoever calls it first (the poller or a waiting caller)."""

    __slots__ = ("done", "fired", "lock")

    def __init__(self, done: Done) -> None:
        self.done, self.fired, self.lock = done, False, threading.Lock()

    def __call__(self, exc: BaseException | None) -> None:
        with self.lock:
            if self.fired:
                return
            self.fired = True
        self.done(exc)


class LegacyCudaIpcPath(DataPath):
    """The previous data path of `Engine(backend="cuda_ipc")`.

    kernel: `auto` (the CuPy range-copy kernel when CuPy works, else torch), `cupy` or `torch`.
    """

    name = "cuda_ipc"

    def __init__(self, engine: EngineView, kernel: str = "auto") -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover
            raise BackendUnavailable("cuda_ipc needs torch with CUDA") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailable("cuda_ipc: no CUDA device is visible (use backend='tcp')")
        if kernel not in ("auto", "cupy", "torch"):
            raise BackendUnavailable(f"cuda_ipc: kernel must be auto, cupy or torch, got {kernel!r}")
        super().__init__(engine)
        self.torch = torch
        self.kernel = kernel
        self.used: Counter[str] = Counter()  # how pieces were moved: memcpy, kernel, torch, peer
        self._streams: dict[tuple[int, int], Any] = {}
        self._opened: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._ring: _HostRing | None = None
        self._queue: deque[tuple[Any, Done]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._poller = threading.Thread(target=self._poll, name=f"wbt-{engine.name}-ipc", daemon=True)
        self._poller.start()

    # registration ------------------------------------------------------------
    def describe(self, region: Region) -> dict[str, Any]:
        if not region.is_cuda:
            return {}
        from torch.multiprocessing.reductions import reduce_tensor

        fn, args = reduce_tensor(region.flat)
        return {"ipc": base64.b64encode(pickle.dumps((fn, args))).decode()}

    def forget_remote(self, peer: str, region: int) -> None:
        with self._lock:
            self._opened.pop((peer, region), None)

    def handles(self, src: Region, dst: MemoryDescriptor) -> bool:
        return (src.is_cuda and dst.device.startswith("cuda") and "ipc" in dst.extra
                and dst.address.hostid == self.engine.address.hostid)

    @property
    def confirms_delivery(self) -> bool:
        return True

    def _remote(self, dst: MemoryDescriptor) -> Any:
        key = (dst.engine, dst.region)
        t = self._opened.get(key)
        if t is None:
            with self._lock:
                t = self._opened.get(key)
                if t is None:
                    fn, args = pickle.loads(base64.b64decode(dst.extra["ipc"]))
                    t = fn(*args)
                    if t.numel() < dst.nbytes:
                        raise TransportError(f"cuda_ipc: the peer's region {dst.region} maps {t.numel()} bytes, "
                                             f"the descriptor claims {dst.nbytes}")
                    self._opened[key] = t
        return t

    def _stream(self, device: int, lane: int) -> Any:
        key = (device, lane)
        s = self._streams.get(key)
        if s is None:
            with self._lock:
                s = self._streams.get(key)
                if s is None:
                    s = self._streams[key] = self.torch.cuda.Stream(device=device)
        return s

    # data path ---------------------------------------------------------------
    def submit(self, t: Transfer, src: Region, dst: MemoryDescriptor, pieces: Pieces, done: Done,
               imm: int | None = None) -> None:
        torch = self.torch
        remote = self._remote(dst)
        flat = src.flat
        sdev, ddev = flat.device, remote.device
        lane = next(self._rr) % self.lanes
        t.lanes = (lane,)
        s = self._stream(sdev.index, lane)
        slots: list[int] = []
        with torch.cuda.device(sdev.index):
            s.wait_stream(torch.cuda.current_stream(sdev.index))  # the source's producers finish first
            with torch.cuda.stream(s):
                if sdev == ddev:
                    self._copy_local(flat, remote, pieces, s, slots)
                    last = s
                else:
                    ds = self._stream(ddev.index, lane)
                    with torch.cuda.device(ddev.index), torch.cuda.stream(ds):
                        self._copy_across(flat, remote, pieces, s, ds, slots)
                    last = ds
                ev = torch.cuda.Event()
                ev.record(last)
        if slots and self._ring is not None:
            self._ring.release(slots, ev)
        once = _Once(done)
        t.hooks.append(lambda: self._finish(ev, once))  # a caller waiting in result() finishes it itself
        with self._cond:
            self._queue.append((ev, once))
            self._cond.notify()

    def _copy_local(self, flat: Any, remote: Any, pieces: Pieces, s: Any, slots: list[int]) -> None:
        if len(pieces) == 1:
            so, do, n = int(pieces.src[0]), int(pieces.dst[0]), int(pieces.length[0])
            remote.narrow(0, do, n).copy_(flat.narrow(0, so, n), non_blocking=True)
            self.used["memcpy"] += 1
            return
        self._ranges(flat, remote, pieces.src, pieces.dst, pieces.length, s, slots)

    def _copy_across(self, flat: Any, remote: Any, pieces: Pieces, s: Any, ds: Any, slots: list[int]) -> None:
        """Between two GPUs: gather on the source GPU, one peer copy into a plain buffer on the
        destination GPU, scatter there (current streams: `s` on the source device, `ds` on the
        destination; torch orders the peer copy between them)."""
        torch = self.torch
        total = pieces.nbytes
        dstage = torch.empty(total, dtype=torch.uint8, device=remote.device)
        self.used["peer"] += 1
        if len(pieces) == 1:
            so, do, n = int(pieces.src[0]), int(pieces.dst[0]), int(pieces.length[0])
            dstage.copy_(flat.narrow(0, so, n), non_blocking=True)
            remote.narrow(0, do, n).copy_(dstage, non_blocking=True)
            return
        starts = np.concatenate([[0], np.cumsum(pieces.length)[:-1]]).astype(np.int64)
        with torch.cuda.device(flat.device.index):
            stage = torch.empty(total, dtype=torch.uint8, device=flat.device)
            self._ranges(flat, stage, pieces.src, starts, pieces.length, s, slots)
        dstage.copy_(stage, non_blocking=True)
        self._ranges(dstage, remote, starts, pieces.dst, pieces.length, ds, slots)

    def _ranges(self, a: Any, b: Any, so: np.ndarray, do: np.ndarray, n: np.ndarray, stream: Any,
                slots: list[int]) -> None:
        """b[do[i]:do[i]+n[i]] = a[so[i]:so[i]+n[i]] on `stream` (a and b on the stream's device)."""
        torch = self.torch
        if self.kernel != "torch":
            try:
                self._ranges_kernel(a, b, so, do, n, stream, slots)
                return
            except Exception as exc:  # noqa: BLE001 - no CuPy / no NVRTC: torch does the same moves
                if self.kernel == "cupy":
                    raise TransportError(f"cuda_ipc: the CuPy copy kernel failed: {exc}") from exc
                self.engine._log(f"cuda_ipc: CuPy copy kernel unavailable ({type(exc).__name__}: {exc}); using torch")
                self.kernel = "torch"
        dev = a.device
        page = int(n[0])
        if (n == page).all():  # equal pages: one gather and one scatter over word indices
            w = min(8, _word(page, a.data_ptr(), b.data_ptr(), np.bitwise_or.reduce(so), np.bitwise_or.reduce(do)))
            dt = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w]
            av, bv = a[: a.numel() // w * w].view(dt), b[: b.numel() // w * w].view(dt)
            ar = torch.arange(page // w, device=dev)
            si = torch.from_numpy(so // w).to(dev)[:, None] + ar
            di = torch.from_numpy(do // w).to(dev)[:, None] + ar
            bv[di.reshape(-1)] = av[si.reshape(-1)]
        else:
            for x, y, k in zip(so.tolist(), do.tolist(), n.tolist()):
                b.narrow(0, y, k).copy_(a.narrow(0, x, k), non_blocking=True)
        self.used["torch"] += 1

    def _ranges_kernel(self, a: Any, b: Any, so: np.ndarray, do: np.ndarray, n: np.ndarray, stream: Any,
                       slots: list[int]) -> None:
        from kernels._cuda import copy_ranges

        torch = self.torch
        w = _word(a.data_ptr(), b.data_ptr(), np.bitwise_or.reduce(so), np.bitwise_or.reduce(do),
                  np.bitwise_or.reduce(n))
        r = _ranges(so, do, n, w)
        count = r.size // 3
        if not count:
            return
        if self._ring is None:
            self._ring = _HostRing(torch)
        got = self._ring.take(r)
        if got is not None:  # the kernel reads the list from pinned host memory
            slots.append(got[0])
            ptr = got[1]
        else:  # no free slot: upload the list (on `stream`, ordered before the kernel)
            dev_r = torch.from_numpy(r).pin_memory().to(a.device, non_blocking=True)
            dev_r.record_stream(stream)
            ptr = dev_r.data_ptr()
            self.used["upload"] += 1
        copy_ranges(a.data_ptr(), b.data_ptr(), ptr, count, w, a.device.index, stream.cuda_stream)
        self.used["kernel"] += 1

    # completion --------------------------------------------------------------
    def _finish(self, ev: Any, done: Done) -> None:
        try:
            ev.synchronize()  # releases the GIL while the GPU finishes
        except Exception as exc:  # noqa: BLE001
            done(TransportError(f"cuda_ipc: the copy failed on the GPU: {exc}"))
            return
        try:
            done(None)
        except Exception as exc:  # noqa: BLE001 - never let one completion stop the poller
            self.engine._log(f"cuda_ipc: completion callback failed: {exc}")

    def _poll(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                ev, done = self._queue.popleft()
            self._finish(ev, done)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._poller.join(5)
        with self._lock:
            self._opened.clear()
