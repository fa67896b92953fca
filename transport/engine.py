"""`Engine`: one-sided point-to-point transfers with TransferEngine semantics.

One engine per process. Register buffers, hand their descriptors to peers, then:

    with Engine(lanes=2) as eng:
        region = eng.register(np.zeros(1 << 20, np.uint8))
        desc_bytes = region.descriptor.to_bytes()            # send to a peer any way you like
        ...
        t = eng.write(src_region, remote_desc, length=4096, imm=7)   # -> Transfer (future)
        t.result(timeout=5)                                  # or add_done_callback / await
        eng.expect(7, n=16).result(timeout=5)                # receiver: 16 imm-7 writes landed

Writes are never ordered; completion is counted (see `ImmCounter`). Every control path
(acks, imm-only writes, send/recv, barriers, notices) runs over the authenticated TCP mesh
of `transport.backends.tcp`; the backend decides how write bytes move: `tcp` over the lane
sockets, `cuda_ipc` device to device on one host, `nixl` through NIXL (UCX / libfabric).
"""

from __future__ import annotations

import heapq
import itertools
import os
import secrets
import socket
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

from transport.backends import BACKENDS
from transport.backends import tcp as wire
from transport.completion import ImmCounter, Transfer
from transport.descriptors import EngineAddress, MemoryDescriptor
from transport.errors import (
    STATUS_OK,
    STATUS_OUT_OF_RANGE,
    STATUS_UNKNOWN_REGION,
    Cancelled,
    OutOfRange,
    PeerGone,
    TransferTimeout,
    TransportError,
    UnknownDescriptor,
    error_for_status,
)
from transport.memory import Region, adapt

SECRET_ENV = "WORKBENCH_TRANSPORT_SECRET"
SHARD_ALIGN = 8 << 10  # shards are multiples of 8 KiB (as in TransferEngine)
MIN_SHARD = 512 << 10  # shards are at least this big (smaller writes go over fewer lanes)
MAX_SEND = 64 << 20  # two-sided messages are for control
INLINE_MAX = 64 << 10  # small writes go out from the caller's thread when their lane is idle


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def host_id() -> str:
    """Identifies this machine (same boot) for same-host backends such as `cuda_ipc`."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


@dataclass(frozen=True)
class Message:
    """A two-sided message received with `Engine.recv`."""

    peer: str
    tag: int
    data: bytes


@dataclass(frozen=True)
class Target:
    """One destination of a scatter: `length` bytes from `src_offset` to `dst` at `dst_offset`."""

    dst: MemoryDescriptor
    length: int
    src_offset: int = 0
    dst_offset: int = 0


PeerRef = EngineAddress | MemoryDescriptor | str


class Engine:
    """A transfer engine: registration, one-sided writes, imm counting, send/recv, groups, barrier.

    backend: `tcp` (default), `cuda_ipc` or `nixl`. lanes: data sockets (or streams) per peer
    over which each write is sharded. host/port: where to listen (loopback by default; give an
    interface address or `0.0.0.0` to reach other hosts or namespaces). secret: the shared
    secret peers authenticate with (default: `$WORKBENCH_TRANSPORT_SECRET`, else a fresh one
    that is put into this process's environment so child processes inherit it).
    chaos: fault injection for tests, e.g. `{"lane_delay": {0: 0.01}}` delays data lane 0.
    """

    def __init__(self, backend: str = "tcp", *, lanes: int = 2, host: str = "127.0.0.1", port: int = 0,
                 name: str | None = None, secret: str | bytes | None = None, sockbuf: int | None = None,
                 connect_timeout: float = 10.0, chaos: dict[str, Any] | None = None,
                 **backend_options: Any) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: unknown {backend!r} (choose from {', '.join(BACKENDS)})")
        if not 1 <= lanes <= 64:
            raise ValueError(f"lanes: must be 1..64, got {lanes}")
        self.name = name or f"e{os.getpid()}-{secrets.token_hex(3)}"
        self.backend = backend
        self.lanes = lanes
        self.sockbuf = sockbuf
        self.connect_timeout = connect_timeout
        self.chaos = dict(chaos or {})
        if secret is None:
            secret = os.environ.get(SECRET_ENV)
            if secret is None:
                secret = secrets.token_hex(16)
                os.environ[SECRET_ENV] = secret
        self._secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.counter = ImmCounter()
        self._regions: dict[int, Region] = {}
        self._region_ids = itertools.count(1)
        self._tids = itertools.count(1)
        self._pending: dict[int, Transfer] = {}
        self._links: dict[str, wire.Link] = {}
        self._all_links: list[wire.Link] = []
        self._known: dict[str, EngineAddress] = {}
        self._lock = threading.RLock()
        self._connecting: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._imm_callbacks: list[Callable[[int, str], Any]] = []
        self._msg_callbacks: list[Callable[[Message], Any]] = []
        self._messages: deque[Message] = deque()
        self._msg_cond = threading.Condition()
        self._barrier_seen: dict[tuple[int, int, str], int] = defaultdict(int)
        self._barrier_gen: dict[int, int] = defaultdict(int)
        self._barrier_cond = threading.Condition()
        self._callbacks = ThreadPoolExecutor(1, thread_name_prefix=f"wbt-{self.name}-cb")
        self._deadlines: list[tuple[float, int, Callable[[], Any]]] = []
        self._deadline_seq = itertools.count()
        self._deadline_cond = threading.Condition()
        self._closed = False
        self.log: list[str] = []
        self._shm_refs: list[Any] = []
        self._listener = wire.Listener(self, host, port, self._secret, sockbuf, self._accepted)
        self.address = EngineAddress(self.name, host if host not in ("0.0.0.0", "::") else _own_ip(),
                                     self._listener.port, backend, lanes, host_id())
        self._path: Any = None
        if backend == "cuda_ipc":
            from transport.backends.cuda_ipc import CudaIpcPath

            self._path = CudaIpcPath(self, **backend_options)
        elif backend == "nixl":
            from transport.backends.nixl import NixlPath

            self._path = NixlPath(self, **backend_options)
        elif backend_options:
            raise TypeError(f"unexpected options for the tcp backend: {sorted(backend_options)}")
        self._watchdog = threading.Thread(target=self._watch, name=f"wbt-{self.name}-watchdog", daemon=True)
        self._watchdog.start()
        self._listener.start()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Say goodbye to peers, close sockets, fail whatever is pending with `Cancelled`."""
        if self._closed:
            return
        self._closed = True
        self._listener.close()
        with self._lock:
            links = list(self._all_links)
            self._links.clear()
            pending = list(self._pending.values())
            self._pending.clear()
        for link in links:
            link.close(send_bye=True)
        for t in pending:
            t.fail(Cancelled(f"{t.what}: engine {self.name} closed"))
        self.counter.fail_all(Cancelled(f"engine {self.name} closed"))
        if self._path is not None:
            self._path.close()
        with self._deadline_cond:
            self._deadline_cond.notify_all()
        self._callbacks.shutdown(wait=False)

    def __repr__(self) -> str:
        return (f"Engine(name={self.name!r}, backend={self.backend!r}, lanes={self.lanes}, "
                f"at={self.address.host}:{self.address.port}, regions={len(self._regions)}, peers={len(self._links)})")

    def _log(self, text: str) -> None:
        self.log.append(text)

    # ------------------------------------------------------------------ registration
    def register(self, buf: Any) -> Region:
        """Register a numpy array, torch tensor (CPU or CUDA) or bytearray; returns the local `Region`.

        `region.descriptor` is the serialisable remote descriptor to give peers.
        """
        rid = next(self._region_ids)
        region = adapt(buf, rid)
        extra = self._path.describe(region) if self._path is not None else {}
        region.desc = MemoryDescriptor(self.address, rid, region.nbytes, region.device, extra)
        with self._lock:
            self._regions[rid] = region
        return region

    def alloc(self, nbytes: int, device: str = "cpu", shm_name: str | None = None) -> Any:
        """Zeroed memory that every backend of this engine can move without copies: a uint8 numpy
        array (shared memory for `nixl`; `shm_name` adopts an existing shared-memory block) or, for
        `device="cuda:N"`, a uint8 CUDA tensor. Register it with `register`."""
        if device.startswith("cuda"):
            import torch

            return torch.zeros(nbytes, dtype=torch.uint8, device=device)
        if self._path is not None and hasattr(self._path, "alloc"):
            return self._path.alloc(nbytes, shm_name)
        import numpy as np

        if shm_name:
            from multiprocessing import shared_memory

            shm = shared_memory.SharedMemory(name=shm_name)
            self._shm_refs.append(shm)
            return np.ndarray((nbytes,), np.uint8, buffer=shm.buf)
        return np.zeros(nbytes, np.uint8)

    def deregister(self, region: Region) -> None:
        """Forget a region: later writes to its descriptor fail with `UnknownDescriptor`."""
        with self._lock:
            self._regions.pop(region.id, None)
        if self._path is not None:
            self._path.forget(region)

    # ------------------------------------------------------------------ peers
    def connect(self, peer: PeerRef) -> EngineAddress:
        """Connect to a peer now (writes connect on demand anyway); returns its address."""
        addr = self._address_of(peer)
        self._link(addr)
        return addr

    @property
    def peers(self) -> list[str]:
        with self._lock:
            return [n for n, link in self._links.items() if link.alive]

    def _address_of(self, peer: PeerRef) -> EngineAddress:
        if isinstance(peer, MemoryDescriptor):
            return peer.address
        if isinstance(peer, EngineAddress):
            return peer
        if isinstance(peer, str):
            with self._lock:
                if peer in self._known:
                    return self._known[peer]
            raise UnknownDescriptor(f"peer {peer!r}: not known to engine {self.name}; pass its EngineAddress")
        raise TypeError(f"peer: expected EngineAddress, MemoryDescriptor or name, got {type(peer).__name__}")

    def _hello(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address.to_dict()}

    def _link(self, addr: EngineAddress) -> wire.Link:
        if self._closed:
            raise Cancelled(f"engine {self.name} is closed")
        link = self._links.get(addr.name)
        if link is not None and link.alive:
            return link
        with self._connecting[addr.name]:
            link = self._links.get(addr.name)
            if link is not None and link.alive:
                return link
            try:
                socks, hello = wire.connect_link(self, addr.to_dict(), self.lanes, self._secret, self._hello(),
                                                 self.sockbuf, self.connect_timeout)
            except OSError as exc:
                raise PeerGone(f"cannot reach peer {addr.name!r} at {addr.host}:{addr.port}: {exc}") from exc
            if hello.get("name") != addr.name:
                for s in socks:
                    s.close()
                raise PeerGone(f"{addr.host}:{addr.port} is engine {hello.get('name')!r}, not {addr.name!r} "
                               "(the peer restarted: get a fresh descriptor)")
            return self._add_link(socks, hello, prefer=True)

    def _accepted(self, socks: list[socket.socket], hello: dict[str, Any]) -> None:
        if self._closed:
            for s in socks:
                s.close()
            return
        self._add_link(socks, hello, prefer=False)

    def _add_link(self, socks: list[socket.socket], hello: dict[str, Any], prefer: bool) -> wire.Link:
        name = str(hello["name"])
        link = wire.Link(self, name, hello["address"], socks)
        delays = self.chaos.get("lane_delay", {})
        for i, lane in enumerate(link.data):
            lane.delay = float(delays.get(i, 0.0))
        with self._lock:
            self._known.setdefault(name, EngineAddress.from_dict(hello["address"]))
            self._all_links.append(link)
            cur = self._links.get(name)
            if prefer or cur is None or not cur.alive:
                self._links[name] = link
        link.start()
        return link

    def _link_down(self, link: wire.Link, exc: TransportError) -> None:
        with self._lock:
            if self._links.get(link.peer) is link:
                del self._links[link.peer]
            if link in self._all_links:
                self._all_links.remove(link)
            doomed = [t for t in self._pending.values() if t.peer == link.peer]
            for t in doomed:
                self._pending.pop(t.tid, None)
        if self._closed:
            return
        self._log(str(exc))
        for t in doomed:
            t.fail(PeerGone(f"{t.what}: {exc}"))
        self.counter.fail_peer(link.peer, exc)
        with self._barrier_cond:
            self._barrier_cond.notify_all()
        with self._msg_cond:
            self._msg_cond.notify_all()

    # ------------------------------------------------------------------ writes
    def _new(self, what: str, peer: str, parts: int, nbytes: int, timeout: float | None,
             callback: Callable[[Transfer], Any] | None) -> Transfer:
        t = Transfer(next(self._tids), what, peer, parts, nbytes, on_cancel=self._cancelled)
        with self._lock:
            self._pending[t.tid] = t
        if callback is not None:
            t.add_done_callback(lambda tr: self._callbacks.submit(callback, tr))
        if timeout is not None:
            self._after(timeout, lambda: self._expire(t, timeout))
        return t

    def _expire(self, t: Transfer, timeout: float) -> None:
        if t.fail(TransferTimeout(f"{t.what}: not complete after {timeout} s")):
            self._cancelled(t)

    def _cancelled(self, t: Transfer) -> None:
        with self._lock:
            self._pending.pop(t.tid, None)
            link = self._links.get(t.peer or "")
        if link is not None and link.alive:
            link.ctrl.post([wire.pack(wire.ABORT, tid=t.tid)])

    def write(self, src: Region, dst: MemoryDescriptor, length: int | None = None, *, src_offset: int = 0,
              dst_offset: int = 0, imm: int | None = None, timeout: float | None = None,
              callback: Callable[[Transfer], Any] | None = None) -> Transfer:
        """One-sided WRITE of `length` bytes (default: the rest of `src`) into the peer's `dst` region.

        Sharded over the lanes; with `imm`, the peer counts one immediate once every byte landed.
        Returns a `Transfer`, done when the peer confirmed all bytes; errors: `OutOfRange`,
        `UnknownDescriptor`, `PeerGone`, `TransferTimeout`, `Cancelled`.
        """
        if length is None:
            length = src.nbytes - src_offset
        src.check(src_offset, length, "write: source")
        _check_dst(dst, dst_offset, length)
        link = self._link(dst.address)
        what = f"write {length} B to {dst.engine}/{dst.region}"
        if self._path is not None and self._path.handles(src, dst):
            t = self._new(what, dst.engine, 1, length, timeout, callback)
            self._path.submit(t, src, dst, [(src_offset, dst_offset, length)], lambda exc: self._path_done(
                link, t, dst, dst_offset, length, imm, exc))
            return t
        nl = len(link.data)
        nshards = max(1, min(nl, length // MIN_SHARD))
        chunk = _round_up(-(-length // nshards), SHARD_ALIGN) if nshards > 1 else length
        shards = [(o, min(chunk, length - o)) for o in range(0, length, chunk)] or [(0, 0)]
        t = self._new(what, dst.engine, len(shards), length, timeout, callback)
        flags = wire.F_IMM if imm is not None else 0
        first = link.next_lane()
        lanes = []
        for i, (o, n) in enumerate(shards):
            hdr = wire.pack(wire.WRITE, flags=flags, nshards=len(shards), imm=imm or 0, tid=t.tid,
                            region=dst.region, offset=dst_offset + o, length=n)
            lane = link.data[(first + i) % nl]
            lanes.append(lane.index)
            job = _WriteJob(t, hdr, src, src_offset + o, n)
            if not (n <= INLINE_MAX and src.view is not None and job.inline(lane)):
                lane.post(job)
        t.lanes = tuple(lanes)
        return t

    def write_paged(self, src: Region, dst: MemoryDescriptor, *, page_bytes: int, src_pages: Sequence[int],
                    dst_pages: Sequence[int], src_stride: int | None = None, dst_stride: int | None = None,
                    src_offset: int = 0, dst_offset: int = 0, imm: int | None = None,
                    timeout: float | None = None, callback: Callable[[Transfer], Any] | None = None) -> Transfer:
        """Paged WRITE: page i moves `page_bytes` from `src_offset + src_pages[i]*src_stride` to
        `dst_offset + dst_pages[i]*dst_stride` (strides default to `page_bytes`), e.g. KV-cache pages.

        The page list is split across lanes; one imm (if given) once all pages landed.
        """
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"write_paged: {len(src_pages)} source pages but {len(dst_pages)} destination pages")
        if page_bytes <= 0 or not len(src_pages):
            raise ValueError("write_paged: page_bytes must be > 0 and the page lists non-empty")
        import numpy as np

        ss, ds = src_stride or page_bytes, dst_stride or page_bytes
        soffs = src_offset + np.asarray(src_pages, dtype=np.int64) * ss
        doffs = dst_offset + np.asarray(dst_pages, dtype=np.int64) * ds
        if soffs.min() < 0 or soffs.max() + page_bytes > src.nbytes:
            raise OutOfRange(f"write_paged: a source page falls outside the registered region of {src.nbytes} bytes")
        if doffs.min() < 0 or doffs.max() + page_bytes > dst.nbytes:
            raise OutOfRange(f"write_paged: a destination page falls outside the peer's region of {dst.nbytes} bytes")
        link = self._link(dst.address)
        npages = len(soffs)
        total = npages * page_bytes
        what = f"paged write {npages}x{page_bytes} B to {dst.engine}/{dst.region}"
        if self._path is not None and self._path.handles(src, dst):
            t = self._new(what, dst.engine, 1, total, timeout, callback)
            pieces = [(int(a), int(b), page_bytes) for a, b in zip(soffs, doffs)]
            self._path.submit(t, src, dst, pieces, lambda exc: self._path_done(
                link, t, dst, int(doffs.min()), page_bytes, imm, exc))
            return t
        nl = len(link.data)
        nshards = max(1, min(nl, total // MIN_SHARD, npages))
        per = -(-npages // nshards)
        groups = [(i, min(i + per, npages)) for i in range(0, npages, per)]
        t = self._new(what, dst.engine, len(groups), total, timeout, callback)
        flags = wire.F_IMM if imm is not None else 0
        first = link.next_lane()
        lanes = []
        for k, (a, b) in enumerate(groups):
            hdr = wire.pack(wire.PAGED, flags=flags, nshards=len(groups), imm=imm or 0, tid=t.tid,
                            region=dst.region, count=b - a, offset=page_bytes, length=(b - a) * page_bytes)
            lane = link.data[(first + k) % nl]
            lanes.append(lane.index)
            lane.post(_PagedJob(t, hdr + doffs[a:b].astype("<u8").tobytes(), src, soffs[a:b], page_bytes))
        t.lanes = tuple(lanes)
        return t

    def _path_done(self, link: wire.Link, t: Transfer, dst: MemoryDescriptor, offset: int, length: int,
                   imm: int | None, exc: BaseException | None) -> None:
        if exc is not None:
            err = exc if isinstance(exc, TransportError) else TransportError(f"{t.what}: {exc}")
            if t.fail(err):
                with self._lock:
                    self._pending.pop(t.tid, None)
            return
        if t.done():
            return
        try:
            link.ctrl.send_now([wire.pack(wire.NOTICE, flags=wire.F_IMM if imm is not None else 0, imm=imm or 0,
                                          tid=t.tid, region=dst.region, offset=offset, length=length)])
        except OSError as e:
            link.failed(e, link.ctrl)

    def write_imm(self, peer: PeerRef, imm: int, *, timeout: float | None = None,
                  callback: Callable[[Transfer], Any] | None = None) -> Transfer:
        """An imm-only write: the peer counts `imm` once; done when the peer confirmed it."""
        addr = self._address_of(peer)
        link = self._link(addr)
        t = self._new(f"imm {imm} to {addr.name}", addr.name, 1, 0, timeout, callback)
        try:
            link.ctrl.send_now([wire.pack(wire.IMM, imm=imm, tid=t.tid)])
        except OSError as exc:
            link.failed(exc, link.ctrl)
        return t

    def scatter(self, src: Region, targets: Iterable[Target | tuple[Any, ...]], *, imm: int | None = None,
                timeout: float | None = None) -> list[Transfer]:
        """Write a slice of `src` to each target (possibly many peers); one `Transfer` per target."""
        out = []
        for tg in targets:
            tg = tg if isinstance(tg, Target) else Target(*tg)
            out.append(self.write(src, tg.dst, tg.length, src_offset=tg.src_offset, dst_offset=tg.dst_offset,
                                  imm=imm, timeout=timeout))
        return out

    def group(self, peers: Iterable[PeerRef]) -> PeerGroup:
        """A `PeerGroup` over these peers (addresses, descriptors or known names)."""
        return PeerGroup(self, [self._address_of(p) for p in peers])

    # ------------------------------------------------------------------ completion
    def expect(self, imm: int, n: int = 1, *, peer: PeerRef | None = None, timeout: float | None = None,
               callback: Callable[[Transfer], Any] | None = None) -> Transfer:
        """A `Transfer` done once `n` writes tagged `imm` have fully landed here (in any order).

        With `peer`, it fails with `PeerGone` if that peer goes away first; with `timeout`,
        `TransferTimeout`.
        """
        pname = self._address_of(peer).name if peer is not None else None
        t = self.counter.expect(imm, n, pname)
        if callback is not None:
            t.add_done_callback(lambda tr: self._callbacks.submit(callback, tr))
        if timeout is not None:
            self._after(timeout, lambda: t.fail(TransferTimeout(f"{t.what}: {self.counter.value(imm)} of {n} "
                                                                f"arrived within {timeout} s")))
        return t

    def on_imm(self, callback: Callable[[int, str], Any]) -> None:
        """Call `callback(imm, peer_name)` (on the engine's callback thread) for every arrived immediate."""
        self._imm_callbacks.append(callback)

    def _count(self, imm: int, peer: str) -> None:
        self.counter.add(imm)
        for cb in self._imm_callbacks:
            self._callbacks.submit(cb, imm, peer)

    # ------------------------------------------------------------------ two-sided
    def send(self, peer: PeerRef, data: bytes, tag: int = 0) -> Transfer:
        """Send a small control message (<= 64 MiB); done once handed to the kernel."""
        if len(data) > MAX_SEND:
            raise ValueError(f"send: {len(data)} bytes is too large for a control message (max {MAX_SEND}); use write")
        addr = self._address_of(peer)
        link = self._link(addr)
        t = Transfer(next(self._tids), f"send {len(data)} B to {addr.name}", addr.name, 1, len(data))
        try:
            link.ctrl.send_now([wire.pack(wire.SEND, imm=tag, length=len(data)), data])
            t.succeed()
        except OSError as exc:
            link.failed(exc, link.ctrl)
            t.fail(PeerGone(f"{t.what}: {exc}"))
        return t

    def recv(self, tag: int | None = None, *, peer: str | None = None, timeout: float | None = None) -> Message:
        """The oldest received message (matching `tag`/`peer` if given); `TransferTimeout` after `timeout`."""
        def match() -> Message | None:
            for m in self._messages:
                if (tag is None or m.tag == tag) and (peer is None or m.peer == peer):
                    return m
            return None

        deadline = None if timeout is None else time.monotonic() + timeout
        with self._msg_cond:
            while True:
                m = match()
                if m is not None:
                    self._messages.remove(m)
                    return m
                if peer is not None and peer in self._known and peer not in self._links:
                    raise PeerGone(f"recv: peer {peer!r} is gone")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransferTimeout(f"recv(tag={tag}): nothing within {timeout} s")
                self._msg_cond.wait(left if left is not None else 0.5)

    def on_message(self, callback: Callable[[Message], Any]) -> None:
        """Deliver messages to `callback(message)` on the callback thread instead of the `recv` queue."""
        self._msg_callbacks.append(callback)

    def barrier(self, peers: Iterable[PeerRef], timeout: float | None = 30.0) -> None:
        """Return once every engine in `peers` called `barrier` with the same set (self included or not)."""
        addrs = [self._address_of(p) for p in peers]
        names = sorted({a.name for a in addrs} | {self.name})
        key = _stable_key(names)
        with self._barrier_cond:
            self._barrier_gen[key] += 1
            gen = self._barrier_gen[key]
        others = [a for a in addrs if a.name != self.name]
        for a in others:
            link = self._link(a)
            link.ctrl.send_now([wire.pack(wire.BARRIER, imm=key, tid=gen)])
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._barrier_cond:
            while True:
                missing = [a.name for a in others if self._barrier_seen.get((key, gen, a.name), 0) < 1]
                if not missing:
                    for a in others:
                        self._barrier_seen.pop((key, gen, a.name), None)
                    return
                gone = [n for n in missing if n not in self._links]
                if gone:
                    raise PeerGone(f"barrier: peers {gone} are gone")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TransferTimeout(f"barrier: still waiting for {missing} after {timeout} s")
                self._barrier_cond.wait(min(left, 0.5) if left is not None else 0.5)

    # ------------------------------------------------------------------ receive path (lane threads)
    def _on_message(self, lane: wire.Lane, msg: tuple[int, ...]) -> None:
        mtype, flags, nshards, imm, tid, region, count, offset, length = msg
        link = lane.link
        sock = lane.sock
        if mtype == wire.WRITE:
            r = self._regions.get(region)
            if r is None:
                status = STATUS_UNKNOWN_REGION
            elif offset + length > r.nbytes:
                status = STATUS_OUT_OF_RANGE
            else:
                status = STATUS_OK
            if status != STATUS_OK:
                wire.drain(sock, length)
            elif r is not None and r.view is not None:
                wire.recv_exact(sock, r.view[offset:offset + length])
            elif r is not None:
                _recv_cuda(lane, r, offset, length)
            self._landed(lane, tid, nshards, flags, imm, status)
        elif mtype == wire.PAGED:
            import numpy as np

            offs = np.frombuffer(wire.recv_bytes(sock, count * 8), dtype="<u8")
            r = self._regions.get(region)
            page = offset
            if r is None:
                status = STATUS_UNKNOWN_REGION
            elif count and int(offs.max()) + page > r.nbytes:
                status = STATUS_OUT_OF_RANGE
            else:
                status = STATUS_OK
            if status != STATUS_OK:
                wire.drain(sock, length)
            elif r is not None and r.view is not None:
                view = r.view
                wire.recv_scatter(sock, [view[o:o + page] for o in offs.tolist()])
            elif r is not None:
                _recv_cuda_pages(lane, r, offs, page)
            self._landed(lane, tid, nshards, flags, imm, status)
        elif mtype == wire.ACK:
            t = self._pending.get(tid)
            if t is None:
                return
            if flags == STATUS_OK:
                if t.part_done(count or 1):
                    with self._lock:
                        self._pending.pop(tid, None)
            else:
                with self._lock:
                    self._pending.pop(tid, None)
                t.fail(error_for_status(flags, t.what))
        elif mtype == wire.IMM:
            self._count(imm, link.peer)
            lane.post([wire.pack(wire.ACK, tid=tid, count=1)])
        elif mtype == wire.NOTICE:
            status = STATUS_OK if region in self._regions else STATUS_UNKNOWN_REGION
            if status == STATUS_OK and flags & wire.F_IMM:
                self._count(imm, link.peer)
            lane.post([wire.pack(wire.ACK, flags=status, tid=tid, count=1)])
        elif mtype == wire.SEND:
            m = Message(link.peer, imm, wire.recv_bytes(sock, length))
            if self._msg_callbacks:
                for cb in self._msg_callbacks:
                    self._callbacks.submit(cb, m)
            else:
                with self._msg_cond:
                    self._messages.append(m)
                    self._msg_cond.notify_all()
        elif mtype == wire.BARRIER:
            with self._barrier_cond:
                self._barrier_seen[(imm, tid, link.peer)] += 1
                self._barrier_cond.notify_all()
        elif mtype == wire.ABORT:
            with link._lock:
                link.partial.pop(tid, None)
        else:
            raise TransportError(f"protocol error: unknown message type {mtype} from {link.peer}")

    def _landed(self, lane: wire.Lane, tid: int, nshards: int, flags: int, imm: int, status: int) -> None:
        link = lane.link
        if status == STATUS_OK and flags & wire.F_IMM:
            fire = nshards <= 1
            if not fire:
                with link._lock:
                    got = link.partial.get(tid, 0) + 1
                    if got >= nshards:
                        link.partial.pop(tid, None)
                        fire = True
                    else:
                        link.partial[tid] = got
            if fire:
                self._count(imm, link.peer)
        link.ctrl.send_now([wire.pack(wire.ACK, flags=status, tid=tid, count=1)])

    # ------------------------------------------------------------------ timers
    def _after(self, seconds: float, fn: Callable[[], Any]) -> None:
        with self._deadline_cond:
            heapq.heappush(self._deadlines, (time.monotonic() + seconds, next(self._deadline_seq), fn))
            self._deadline_cond.notify()

    def _watch(self) -> None:
        while not self._closed:
            due: list[Callable[[], Any]] = []
            with self._deadline_cond:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    due.append(heapq.heappop(self._deadlines)[2])
                wait = (self._deadlines[0][0] - now) if self._deadlines else 1.0
                if not due:
                    self._deadline_cond.wait(max(0.001, min(wait, 1.0)))
            for fn in due:
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001
                    self._log(f"timer callback failed: {exc}")


class PeerGroup:
    """Several peers addressed together: scatter, imm to all, barrier."""

    def __init__(self, engine: Engine, peers: list[EngineAddress]) -> None:
        self.engine = engine
        self.peers = peers

    def scatter(self, src: Region, dsts: Sequence[MemoryDescriptor], length: int, *,
                src_offsets: Sequence[int] | None = None, dst_offset: int = 0, imm: int | None = None,
                timeout: float | None = None) -> list[Transfer]:
        """Write `length` bytes to each of `dsts` (one per peer), the i-th from `src_offsets[i]` (default i*length)."""
        offs = list(src_offsets) if src_offsets is not None else [i * length for i in range(len(dsts))]
        return self.engine.scatter(src, [Target(d, length, o, dst_offset) for d, o in zip(dsts, offs)],
                                   imm=imm, timeout=timeout)

    def write_imm(self, imm: int, timeout: float | None = None) -> list[Transfer]:
        return [self.engine.write_imm(p, imm, timeout=timeout) for p in self.peers]

    def barrier(self, timeout: float | None = 30.0) -> None:
        self.engine.barrier(self.peers, timeout)

    def __len__(self) -> int:
        return len(self.peers)


def wait_all(transfers: Iterable[Transfer], timeout: float | None = None) -> None:
    """Wait for every transfer; raise the first error (after `timeout` overall: `TransferTimeout`)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in transfers:
        t.result(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _stable_key(names: list[str]) -> int:
    import zlib

    return zlib.crc32("\0".join(names).encode())


def _check_dst(dst: MemoryDescriptor, offset: int, length: int) -> None:
    if not isinstance(dst, MemoryDescriptor):
        raise UnknownDescriptor(f"write: dst must be a MemoryDescriptor, got {type(dst).__name__}")
    if offset < 0 or length < 0 or offset + length > dst.nbytes:
        raise OutOfRange(f"write: destination range [{offset}, {offset + length}) is outside the peer's "
                         f"region of {dst.nbytes} bytes")


def _own_ip() -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


# ---------------------------------------------------------------------- send jobs (run on lane tx threads)
class _WriteJob:
    __slots__ = ("t", "hdr", "src", "off", "n")

    def __init__(self, t: Transfer, hdr: bytes, src: Region, off: int, n: int) -> None:
        self.t, self.hdr, self.src, self.off, self.n = t, hdr, src, off, n

    def inline(self, lane: wire.Lane) -> bool:
        """Send from the calling thread if the lane is idle (no queue, no delay); False otherwise."""
        if lane.delay or not lane.queue.empty() or not lane.send_lock.acquire(blocking=False):
            return False
        try:
            assert self.src.view is not None
            wire.send_gather(lane.sock, [self.hdr, self.src.view[self.off:self.off + self.n]])
        except OSError as exc:
            lane.link.failed(exc, lane)
        finally:
            lane.send_lock.release()
        return True

    def __call__(self, lane: wire.Lane) -> None:
        if self.t.done():
            return  # cancelled / timed out / failed: drop the unsent shard
        if lane.delay:
            time.sleep(lane.delay)
        if self.src.view is not None:
            with lane.send_lock:
                wire.send_gather(lane.sock, [self.hdr, self.src.view[self.off:self.off + self.n]])
            return
        with lane.send_lock:
            lane.sock.sendall(self.hdr)
            for _o, k, mv in _stage_out(lane, self.src, self.off, self.n):
                lane.sock.sendall(mv[:k])


class _PagedJob:
    __slots__ = ("t", "hdr", "src", "offs", "page")

    def __init__(self, t: Transfer, hdr: bytes, src: Region, offs: Any, page: int) -> None:
        self.t, self.hdr, self.src, self.offs, self.page = t, hdr, src, offs, page

    def __call__(self, lane: wire.Lane) -> None:
        if self.t.done():
            return
        if lane.delay:
            time.sleep(lane.delay)
        p = self.page
        if self.src.view is not None:
            view = self.src.view
            with lane.send_lock:
                wire.send_gather(lane.sock, [self.hdr] + [view[o:o + p] for o in self.offs.tolist()])
            return
        import torch

        flat = self.src.flat
        idx = torch.as_tensor(self.offs, device=flat.device).unsqueeze(1) + torch.arange(p, device=flat.device)
        host = flat[idx.reshape(-1)].cpu()
        with lane.send_lock:
            wire.send_gather(lane.sock, [self.hdr, memoryview(host.numpy())])


def _staging(lane: wire.Lane) -> tuple[Any, memoryview]:
    if lane.staging is None:
        import torch

        t = torch.empty(wire.STAGE_BYTES, dtype=torch.uint8, pin_memory=True)
        lane.staging = (t, memoryview(cast(Any, t.numpy())))
    return lane.staging  # type: ignore[no-any-return]


def _stage_out(lane: wire.Lane, src: Region, off: int, n: int) -> Iterable[tuple[int, int, memoryview]]:
    st, mv = _staging(lane)
    o = 0
    while o < n:
        k = min(wire.STAGE_BYTES, n - o)
        st[:k].copy_(src.flat[off + o:off + o + k])
        yield o, k, mv
        o += k


def _recv_cuda(lane: wire.Lane, r: Region, offset: int, length: int) -> None:
    st, mv = _staging(lane)
    o = 0
    while o < length:
        k = min(wire.STAGE_BYTES, length - o)
        wire.recv_exact(lane.sock, mv[:k])
        r.flat[offset + o:offset + o + k].copy_(st[:k])
        o += k


def _recv_cuda_pages(lane: wire.Lane, r: Region, offs: Any, page: int) -> None:
    import torch

    host = torch.empty(len(offs) * page, dtype=torch.uint8, pin_memory=True)
    wire.recv_exact(lane.sock, memoryview(cast(Any, host.numpy())))
    dev = host.to(r.flat.device)
    idx = torch.as_tensor(offs.astype("int64"), device=r.flat.device).unsqueeze(1) + torch.arange(page, device=r.flat.device)
    r.flat[idx.reshape(-1)] = dev
    torch.cuda.current_stream(r.flat.device).synchronize()
