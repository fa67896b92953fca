"""`Engine`: one-sided point-to-point transfers with TransferEngine semantics.

One engine per process. Register buffers, hand their descriptors to peers, then:

    with Engine(lanes=2) as eng:
        region = eng.register(np.zeros(1 << 20, np.uint8))
        desc_bytes = region.descriptor.to_bytes()            # send to a peer any way you like
        ...
        t = eng.write(src_region, remote_desc, length=4096, imm=7)   # -> Transfer (future)
        t.result(timeout=5)                                  # or add_done_callback / await
        eng.expect(7, n=16).result(timeout=5)                # receiver: 16 imm-7 writes landed
        eng.write_batch(src_region, [(d, 4096, i * 4096, 0) for i, d in enumerate(descs)], imm=8)

Writes are never ordered; completion is counted (see `ImmCounter`). Every control path
(acks, imm-only writes, send/recv, barriers, notices) runs over the authenticated TCP mesh
of `transport.backends.tcp`; the backend decides how write bytes move: `tcp` over the lane
sockets, `cuda_ipc` device to device on one host, `nixl` through NIXL (UCX / libfabric);
a backend plugs in as a `transport.backends.base.DataPath`.

Every argument is checked (type and range) before anything is queued, so a bad call raises
`InvalidArgument`/`OutOfRange`/`UnknownDescriptor` and never disturbs another transfer.
Every length a peer announces is checked by the receiver before it reads or allocates.
"""

from __future__ import annotations

import heapq
import itertools
import operator
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

import numpy as np

from transport import staging
from transport.backends import BACKENDS
from transport.backends import tcp as wire
from transport.backends.base import DataPath, Pieces
from transport.completion import ImmCounter, Transfer
from transport.descriptors import EngineAddress, MemoryDescriptor
from transport.errors import (
    STATUS_OK,
    STATUS_OUT_OF_RANGE,
    STATUS_UNKNOWN_REGION,
    AuthError,
    Cancelled,
    InvalidArgument,
    OutOfRange,
    PeerGone,
    ProtocolError,
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
INLINE_MAX = 1 << 20  # a write (its last shard) up to this size goes out from the caller's thread when its lane is idle
INLINE_BATCH = 1 << 20  # a batch's messages for one lane go out from the caller's thread up to this size
MAX_PAGES = 1 << 20  # pages in one paged message (a receiver reads 8 bytes of offset per page first)
MAX_BATCH_PER_PEER = 0xFFFF  # messages of one batch to one peer (the wire's shard count is 16 bits)
LOG_LINES = 1000  # the engine log keeps the last this many lines
U32 = 1 << 32
REVOKE = 10  # control message: the sender deregistered `region` (peers drop what they opened for it)
F_NOACK = 2  # a notice that needs no acknowledgement (the writer already knows the bytes landed)


_MAX_INT = 1 << 62
_ACK, _WRITE = wire.ACK, wire.WRITE


def _int(name: str, v: Any, lo: int = 0, hi: int = _MAX_INT) -> int:
    """`v` as an int in [lo, hi), else `InvalidArgument` naming `name` (bools and floats are refused)."""
    if isinstance(v, bool):
        raise InvalidArgument(f"{name}: expected an integer, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise InvalidArgument(f"{name}: expected an integer, got {type(v).__name__} {str(v)[:40]!r}") from None
    if not lo <= i < hi:
        raise InvalidArgument(f"{name}: must lie in [{lo}, {hi}), got {i}")
    return i


def _imm(name: str, v: Any) -> int | None:
    return None if v is None else _int(name, v, 0, U32)


def _timeout(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e7:
        raise InvalidArgument(f"timeout: expected seconds > 0 (or None), got {v!r}")
    return float(v)


def _index_array(name: str, v: Any) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise InvalidArgument(f"{name}: expected a 1-D list of integers, got {a.dtype} of shape {a.shape}")
    return a.astype(np.int64, copy=False)


_UMAX = np.maximum.reduce
_LENGTHS: dict[tuple[int, int], np.ndarray] = {}


def _lengths(n: int, page: int) -> np.ndarray:
    """`n` copies of `page` as a read-only int64 array, shared by the paged writes of one shape."""
    a = _LENGTHS.get((n, page))
    if a is None:
        if len(_LENGTHS) >= 256:
            _LENGTHS.clear()
        a = np.full(n, page, np.int64)
        a.flags.writeable = False
        _LENGTHS[(n, page)] = a
    return a


def _page_offsets(both: np.ndarray, n: int, ss: int, ds: int, so: int, do: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets of a paged write from its page indices (`both`: n source then n destination indices,
    scaled in place): (source offsets, destination offsets)."""
    if ss == ds:
        both *= ss
    else:
        both[:n] *= ss
        both[n:] *= ds
    soffs, doffs = both[:n], both[n:]
    if so:
        soffs += so
    if do:
        doffs += do
    return soffs, doffs


_I64 = np.dtype(np.int64)
_NO_PIECES = Pieces(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), 0)


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
        if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= 64:
            raise InvalidArgument(f"lanes: must be an integer 1..64, got {lanes!r}")
        wire.spin_seconds()  # a bad $WORKBENCH_TCP_SPIN_US: InvalidArgument naming it, before anything opens
        # host regions for the tcp lanes' C receiver loops (None: $WORKBENCH_TCP_NATIVE=0, or not built; a bad value:
        # InvalidArgument naming it)
        self._native_regions = wire.native_regions()
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
        self._revoked: set[tuple[str, int]] = set()  # (peer, region) the peer deregistered
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self._shm_refs: list[Any] = []
        self._listener = wire.Listener(self, host, port, self._secret, sockbuf, self._accepted)
        self.address = EngineAddress(self.name, host if host not in ("0.0.0.0", "::") else _own_ip(),
                                     self._listener.port, backend, lanes, host_id())
        self._path: DataPath | None = None
        if backend == "cuda_ipc":
            from transport.backends.cuda_ipc import make_path

            self._path = make_path(self, on_imm=self._path_imm, **backend_options)
        elif backend == "nixl":
            from transport.backends.nixl import NixlPath

            self._path = NixlPath(self, on_imm=self._path_imm, **backend_options)
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
        if self._native_regions is not None:
            self._native_regions.clear()
        if self._path is not None:
            self._path.close()
        with self._deadline_cond:
            self._deadline_cond.notify_all()
        self._callbacks.shutdown(wait=False)

    def __repr__(self) -> str:
        return (f"Engine(name={self.name!r}, backend={self.backend!r}, lanes={self.lanes}, "
                f"at={self.address.host}:{self.address.port}, regions={len(self._regions)}, peers={len(self._links)})")

    def _log(self, text: str) -> None:
        self.log.append(text[:2000])

    def listener_stats(self) -> dict[str, int]:
        """Connections waiting in the handshake now, and strangers dropped over the cap so far."""
        return self._listener.stats()

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
        if self._native_regions is not None and region.view is not None:
            try:
                self._native_regions.add(rid, region.view)
            except (BufferError, TypeError, ValueError) as exc:  # writes to it take the Python loop then
                self._log(f"region {rid}: not in the tcp C lane loop's table ({exc})")
        return region

    def alloc(self, nbytes: int, device: str = "cpu", shm_name: str | None = None) -> Any:
        """Zeroed memory that every backend of this engine can move without copies: a uint8 numpy
        array (shared memory for `nixl`; `shm_name` adopts an existing shared-memory block) or, for
        `device="cuda:N"`, a uint8 CUDA tensor. Register it with `register`."""
        nbytes = _int("nbytes", nbytes, 0)
        if device.startswith("cuda"):
            import torch

            return torch.zeros(nbytes, dtype=torch.uint8, device=device)
        if self._path is not None:
            mem = self._path.alloc(nbytes, shm_name)
            if mem is not None:
                return mem
        if shm_name:
            from multiprocessing import shared_memory

            shm = shared_memory.SharedMemory(name=shm_name)
            self._shm_refs.append(shm)
            return np.ndarray((nbytes,), np.uint8, buffer=shm.buf)
        return np.zeros(nbytes, np.uint8)

    def deregister(self, region: Region) -> None:
        """Forget a region: later writes to its descriptor fail with `UnknownDescriptor`."""
        with self._lock:
            if self._regions.get(region.id) is not region:
                return
            del self._regions[region.id]
            links = [link for link in self._links.values() if link.alive]
        if self._native_regions is not None:
            self._native_regions.remove(region.id)  # released once no receive into it is in flight
        if self._path is not None:
            self._path.forget(region)
            for link in links:  # peers drop what they opened for it (an IPC mapping, NIXL metadata)
                try:
                    link.ctrl.send_now([wire.pack(REVOKE, region=region.id)])
                except OSError:
                    pass

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

    def _link(self, addr: EngineAddress, timeout: float | None = None) -> wire.Link:
        """The live link to `addr`, connecting now if needed (within `timeout`, else `connect_timeout`)."""
        if self._closed:
            raise Cancelled(f"engine {self.name} is closed")
        link = self._links.get(addr.name)
        if link is not None and link.alive:
            return link
        with self._connecting[addr.name]:
            link = self._links.get(addr.name)
            if link is not None and link.alive:
                return link
            limit = self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)
            try:
                socks, hello = wire.connect_link(self, addr.to_dict(), self.lanes, self._secret, self._hello(),
                                                 self.sockbuf, limit)
            except AuthError as exc:
                raise AuthError(f"peer {addr.name!r} at {addr.host}:{addr.port}: {exc}") from None
            except TimeoutError as exc:
                if timeout is not None and timeout <= self.connect_timeout:
                    raise TransferTimeout(f"could not connect to peer {addr.name!r} at {addr.host}:{addr.port} "
                                          f"within the timeout of {timeout:g} s") from None
                raise PeerGone(f"cannot reach peer {addr.name!r} at {addr.host}:{addr.port} within "
                               f"{limit:g} s: {exc}") from exc
            except (OSError, PeerGone) as exc:
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
            doomed = [t for t in list(self._pending.values()) if t.peer == link.peer or link.peer in t.peers]
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
    def _new(self, what: str | tuple[Any, ...], peer: str | None, parts: int, nbytes: int, timeout: float | None,
             callback: Callable[[Transfer], Any] | None) -> Transfer:
        t = Transfer(next(self._tids), what, peer, parts, nbytes, on_cancel=self._cancelled)
        self._pending[t.tid] = t  # one dict store (atomic); readers that iterate take a copy (`_link_down`)
        if callback is not None:
            t.add_done_callback(lambda tr: self._callbacks.submit(callback, tr))
        if timeout is not None:
            self._after(timeout, lambda: self._expire(t, timeout))
        return t

    def _expire(self, t: Transfer, timeout: float) -> None:
        if t.fail(TransferTimeout(f"{t.what}: not complete within its timeout of {timeout:g} s")):
            self._cancelled(t)

    def _check_src(self, src: Region, what: str) -> None:
        if not isinstance(src, Region):
            raise InvalidArgument(f"{what}: src must be a Region from register(), got {type(src).__name__}")
        if self._regions.get(src.id) is not src:
            raise UnknownDescriptor(f"{what}: source region {src.id} is not registered with engine {self.name} "
                                    "(deregistered, or registered with another engine)")

    def _check_dst(self, dst: MemoryDescriptor, offset: int, length: int, what: str = "write") -> None:
        if not isinstance(dst, MemoryDescriptor):
            raise InvalidArgument(f"{what}: dst must be a MemoryDescriptor, got {type(dst).__name__}")
        if not 0 <= dst.region < U32 or isinstance(dst.region, bool):
            raise UnknownDescriptor(f"{what}: region id {dst.region!r} is out of range [0, 2^32)")
        if offset + length > dst.nbytes:
            raise OutOfRange(f"{what}: destination range [{offset}, {offset + length}) is outside the peer's "
                             f"region of {dst.nbytes} bytes")
        if self._revoked and (dst.engine, dst.region) in self._revoked:
            raise UnknownDescriptor(f"{what}: peer {dst.engine!r} deregistered region {dst.region}")

    def _cancelled(self, t: Transfer) -> None:
        with self._lock:
            self._pending.pop(t.tid, None)
            links = [self._links.get(p) for p in (t.peers or (t.peer or "",))]
        for link in links:
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
        if type(src) is not Region or self._regions.get(src.id) is not src:  # (the checks below call only to fail)
            self._check_src(src, "write")
        if type(src_offset) is not int or not 0 <= src_offset < _MAX_INT:  # plain ints pass without a call
            src_offset = _int("src_offset", src_offset)
        if type(dst_offset) is not int or not 0 <= dst_offset < _MAX_INT:
            dst_offset = _int("dst_offset", dst_offset)
        if length is None:
            length = src.nbytes - src_offset
        elif type(length) is not int or not 0 <= length < _MAX_INT:
            length = _int("length", length)
        if imm is not None:
            imm = _imm("imm", imm)
        if timeout is not None:
            timeout = _timeout(timeout)
        if src_offset + length > src.nbytes:
            src.check(src_offset, length, "write: source")
        if (type(dst) is not MemoryDescriptor or type(dst.region) is not int or not 0 <= dst.region < U32
                or dst_offset + length > dst.nbytes or self._revoked):
            self._check_dst(dst, dst_offset, length)
        peer = dst.address.name
        link = self._links.get(peer)
        if link is None or not link.alive or self._closed:
            link = self._link(dst.address, timeout)
        what = ("write %d B to %s/%d", length, peer, dst.region)  # formatted when asked for (`Transfer.what`)
        if self._path is not None and self._path.handles(src, dst):
            t = self._new(what, peer, 1, length, timeout, callback)
            self._submit_path(t, link, src, dst, Pieces.one(src_offset, dst_offset, length), imm)
            return t
        nl = len(link.data)
        nshards = max(1, min(nl, length // MIN_SHARD))
        if nshards == 1 and src.view is not None:  # one message on one lane (the common case, kept short)
            t = self._new(what, peer, 1, length, timeout, callback)
            lane = link.data[link.next_lane() if nl > 1 else 0]
            lane.shared = True  # its acks come back on it: a waiting caller may read them (`Lane.read_acks`)
            t.lanes = (lane.index,)
            t.lane = lane
            hdr = wire.HEADER.pack(wire.WRITE, 0 if imm is None else wire.F_IMM, 1, imm or 0, t.tid, dst.region, 0,
                                   dst_offset, length)
            # from this thread when the lane is idle (a hand-off to the sender thread costs more than the send),
            # reading the ack if it is back already
            if not (length <= INLINE_MAX and lane.send_reaping([hdr, src.view[src_offset:src_offset + length]], t)):
                lane.post(_WriteJob(t, hdr, src, src_offset, length))
            return t
        chunk = _round_up(-(-length // nshards), SHARD_ALIGN) if nshards > 1 else length
        shards = [(o, min(chunk, length - o)) for o in range(0, length, chunk)] or [(0, 0)]
        t = self._new(what, dst.engine, len(shards), length, timeout, callback)
        flags = wire.F_IMM if imm is not None else 0
        first = link.next_lane()
        lanes = []
        last = len(shards) - 1
        for i, (o, n) in enumerate(shards):
            hdr = wire.pack(wire.WRITE, flags=flags, nshards=len(shards), imm=imm or 0, tid=t.tid,
                            region=dst.region, offset=dst_offset + o, length=n)
            lane = link.data[(first + i) % nl]
            lane.shared = True  # its acks come back on it: a waiting caller may read them (`Lane.read_acks`)
            lanes.append(lane.index)
            job = _WriteJob(t, hdr, src, src_offset + o, n)
            # the other shards go to their lanes' senders first; the last one leaves from this thread when its
            # lane is idle (no hand-off to a sender thread: that wake-up costs more than a loopback send)
            if not (i == last and n <= INLINE_MAX and src.view is not None and job.inline(lane)):
                lane.post(job)
        if len(shards) == 1:
            t.lane = lane
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
        self._check_src(src, "write_paged")
        if type(page_bytes) is not int or not 0 < page_bytes < _MAX_INT:  # plain ints pass without a call
            page_bytes = _int("page_bytes", page_bytes, 1)
        ss = page_bytes if src_stride is None else _int("src_stride", src_stride, 1)
        ds = page_bytes if dst_stride is None else _int("dst_stride", dst_stride, 1)
        if type(src_offset) is not int or not 0 <= src_offset < _MAX_INT:
            src_offset = _int("src_offset", src_offset)
        if type(dst_offset) is not int or not 0 <= dst_offset < _MAX_INT:
            dst_offset = _int("dst_offset", dst_offset)
        if imm is not None:
            imm = _imm("imm", imm)
        if timeout is not None:
            timeout = _timeout(timeout)
        sp = (src_pages if type(src_pages) is np.ndarray and src_pages.dtype is _I64 and src_pages.ndim == 1
              else _index_array("src_pages", src_pages))  # an int64 array passes as it is
        dp = (dst_pages if type(dst_pages) is np.ndarray and dst_pages.dtype is _I64 and dst_pages.ndim == 1
              else _index_array("dst_pages", dst_pages))
        if len(sp) != len(dp):
            raise InvalidArgument(f"write_paged: {len(sp)} source pages but {len(dp)} destination pages")
        if not len(sp) or len(sp) > MAX_PAGES:
            raise InvalidArgument(f"write_paged: the page lists must hold 1..{MAX_PAGES} pages, got {len(sp)}")
        # Both lists in one buffer ([source offsets, destination offsets], the layout a GPU copy reads), checked
        # with one reduction: read as unsigned, a negative index is >= 2^63 and fails every bound. Only when
        # the largest index of both misses a bound are the lists checked one by one (to name which).
        npages = len(sp)
        both = np.concatenate((sp, dp))
        smax = dmax = int(_UMAX(both.view(np.uint64)))
        if (smax * max(ss, ds) >= 1 << 62 or src_offset + smax * ss + page_bytes > src.nbytes
                or dst_offset + dmax * ds + page_bytes > getattr(dst, "nbytes", 0)):
            smax, dmax = int(_UMAX(sp.view(np.uint64))), int(_UMAX(dp.view(np.uint64)))
            if max(smax * ss, dmax * ds) >= 1 << 62:
                raise OutOfRange("write_paged: page indices must be >= 0 and their offsets below 2^62")
            if src_offset + smax * ss + page_bytes > src.nbytes:
                raise OutOfRange(f"write_paged: a source page falls outside the registered region of {src.nbytes} "
                                 "bytes")
        self._check_dst(dst, dst_offset + dmax * ds, page_bytes, "write_paged")
        link = self._link(dst.address, timeout)
        total = npages * page_bytes
        what = f"paged write {npages}x{page_bytes} B to {dst.engine}/{dst.region}"
        path = self._path
        if path is not None and path.handles(src, dst):
            t = self._new(what, dst.engine, 1, total, timeout, callback)
            if getattr(path, "submit_pages", None) is not None:  # the path takes the indices as they are
                self._submit_pages(t, link, src, dst, both, (page_bytes, ss, ds, src_offset, dst_offset), imm)
                return t
            soffs, doffs = _page_offsets(both, npages, ss, ds, src_offset, dst_offset)
            pieces = Pieces(soffs, doffs, _lengths(npages, page_bytes), page_bytes)
            self._submit_path(t, link, src, dst, pieces, imm)
            return t
        soffs, doffs = _page_offsets(both, npages, ss, ds, src_offset, dst_offset)
        nl = len(link.data)
        nshards = max(1, min(nl, total // MIN_SHARD, npages))
        per = -(-npages // nshards)
        groups = [(i, min(i + per, npages)) for i in range(0, npages, per)]
        # device pages: gathered into pinned host memory here, on the caller's stream (after the kernels that wrote
        # them), so a lane thread only waits for that copy and sends (few GIL hand-offs beside a busy caller); before
        # the transfer exists, so a failure to stage raises here and leaves nothing pending
        staged = staging.stage_pages(src.flat, soffs, page_bytes) if src.view is None else None
        t = self._new(what, dst.engine, len(groups), total, timeout, callback)
        flags = wire.F_IMM if imm is not None else 0
        first = link.next_lane()
        lanes = []
        for k, (a, b) in enumerate(groups):
            hdr = wire.pack(wire.PAGED, flags=flags, nshards=len(groups), imm=imm or 0, tid=t.tid,
                            region=dst.region, count=b - a, offset=page_bytes, length=(b - a) * page_bytes)
            lane = link.data[(first + k) % nl]
            lane.shared = True
            lanes.append(lane.index)
            lane.post(_PagedJob(t, hdr + doffs[a:b].astype("<u8").tobytes(), src, soffs[a:b], page_bytes,
                                None if staged is None else (staged[0], staged[1], a * page_bytes, b * page_bytes)))
        if len(groups) == 1:
            t.lane = lane
        t.lanes = tuple(lanes)
        return t

    def write_batch(self, src: Region, writes: Iterable[Target | tuple[Any, ...]], *, imm: int | None = None,
                    timeout: float | None = None, callback: Callable[[Transfer], Any] | None = None) -> Transfer:
        """Many WRITEs from `src` in one call: each `Target(dst, length, src_offset, dst_offset)` (or a
        tuple of those fields), to one or many peers, e.g. a dispatch to N peers or many KV blocks.

        Returns one `Transfer`, done when every write landed. With `imm`, every destination peer
        counts `imm` once, after all of this batch's writes to it landed. The writes to one peer
        go out together (one `sendmsg` per lane over tcp, one copy submission for `cuda_ipc`, one
        NIXL transfer for `nixl`).
        """
        self._check_src(src, "write_batch")
        imm, timeout = _imm("imm", imm), _timeout(timeout)
        targets: list[Target] = []
        for i, w in enumerate(writes):
            try:
                tg = w if isinstance(w, Target) else Target(*w)
            except TypeError:
                raise InvalidArgument(f"write_batch: writes[{i}] must be a Target or (dst, length, src_offset, "
                                      f"dst_offset), got {str(w)[:60]}") from None
            targets.append(Target(tg.dst, _int(f"writes[{i}].length", tg.length),
                                  _int(f"writes[{i}].src_offset", tg.src_offset),
                                  _int(f"writes[{i}].dst_offset", tg.dst_offset)))
        if not targets:
            raise InvalidArgument("write_batch: writes is empty")
        by_peer: dict[str, list[int]] = defaultdict(list)
        for i, tg in enumerate(targets):
            src.check(tg.src_offset, tg.length, f"write_batch: writes[{i}] source")
            self._check_dst(tg.dst, tg.dst_offset, tg.length, f"write_batch: writes[{i}]")
            by_peer[tg.dst.engine].append(i)
        links = {peer: self._link(targets[idx[0]].dst.address, timeout) for peer, idx in by_peer.items()}
        plans: list[tuple[str, bool, list[list[int]]]] = []
        parts = 0
        for peer, idx in by_peer.items():
            if self._path is not None and all(self._path.handles(src, targets[i].dst) for i in idx):
                groups: dict[int, list[int]] = defaultdict(list)
                for i in idx:
                    groups[targets[i].dst.region].append(i)
                plans.append((peer, True, list(groups.values())))
                parts += len(groups)
            else:
                if len(idx) > MAX_BATCH_PER_PEER:
                    raise InvalidArgument(f"write_batch: {len(idx)} writes to peer {peer!r}; at most "
                                          f"{MAX_BATCH_PER_PEER} per peer in one batch (split it)")
                plans.append((peer, False, [idx]))
                parts += len(idx)
        total = sum(tg.length for tg in targets)
        t = self._new(f"batch of {len(targets)} writes ({total} B) to {len(by_peer)} peer(s)",
                      next(iter(by_peer)) if len(by_peer) == 1 else None, parts, total, timeout, callback)
        t.peers = tuple(by_peer)
        lanes: list[int] = []
        for peer, on_path, groups_ in plans:
            link = links[peer]
            if on_path:
                left = [len(groups_)]
                lock = threading.Lock()
                for g in groups_:
                    pieces = Pieces(np.array([targets[i].src_offset for i in g], np.int64),
                                    np.array([targets[i].dst_offset for i in g], np.int64),
                                    np.array([targets[i].length for i in g], np.int64))

                    def last(left: list[int] = left, lock: threading.Lock = lock) -> bool:
                        with lock:
                            left[0] -= 1
                            return left[0] == 0

                    one = len(groups_) == 1 and getattr(self._path, "imm_in_batches", False)  # the path posts its imm
                    self._submit_path(t, link, src, targets[g[0]].dst, pieces, imm, last_of_peer=None if one else last)
            else:
                lanes += self._post_batch(t, link, src, [targets[i] for i in groups_[0]], imm)
        t.lanes = tuple(lanes)
        return t

    def _post_batch(self, t: Transfer, link: wire.Link, src: Region, targets: list[Target],
                    imm: int | None) -> list[int]:
        """Send a batch's writes to one peer over the tcp lanes: contiguous runs of messages per lane."""
        flags = wire.F_IMM if imm is not None else 0
        k = len(targets)
        hdrs = [wire.pack(wire.WRITE, flags=flags, nshards=k, imm=imm or 0, tid=t.tid, region=tg.dst.region,
                          offset=tg.dst_offset, length=tg.length) for tg in targets]
        nl = len(link.data)
        total = sum(tg.length for tg in targets)
        nchunks = max(1, min(nl, k, total // MIN_SHARD))
        per = -(-k // nchunks)
        first = link.next_lane()
        used = []
        for c, a in enumerate(range(0, k, per)):
            lane = link.data[(first + c) % nl]
            lane.shared = True
            used.append(lane.index)
            chunk = range(a, min(a + per, k))
            if src.view is None:  # CUDA source over tcp: staged message by message
                for i in chunk:
                    lane.post(_WriteJob(t, hdrs[i], src, targets[i].src_offset, targets[i].length))
                continue
            view = src.view
            bufs: list[Any] = []
            for i in chunk:
                tg = targets[i]
                bufs.append(hdrs[i])
                if tg.length:
                    bufs.append(view[tg.src_offset:tg.src_offset + tg.length])
            job = _GatherJob(t, bufs)
            if not (sum(targets[i].length for i in chunk) <= INLINE_BATCH and job.inline(lane)):
                lane.post(job)
        if len(used) == 1 and not t.peers[1:]:  # one lane to one peer: its waiting caller may read the acks
            t.lane = lane
        return used

    def _submit_path(self, t: Transfer, link: wire.Link, src: Region, dst: MemoryDescriptor, pieces: Pieces,
                     imm: int | None, last_of_peer: Callable[[], bool] | None = None) -> None:
        path = self._path
        assert path is not None
        give = path.delivers_imm and imm is not None and last_of_peer is None and pieces.nbytes > 0

        def done(exc: BaseException | None) -> None:
            self._path_done(link, t, dst, pieces, None if give else imm, exc, last_of_peer)

        try:
            path.submit(t, src, dst, pieces, done, imm if give else None)
        except Exception as exc:  # noqa: BLE001 - a failure to post fails this transfer only
            done(exc if isinstance(exc, TransportError) else TransportError(f"{t.what}: {type(exc).__name__}: {exc}"))

    def _submit_pages(self, t: Transfer, link: wire.Link, src: Region, dst: MemoryDescriptor, index: np.ndarray,
                      shape: tuple[int, int, int, int, int], imm: int | None) -> None:
        """A checked paged write handed to a path that takes page indices (`path.submit_pages`: the n source
        indices then the n destination indices, and (page, src stride, dst stride, src offset, dst offset)):
        no byte offsets are built here; a notice that needs them builds them once the write is done."""
        path = self._path
        assert path is not None
        give = path.delivers_imm and imm is not None
        need = not path.confirms_delivery or (imm is not None and not give)

        def done(exc: BaseException | None) -> None:
            pieces = _NO_PIECES
            if need and exc is None:
                page, ss, ds, so, do = shape
                n = index.size // 2
                pieces = Pieces(*_page_offsets(index.copy(), n, ss, ds, so, do), _lengths(n, page), page)
            self._path_done(link, t, dst, pieces, None if give else imm, exc)

        try:
            path.submit_pages(t, src, dst, index, *shape, done, imm if give else None)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a failure to post fails this transfer only
            done(exc if isinstance(exc, TransportError) else TransportError(f"{t.what}: {type(exc).__name__}: {exc}"))

    def _path_done(self, link: wire.Link, t: Transfer, dst: MemoryDescriptor, pieces: Pieces, imm: int | None,
                   exc: BaseException | None, last_of_peer: Callable[[], bool] | None = None) -> None:
        if exc is not None:
            err = exc if isinstance(exc, TransportError) else TransportError(f"{t.what}: {exc}")
            if t.fail(err):
                with self._lock:
                    self._pending.pop(t.tid, None)
            return
        if t.done():
            return
        with_imm = imm is not None and (last_of_peer is None or last_of_peer())
        path = self._path
        assert path is not None
        if path.confirms_delivery:  # the bytes are in the peer's memory: count this part, tell the peer one way
            if t.part_done(1):
                with self._lock:
                    self._pending.pop(t.tid, None)
            if not with_imm:
                return
            flags = wire.F_IMM | F_NOACK
        else:
            flags = wire.F_IMM if with_imm else 0
        offset, length = int(pieces.dst.min()), pieces.page or int(pieces.length.max())
        msg = wire.pack(wire.NOTICE, flags=flags, imm=imm or 0, tid=t.tid, region=dst.region, offset=offset,
                        length=length)
        try:
            link.ctrl.send_now([msg])
        except OSError as e:
            link.failed(e, link.ctrl)

    def _notify_imm(self, dst: MemoryDescriptor, imm: int, tid: int) -> None:
        """A data path that could not post an immediate itself sends it, once its bytes landed, as a one-way notice."""
        link = self._links.get(dst.engine)
        if link is None or not link.alive:
            return  # the peer is gone: its transfers fail through the link
        msg = wire.pack(wire.NOTICE, flags=wire.F_IMM | F_NOACK, imm=imm, tid=tid, region=dst.region)
        try:
            link.ctrl.send_now([msg])
        except OSError as e:
            link.failed(e, link.ctrl)

    def write_imm(self, peer: PeerRef, imm: int, *, timeout: float | None = None,
                  callback: Callable[[Transfer], Any] | None = None) -> Transfer:
        """An imm-only write: the peer counts `imm` once; done when the peer confirmed it."""
        imm, timeout = _int("imm", imm, 0, U32), _timeout(timeout)
        addr = self._address_of(peer)
        link = self._link(addr, timeout)
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
        imm, n, timeout = _int("imm", imm, 0, U32), _int("n", n, 1), _timeout(timeout)
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

    def _path_imm(self, imm: int, region: int, peer: str) -> None:
        """An immediate delivered by the data path itself (a NIXL notification)."""
        if region in self._regions:
            self._count(imm, peer)
        else:
            self._log(f"imm {imm} from {peer} for unknown region {region} dropped")

    def _count(self, imm: int, peer: str) -> None:
        self.counter.add(imm)
        for cb in self._imm_callbacks:
            self._callbacks.submit(cb, imm, peer)

    # ------------------------------------------------------------------ two-sided
    def send(self, peer: PeerRef, data: bytes, tag: int = 0) -> Transfer:
        """Send a small control message (<= 64 MiB); done once handed to the kernel."""
        tag = _int("tag", tag, 0, U32)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgument(f"send: data must be bytes, got {type(data).__name__}")
        if len(data) > MAX_SEND:
            raise InvalidArgument(f"send: {len(data)} bytes is too large for a control message (max {MAX_SEND}); "
                                  "use write")
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
        if mtype == _ACK:  # first: the message a caller waiting for its write reads
            t = self._pending.get(tid)
            if t is None:
                return
            if flags == STATUS_OK:
                if t.part_done(count or 1):
                    self._pending.pop(tid, None)
            else:
                self._pending.pop(tid, None)
                t.fail(error_for_status(flags, t.what))
            return
        link = lane.link
        rd = lane.reader
        if mtype == _WRITE:
            r = self._regions.get(region)
            if r is not None and offset + length <= r.nbytes and r.view is not None:  # the common case, kept short
                rd.read_into(r.view[offset:offset + length])
                if flags & wire.F_IMM:
                    self._landed(lane, tid, nshards, flags, imm, STATUS_OK)
                else:
                    lane.ack(STATUS_OK, tid)
                return
            if r is None:
                status = STATUS_UNKNOWN_REGION
            elif offset + length > r.nbytes:
                status = STATUS_OUT_OF_RANGE
            else:
                status = STATUS_OK
            if status != STATUS_OK:
                rd.skip(length)
            elif r is not None and r.view is not None:
                rd.read_into(r.view[offset:offset + length])
            elif r is not None:
                _recv_cuda(lane, r, offset, length)
            self._landed(lane, tid, nshards, flags, imm, status)
        elif mtype == wire.PAGED:
            page = offset
            if not 0 < count <= MAX_PAGES or page <= 0 or count * page != length:
                raise ProtocolError(f"PAGED message with {count} pages of {page} B for {length} B "
                                    f"(at most {MAX_PAGES} pages, and pages x page size must equal the length)")
            offs = np.frombuffer(rd.read_bytes(count * 8), dtype="<u8")
            r = self._regions.get(region)
            if r is None:
                status = STATUS_UNKNOWN_REGION
            elif count and int(offs.max()) + page > r.nbytes:
                status = STATUS_OUT_OF_RANGE
            else:
                status = STATUS_OK
            if status != STATUS_OK:
                rd.skip(length)
            elif r is not None and r.view is not None:
                view = r.view
                for o in offs.tolist():
                    rd.read_into(view[o:o + page])
            elif r is not None:
                _recv_cuda_pages(lane, r, offs, page)
            self._landed(lane, tid, nshards, flags, imm, status)
        elif mtype == wire.IMM:
            self._count(imm, link.peer)
            lane.ack(STATUS_OK, tid)
        elif mtype == wire.NOTICE:
            status = STATUS_OK if region in self._regions else STATUS_UNKNOWN_REGION
            if status == STATUS_OK and flags & wire.F_IMM:
                self._count(imm, link.peer)
            if status != STATUS_OK:
                self._log(f"notice from {link.peer} for unknown region {region}")
            if not flags & F_NOACK:
                lane.ack(status, tid)
        elif mtype == REVOKE:
            with self._lock:
                self._revoked.add((link.peer, region))
            if self._path is not None:
                self._path.forget_remote(link.peer, region)
        elif mtype == wire.SEND:
            if length > MAX_SEND:
                raise ProtocolError(f"SEND of {length} B from {link.peer} (at most {MAX_SEND})")
            m = Message(link.peer, imm, rd.read_bytes(length))
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
        lane.ack(status, tid)

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
        """Send from the calling thread if the lane is idle (see `Lane.send_inline`); False otherwise."""
        assert self.src.view is not None
        return lane.send_inline([self.hdr, self.src.view[self.off:self.off + self.n]])

    def __call__(self, lane: wire.Lane) -> None:
        if self.t.done():
            return  # cancelled / timed out / failed: drop the unsent shard
        if lane.delay:
            time.sleep(lane.delay)
        if self.src.view is not None:
            with lane:
                wire.send_gather(lane.sock, [self.hdr, self.src.view[self.off:self.off + self.n]])
            return
        with lane:
            lane.sock.sendall(self.hdr)
            for _o, k, mv in _stage_out(lane, self.src, self.off, self.n):
                lane.sock.sendall(mv[:k])


class _GatherJob:
    """Many messages (headers and host payload views) for one lane, sent with gathered `sendmsg` calls."""

    __slots__ = ("t", "bufs")

    def __init__(self, t: Transfer, bufs: list[Any]) -> None:
        self.t, self.bufs = t, bufs

    def inline(self, lane: wire.Lane) -> bool:
        return lane.send_inline(self.bufs)

    def __call__(self, lane: wire.Lane) -> None:
        if self.t.done():
            return
        if lane.delay:
            time.sleep(lane.delay)
        with lane:
            wire.send_gather(lane.sock, self.bufs)


class _PagedJob:
    """One lane's share of a paged write over tcp: its pages from host memory, or (`staged`, for device memory: the
    write's pinned host copy, the event that completes it and this share's byte range) from that copy once done."""

    __slots__ = ("t", "hdr", "src", "offs", "page", "staged")

    def __init__(self, t: Transfer, hdr: bytes, src: Region, offs: Any, page: int,
                 staged: tuple[Any, Any, int, int] | None = None) -> None:
        self.t, self.hdr, self.src, self.offs, self.page, self.staged = t, hdr, src, offs, page, staged

    def __call__(self, lane: wire.Lane) -> None:
        if self.t.done():
            return
        if lane.delay:
            time.sleep(lane.delay)
        if self.staged is None:  # host memory: the pages as they are
            view, p = self.src.view, self.page
            assert view is not None
            with lane:
                wire.send_gather(lane.sock, [self.hdr] + [view[o:o + p] for o in self.offs.tolist()])
            return
        host, event, a, b = self.staged
        event.synchronize()  # the GIL released while the device copies
        with lane:
            wire.send_gather(lane.sock, [self.hdr, memoryview(cast(Any, host.numpy()))[a:b]])


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
    """A plain write into device memory: through the lane's pinned buffer, copied on this thread's own stream
    (beside, not behind, the kernels the region's owner queued; as `staging.land_pages` does for pages)."""
    st, mv = _staging(lane)
    stream = staging.recv_stream(r.flat.device)
    o = 0
    while o < length:
        k = min(wire.STAGE_BYTES, length - o)
        lane.reader.read_into(mv[:k])
        r.flat[offset + o:offset + o + k].copy_(st[:k], non_blocking=True)
        stream.synchronize()  # the pinned buffer is read again for the next piece
        o += k


def _recv_cuda_pages(lane: wire.Lane, r: Region, offs: Any, page: int) -> None:
    staging.land_pages(lane.reader.read_into, r.flat, offs, page)
