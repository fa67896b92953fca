"""Device memory over the tcp backend: the pages of a paged write staged through pinned host memory.

A GPU's page-copy kernel (`kernels._cuda.index_copier`: page i from `src + idx[i]·ss` to `dst + idx[n+i]·ds`)
reads and writes pinned host memory through unified addressing, so each side of a paged write is one launch:
the sender gathers the pages straight into the pinned buffer it sends from, the receiver scatters them from the
pinned buffer it received into. The page indices ride in the same pinned buffer. Without CuPy (or a device that
cannot use host pointers) torch copies do it: one per run of consecutive pages, or one gather / scatter by
indices. Every call here holds the GIL only for a few small operations, so a lane thread beside a busy serving
engine (a Python loop on the same GIL) gets through quickly.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

import numpy as np

#: a write in at most this many runs of consecutive pages is copied run by run on the torch path (one copy each,
#: no index tensor); more runs go through one gather / scatter by page indices
MAX_RUNS = 8

#: set to 0 to copy with torch (copy engines, one copy per run of pages) instead of the page-copy kernel
KERNEL_ENV = "WORKBENCH_TCP_PAGE_KERNEL"

_KERNELS: dict[int, Any] = {}
_TLS = threading.local()
#: staged buffers with the event after the copy into them: each is kept until the device wrote it, so a write
#: dropped before its copy ran (cancelled, timed out, its peer gone) never frees pinned memory a kernel still writes
_HELD: deque[tuple[Any, Any]] = deque()
_HELD_LOCK = threading.Lock()
_ARANGE = np.arange(1 << 16, dtype=np.int64)


def _whole_pages(offs: np.ndarray, page: int, nbytes: int) -> bool:
    """The region of `nbytes` holds whole pages and every offset starts one (a KV cache's pages)."""
    return not (nbytes % page or (offs % page).any())


def runs(offs: np.ndarray, page: int, nbytes: int) -> list[tuple[int, int]] | None:
    """The pages at byte offsets `offs` as runs of consecutive pages (first page, count) in their order, where the
    region of `nbytes` holds whole pages and every offset starts one (a KV cache's pages); None otherwise."""
    if not _whole_pages(offs, page, nbytes):
        return None
    rows = offs // page
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    first = np.concatenate(([0], cut))
    return list(zip(rows[first].tolist(), np.diff(np.concatenate((first, [len(rows)]))).tolist()))


def _kernel(dev: int) -> Any:
    """The page-copy kernel's launcher on device `dev` (compiled on first use), None where it cannot run or
    `WORKBENCH_TCP_PAGE_KERNEL=0` asks for torch copies."""
    got = _KERNELS.get(dev, False)
    if got is False:
        try:
            if os.environ.get(KERNEL_ENV, "1").strip() == "0":
                raise RuntimeError(f"{KERNEL_ENV}=0")
            from cupy.cuda import runtime

            from kernels._cuda import index_copier
            from transport.backends.cuda_ipc import CAN_USE_HOST_POINTER

            if not runtime.deviceGetAttribute(CAN_USE_HOST_POINTER, dev):
                raise RuntimeError("the device cannot read pinned host memory at its host address")
            got = index_copier(dev)
        except Exception:  # noqa: BLE001 - no CuPy / NVRTC: torch copies
            got = None
        _KERNELS[dev] = got
    return got


def _arange(n: int) -> np.ndarray:
    return _ARANGE[:n] if n <= len(_ARANGE) else np.arange(n, dtype=np.int64)


def _fill(words: np.ndarray, n: int, first: np.ndarray, second: np.ndarray) -> None:
    words[:n] = first
    words[n:2 * n] = second


def _launch(k: Any, dev: int, src: int, dst: int, idx: int, n: int, page: int, ss: int, ds: int, stream: int) -> None:
    """One page-copy launch on `dev` (made the calling thread's current device for it, as the cuda_ipc path does)."""
    from cupy.cuda import runtime

    from transport.backends.cuda_ipc import _Device

    d = _Device(runtime)
    d.use(dev)
    try:
        k(src, dst, idx, n, page, ss, ds, stream)
    finally:
        d.restore()


def _index_tensor(flat: Any, offs: np.ndarray, page: int, rows: bool) -> Any:
    """The pages' row numbers (`rows`) or byte indices as a device tensor, copied there through pinned memory."""
    import torch

    idx = (np.ascontiguousarray(offs // page, dtype=np.int64) if rows
           else (offs.astype(np.int64)[:, None] + np.arange(page)).reshape(-1))
    return torch.from_numpy(idx).pin_memory().to(flat.device, non_blocking=True)


def _copy(flat: Any, offs: np.ndarray, page: int, buf: Any, stream: Any, to_host: bool) -> None:
    """The pages of the device bytes `flat` at byte offsets `offs` to (`to_host`) or from the first len(offs)·page
    bytes of the pinned `buf`, in order, queued on `stream` (the calling thread's current stream on that device):
    one page-copy kernel launch (its 2n indices in `buf` after the pages, 8-byte aligned), else torch copies."""
    n, dev = len(offs), flat.device.index
    nb = n * page
    head = nb + (-nb) % 8
    k = _kernel(dev)
    if k is not None:
        # the device side's indices and their stride: pages where the offsets start pages, else bytes
        at, stride = (offs // page, page) if _whole_pages(offs, page, flat.numel()) else (offs, 1)
        words = buf.numpy()[head:head + 16 * n].view(np.int64)
        ptr, dptr = int(buf.data_ptr()), int(flat.data_ptr())
        if to_host:
            _fill(words, n, at, _arange(n))
            _launch(k, dev, dptr, ptr, ptr + head, n, page, stride, page, stream.cuda_stream)
        else:
            _fill(words, n, _arange(n), at)
            _launch(k, dev, ptr, dptr, ptr + head, n, page, page, stride, stream.cuda_stream)
        return
    r = runs(offs, page, flat.numel())
    if r is not None and len(r) <= MAX_RUNS:
        rows, a = flat.view(-1, page), 0
        for p, c in r:
            host, device = buf[a:a + c * page].view(c, page), rows[p:p + c]
            if to_host:
                host.copy_(device, non_blocking=True)
            else:
                device.copy_(host, non_blocking=True)
            a += c * page
        return
    base = flat.view(-1, page) if r is not None else flat
    idx = _index_tensor(flat, offs, page, r is not None)
    if to_host:
        buf[:nb].copy_(base.index_select(0, idx).reshape(-1), non_blocking=True)
    else:
        pages = buf[:nb].to(flat.device, non_blocking=True)
        base.index_copy_(0, idx, pages.view(-1, page) if r is not None else pages)


def _room(n: int, page: int) -> int:
    """Bytes of a staging buffer for `n` pages and their 2n indices (`_copy`)."""
    nb = n * page
    return nb + (-nb) % 8 + 16 * n


def stage_pages(flat: Any, offs: np.ndarray, page: int) -> tuple[Any, Any]:
    """(a pinned host copy of the pages of the device bytes `flat` at byte offsets `offs`, the CUDA event after it),
    queued on the current stream of `flat`'s device (after the kernels that wrote them)."""
    import torch

    buf = torch.empty(_room(len(offs), page), dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.current_stream(flat.device)
    _copy(flat, offs, page, buf, stream, to_host=True)
    event = torch.cuda.Event()
    event.record(stream)
    with _HELD_LOCK:
        while _HELD and _HELD[0][1].query():
            _HELD.popleft()
        _HELD.append((buf, event))
    return buf[:len(offs) * page], event


def land_pages(read_into: Any, flat: Any, offs: np.ndarray, page: int) -> None:
    """Receive `len(offs)` pages (`read_into(memoryview)` reads them) into this thread's pinned buffer and copy them
    to the device bytes `flat` at byte offsets `offs`, on this thread's own stream (beside, not behind, the kernels
    the region's owner queued); returns once they are there."""
    buf = _recv_buffer(_room(len(offs), page))
    read_into(memoryview(buf.numpy())[:len(offs) * page])
    stream = recv_stream(flat.device)
    _copy(flat, offs, page, buf, stream, to_host=False)
    stream.synchronize()  # the GIL released while the device copies; the buffer is free again after it


def _recv_buffer(nbytes: int) -> Any:
    """This receiving thread's pinned buffer of at least `nbytes` (grown by doubling; reused once a write landed)."""
    import torch

    buf = getattr(_TLS, "buf", None)
    if buf is None or buf.numel() < nbytes:
        size = max(nbytes, 2 * (buf.numel() if buf is not None else 1 << 20))
        buf = _TLS.buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    return buf


def recv_stream(device: Any) -> Any:
    """This receiving thread's stream on `device` (made on first use), made its current stream there."""
    import torch

    streams = getattr(_TLS, "streams", None)
    if streams is None:
        streams = _TLS.streams = {}
    s = streams.get(device)
    if s is None:
        s = streams[device] = torch.cuda.Stream(device)
    if getattr(_TLS, "current", None) is not s:
        torch.cuda.set_stream(s)
        _TLS.current = s
    return s
