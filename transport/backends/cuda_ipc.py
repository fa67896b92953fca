"""CUDA IPC backend: device-to-device writes between processes of one host.

A registered CUDA tensor's descriptor carries its CUDA IPC handle (through
`torch.multiprocessing.reductions.reduce_tensor`). A writer on the same host (same boot)
opens the peer's memory once, copies on one CUDA stream per lane, waits for the copy,
then notifies the peer over the engine's TCP control lane, which counts the immediate and
acknowledges. Writes that are not CUDA->CUDA on one host fall back to the TCP lanes.
"""

from __future__ import annotations

import base64
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from transport.completion import Transfer
from transport.descriptors import MemoryDescriptor
from transport.errors import BackendUnavailable, TransportError
from transport.memory import Region


class CudaIpcPath:
    """The data path of `Engine(backend="cuda_ipc")`."""

    def __init__(self, engine: Any) -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover
            raise BackendUnavailable("cuda_ipc needs torch with CUDA") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailable("cuda_ipc: no CUDA device is visible (use backend='tcp')")
        self.torch = torch
        self.engine = engine
        self.lanes = engine.lanes
        self._pool = ThreadPoolExecutor(max(2, engine.lanes), thread_name_prefix=f"wbt-{engine.name}-ipc")
        self._streams: dict[tuple[int, int], Any] = {}
        self._opened: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    # registration ------------------------------------------------------------
    def describe(self, region: Region) -> dict[str, Any]:
        if not region.is_cuda:
            return {}
        from torch.multiprocessing.reductions import reduce_tensor

        fn, args = reduce_tensor(region.flat)
        return {"ipc": base64.b64encode(pickle.dumps((fn, args))).decode()}

    def forget(self, region: Region) -> None:
        return None

    def handles(self, src: Region, dst: MemoryDescriptor) -> bool:
        return (src.is_cuda and dst.device.startswith("cuda") and "ipc" in dst.extra
                and dst.address.hostid == self.engine.address.hostid)

    def _remote(self, dst: MemoryDescriptor) -> Any:
        key = (dst.engine, dst.region)
        with self._lock:
            t = self._opened.get(key)
            if t is None:
                fn, args = pickle.loads(base64.b64decode(dst.extra["ipc"]))
                t = fn(*args)
                self._opened[key] = t
        return t

    def _stream(self, device: int, lane: int) -> Any:
        key = (device, lane)
        with self._lock:
            s = self._streams.get(key)
            if s is None:
                s = self._streams[key] = self.torch.cuda.Stream(device=device)
        return s

    # data path ---------------------------------------------------------------
    def submit(self, t: Transfer, src: Region, dst: MemoryDescriptor, pieces: list[tuple[int, int, int]],
               done: Callable[[BaseException | None], None]) -> None:
        torch = self.torch
        dev = src.flat.device
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(dev))  # the source's producers finish first
        # shard: split contiguous pieces into lanes; spread paged pieces round-robin
        if len(pieces) == 1 and self.lanes > 1:
            so, do, n = pieces[0]
            k = max(1, -(-n // self.lanes))
            shards = [[(so + o, do + o, min(k, n - o))] for o in range(0, n, k)] or [pieces]
        else:
            shards = [pieces[i::self.lanes] for i in range(min(self.lanes, len(pieces)))]
        t.lanes = tuple(range(len(shards)))

        def work() -> None:
            try:
                remote = self._remote(dst)
                events = []
                for lane, shard in enumerate(shards):
                    s = self._stream(dev.index, lane)
                    s.wait_event(ready)
                    with torch.cuda.stream(s):
                        _copy(torch, remote, src.flat, shard)
                        ev = torch.cuda.Event()
                        ev.record(s)
                        events.append(ev)
                for ev in events:
                    ev.synchronize()
                done(None)
            except Exception as exc:  # noqa: BLE001
                done(TransportError(f"{t.what}: CUDA IPC copy failed: {exc}"))

        self._pool.submit(work)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        with self._lock:
            self._opened.clear()


def _copy(torch: Any, remote: Any, flat: Any, pieces: list[tuple[int, int, int]]) -> None:
    """Copy pieces (src_off, dst_off, n) on the current stream; many equal pages in one gather/scatter."""
    n = pieces[0][2]
    if len(pieces) <= 4 or any(p[2] != n for p in pieces):
        for so, do, k in pieces:
            remote[do:do + k].copy_(flat[so:so + k], non_blocking=True)
        return
    dev = flat.device
    so = torch.tensor([p[0] for p in pieces], dtype=torch.int64).to(dev, non_blocking=True)
    do = torch.tensor([p[1] for p in pieces], dtype=torch.int64).to(dev, non_blocking=True)
    if all(p[0] % n == 0 and p[1] % n == 0 for p in pieces):  # page-aligned: index whole rows
        src_rows = flat[: flat.numel() // n * n].view(-1, n)
        dst_rows = remote[: remote.numel() // n * n].view(-1, n)
        dst_rows[do // n] = src_rows[so // n]
        return
    ar = torch.arange(n, device=dev)
    remote[(do[:, None] + ar).reshape(-1)] = flat[(so[:, None] + ar).reshape(-1)]
