"""The embedded TCP backend: authenticated peers, several lanes (sockets) per peer, zero-copy receive.

Per peer connection: one control socket (acks, imm-only writes, notices, send/recv,
barriers) and `lanes` data sockets (writes and paged writes). Each data socket has a
sender thread fed by a queue and a receiver thread that `recv_into`s payloads straight
into the registered buffer (`recvmsg_into` scatters paged writes). A caller whose lane is
idle sends its messages itself (`Lane.send_inline`), never blocking: the socket takes what
it can at once, the rest goes out before any other message of that lane. Control receivers
never block on sends, so the mesh cannot deadlock.

Wire: every message is a 40-byte header `<BBHIQIIQQ`: type, flags, nshards, imm, tid,
region, count, offset, length; then, for PAGED, `count` u64 destination offsets; then the
payload. Handshake per socket: server nonce; client nonce + HMAC-SHA256(secret) + hello;
server HMAC back (mutual challenge–response, nothing secret on the wire).

Acknowledgements of writes go back on the data socket the write came in on (its other direction:
TCP acknowledges the data in the same segment, as a plain socket's request/ack loop does), coalesced:
a receiver that has more data waiting defers the acks and sends them together (acks of one transfer
merged into one header with a count). A data receiver sends them itself, never blocking: when that
socket is busy or full they go on the control socket instead (the peer's control receiver always
drains); a control receiver queues its acks to its sender thread. So no receiver ever waits on a
socket the peer is not reading: the mesh cannot deadlock, whatever both sides write to each other.

The writer reads its own acknowledgement ("caller reads"): once this side has written on a data lane,
the lane's receiver thread waits for data with `epoll` and reads only while it holds the lane's read
token; a caller waiting in `Transfer.result()` for a write that went out on one lane takes the token
when it is free, masks the receiver thread's `epoll` (so it sleeps on) and reads the acks itself with
bounded, non-blocking reads: no thread hand-off between the ack on the socket and the waiting caller.
It handles acks only; at any other message it hands the lane back to the receiver thread (waking it
through an eventfd), and after `CALLER_READ_S` it gives up and waits on the future. Before it first sleeps it
spins up to `WORKBENCH_TCP_SPIN_US` (default 100 µs, 0: off), `poll(0)` and `sched_yield` in turn, so an ack that
comes back soon costs no wake-up (on loopback the sleeping writer's wake-up was the largest single item of a waited
write); a lane whose ack took longer than the spin stops spinning until an ack comes back within it again. At most
`MAX_PENDING_HANDSHAKES` connections may be unauthenticated at once; beyond that the
oldest is dropped, so idle or slow strangers cannot pile up threads and sockets.

The lane loop in C (`_tcp_native.c`, an optional extension built by the install; `WORKBENCH_TCP_NATIVE=0` turns it
off, and a tree where it is not built runs the Python loop, noted once in the `transport.backends.tcp` log): a data
lane's receiver thread runs `_tcp_native.Lane.run` with the GIL released while only it sends on the socket (until
this side writes on the lane: `Lane.shared`, whose setter makes the C loop stop sending and hand the lane to the
Python loop). It reads headers into the lane reader's buffer, takes plain writes (no immediate) into host regions the
engine registered (`Engine._native_regions`: the region's buffer export, held while a receive into it is in flight
even after deregistration), checks `offset + length` against the region before it writes a byte, receives the
payload straight into the region and sends the coalesced acks; any other message (another type, a write with an
immediate, an unknown region, a range outside the region) goes to the Python handler with its header still
buffered, so the checks and statuses stay those of the Python loop. The caller's send (`_tcp_native.send_some`:
one non-blocking `sendmsg`) and its wait for the ack (`_tcp_native.wait_ack`: the spin, then `poll` in slices) are C
calls too. Every wait in C is a bounded `poll` (200 ms slices for the receiver, `CALLER_SLICE_MS` for the caller);
EOF and socket errors come back as `PeerGone` / `OSError` and fail the link as in Python. The wire is the same: a
native writer and a Python target (or the other way round) work together.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from time import perf_counter
from typing import Any, Protocol

from transport.errors import AuthError, InvalidArgument, PeerGone, TransportError

HEADER = struct.Struct("<BBHIQIIQQ")
HEADER_SIZE = HEADER.size  # 40
WRITE, PAGED, ACK, IMM, SEND, BARRIER, NOTICE, ABORT, BYE = range(1, 10)
F_IMM = 1
MAGIC = b"WBT1"
IOV_BATCH = 512
HANDSHAKE_TIMEOUT = 10.0
STAGE_BYTES = 8 << 20  # pinned staging chunk for CUDA regions
MAX_PENDING_HANDSHAKES = 64  # unauthenticated connections held at once (the oldest is dropped beyond)
ACK_BATCH = 64  # flush coalesced acks at least this often
CALLER_READ_S = 0.2  # a caller reads its acks itself for at most this long, then waits on the future
CALLER_SLICE_MS = 2  # ... polling in slices this long (ms), so a completion by another route is seen soon
SPIN_ENV = "WORKBENCH_TCP_SPIN_US"


def spin_seconds(env: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """The caller's spin before it sleeps for its ack: `WORKBENCH_TCP_SPIN_US` microseconds (default 100, 0: off).
    Raises `InvalidArgument` naming the variable for anything else."""
    raw = env.get(SPIN_ENV, "100").strip()
    try:
        us = int(raw)
    except ValueError:
        us = -1
    if not 0 <= us <= 10_000:
        raise InvalidArgument(f"{SPIN_ENV}: must be an integer number of microseconds 0..10000 (0 turns the spin "
                              f"off), got {raw!r}")
    return us / 1e6


# read once at import; a bad value is reported when an engine is made (`Engine` calls `spin_seconds()` again),
# not as a traceback from `import transport`
try:
    SPIN_S = spin_seconds()
except InvalidArgument:
    SPIN_S = 0.0

NATIVE_ENV = "WORKBENCH_TCP_NATIVE"
_native: Any = None
_NATIVE_MISSING = ""
try:  # the C lane loop (transport/backends/_tcp_native.c), built by the install where a compiler is found
    from transport.backends import _tcp_native as _native  # type: ignore[attr-defined, no-redef]
except ImportError as _exc:  # not built (an uninstalled tree, no compiler): the Python lane loop
    _NATIVE_MISSING = f"{type(_exc).__name__}: {_exc}"
_log = logging.getLogger(__name__)
_native_noted = False


def native_enabled(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether an engine made now uses the C lane loop: `WORKBENCH_TCP_NATIVE` (default 1; 0: the Python loop)
    and the extension built. Raises `InvalidArgument` naming the variable for a value other than 0 or 1."""
    global _native_noted
    raw = env.get(NATIVE_ENV, "1").strip()
    if raw not in ("0", "1"):
        raise InvalidArgument(f"{NATIVE_ENV}: must be 1 (the C lane loop where it is built) or 0 (the Python lane "
                              f"loop), got {raw!r}")
    if raw == "0":
        return False
    if _native is None:
        if not _native_noted:
            _native_noted = True
            _log.info("tcp: the C lane loop is not built here (%s); using the Python lane loop", _NATIVE_MISSING)
        return False
    return True


def native_regions(env: dict[str, str] | os._Environ[str] = os.environ) -> Any:
    """A fresh table of host regions for an engine's native receiver loops, or None when they are off."""
    return _native.Regions() if native_enabled(env) and _native is not None else None


class LinkOwner(Protocol):
    """What links and the listener need of their engine."""

    name: str

    def _on_message(self, lane: Lane, msg: tuple[int, ...]) -> None: ...
    def _link_down(self, link: Link, exc: TransportError) -> None: ...
    def _log(self, text: str) -> None: ...
    def _hello(self) -> dict[str, Any]: ...


def pack(mtype: int, *, flags: int = 0, nshards: int = 1, imm: int = 0, tid: int = 0, region: int = 0,
         count: int = 0, offset: int = 0, length: int = 0) -> bytes:
    return HEADER.pack(mtype, flags, nshards, imm & 0xFFFFFFFF, tid, region, count, offset, length)


def tune(sock: socket.socket, sockbuf: int | None) -> None:
    """TCP_NODELAY, keepalive that notices a vanished host in ~15 s, optional fixed buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 15000)):
        if hasattr(socket, opt):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
            except OSError:
                pass
    if sockbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)


def recv_exact(sock: socket.socket, buf: memoryview) -> None:
    """Fill `buf` from `sock`; raise `PeerGone` on EOF. One call takes all of it, however many segments it came in
    (`MSG_WAITALL`: returns early only on a signal, EOF or a non-blocking socket's empty queue)."""
    got, n = 0, len(buf)
    while got < n:
        k = sock.recv_into(buf[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise PeerGone("connection closed by peer")
        got += k


def recv_bytes(sock: socket.socket, n: int) -> bytes:
    b = bytearray(n)
    recv_exact(sock, memoryview(b))
    return bytes(b)


def recv_scatter(sock: socket.socket, bufs: list[memoryview]) -> None:
    """Fill each buffer in `bufs` in order (one `recvmsg_into` per batch of iovecs)."""
    i = 0
    while i < len(bufs):
        batch = bufs[i:i + IOV_BATCH]
        want = sum(len(b) for b in batch)
        k = sock.recvmsg_into(batch)[0]
        if k == 0:
            raise PeerGone("connection closed by peer")
        if k == want:
            i += len(batch)
            continue
        # partial: skip the full buffers, finish the split one, continue after it
        for j, b in enumerate(batch):
            if k >= len(b):
                k -= len(b)
                continue
            recv_exact(sock, b[k:])
            i += j + 1
            break


def send_gather(sock: socket.socket, bufs: Sequence[memoryview | bytes]) -> None:
    """Send every buffer in order with `sendmsg` (gather, no copy), handling partial sends."""
    pending = [memoryview(b).cast("B") if not isinstance(b, memoryview) else b for b in bufs]
    while pending:
        batch = pending[:IOV_BATCH]
        k = sock.sendmsg(batch)
        drop = 0
        for b in batch:
            if k >= len(b):
                k -= len(b)
                drop += 1
            else:
                pending[drop] = b[k:]
                break
        del pending[:drop]


def send_some(sock: socket.socket, bufs: list[Any], native: bool = False) -> list[memoryview]:
    """Send as much of `bufs` as the socket takes now without blocking; return what is left (empty: all
    sent), the partly sent buffer sliced, so the caller can hand the rest to a thread that may block.
    `native`: the first `sendmsg` from C (`_tcp_native.send_some`)."""
    if len(bufs) <= IOV_BATCH:  # the usual case: one call takes it all
        if native:
            k = _native.send_some(sock.fileno(), bufs)
        else:
            try:
                k = sock.sendmsg(bufs, [], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                k = 0
        if k == sum(map(len, bufs)):
            return []
        bufs = list(_skip(bufs, k))
    pending = [b if isinstance(b, memoryview) else memoryview(b).cast("B") for b in bufs]
    while pending:
        try:
            k = sock.sendmsg(pending[:IOV_BATCH], [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return pending
        drop = 0
        for b in pending[:IOV_BATCH]:
            if k >= len(b):
                k -= len(b)
                drop += 1
            else:
                pending[drop] = b[k:]
                break
        del pending[:drop]
    return pending


def _skip(bufs: list[Any], k: int) -> Iterator[Any]:
    """`bufs` less their first `k` bytes."""
    for b in bufs:
        n = len(b)
        if k >= n:
            k -= n
            continue
        yield (b if isinstance(b, memoryview) else memoryview(b).cast("B"))[k:] if k else b
        k = 0


class Reader:
    """Buffered receive side of a socket: headers and small payloads come out of one `recv_into` of
    up to `size` bytes (one system call for many small messages); large payloads go straight into
    their destination (zero copy)."""

    def __init__(self, sock: socket.socket, size: int = 256 << 10) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.pos = 0
        self.end = 0
        self.lean = False  # the last payload was large: read the next header alone (its payload goes straight in)

    def buffered(self) -> int:
        return self.end - self.pos

    def _fill(self, want: int, exact: bool = False) -> None:
        """Make at least `want` (<= buffer size) bytes available (`exact`: read no more than that)."""
        if self.end - self.pos >= want:
            return
        if self.pos == self.end:
            self.pos = self.end = 0
        elif self.pos + want > len(self.buf):  # compact: move the unread tail to the front
            n = self.end - self.pos
            self.mv[:n] = self.mv[self.pos:self.end]
            self.pos, self.end = 0, n
        while self.end - self.pos < want:
            k = self.sock.recv_into(self.mv[self.end:], want - (self.end - self.pos) if exact else 0)
            if k == 0:
                raise PeerGone("connection closed by peer")
            self.end += k

    def fill_nowait(self) -> int:
        """Append what the socket holds now to the buffer without blocking; bytes read (0: none yet).
        `PeerGone` on EOF."""
        if self.pos == self.end:
            self.pos = self.end = 0
        elif self.end == len(self.buf):  # compact: move the unread tail to the front
            n = self.end - self.pos
            self.mv[:n] = self.mv[self.pos:self.end]
            self.pos, self.end = 0, n
        try:
            k = self.sock.recv_into(self.mv[self.end:], 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        if k == 0:
            raise PeerGone("connection closed by peer")
        self.end += k
        return k

    def header(self) -> tuple[int, ...]:
        self._fill(HEADER_SIZE, self.lean)
        msg = HEADER.unpack_from(self.buf, self.pos)
        self.pos += HEADER_SIZE
        return msg

    def read_into(self, dst: memoryview) -> None:
        """Fill `dst` exactly."""
        n = len(dst)
        self.lean = n >= len(self.buf) // 4
        k = min(n, self.end - self.pos)
        if k:
            dst[:k] = self.mv[self.pos:self.pos + k]
            self.pos += k
        if k == n:
            return
        rest = dst[k:]
        if len(rest) >= len(self.buf) // 4:
            recv_exact(self.sock, rest)
            return
        self._fill(len(rest))
        rest[:] = self.mv[self.pos:self.pos + len(rest)]
        self.pos += len(rest)

    def read_bytes(self, n: int) -> bytes:
        b = bytearray(n)
        self.read_into(memoryview(b))
        return bytes(b)

    def skip(self, n: int) -> None:
        k = min(n, self.end - self.pos)
        self.pos += k
        if n > k:
            drain(self.sock, n - k)


def drain(sock: socket.socket, n: int) -> None:
    scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
    while n > 0:
        k = min(n, len(scratch))
        recv_exact(sock, scratch[:k])
        n -= k


def _finish_rest(lane: Lane) -> None:
    """A sender-thread job: send the tail `send_inline` left (entering the lane sends it), always, even
    when its transfer was cancelled meanwhile, since the peer is mid-message."""
    with lane:
        pass


# ---------------------------------------------------------------- handshake
def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def client_handshake(sock: socket.socket, secret: bytes, hello: dict[str, Any],
                     timeout: float = HANDSHAKE_TIMEOUT) -> dict[str, Any]:
    sock.settimeout(timeout)
    head = recv_bytes(sock, 4 + 16)
    if head[:4] != MAGIC:
        raise AuthError("peer is not a workbench transport engine (bad magic)")
    snonce, cnonce = head[4:], os.urandom(16)
    body = json.dumps(hello).encode()
    sock.sendall(cnonce + _mac(secret, b"C", snonce, cnonce, body) + struct.pack("<I", len(body)) + body)
    status = recv_bytes(sock, 2)
    if status != b"OK":
        raise AuthError("peer rejected our credentials: the engines do not share a secret "
                        "(set the same secret= or WORKBENCH_TRANSPORT_SECRET on both)")
    smac = recv_bytes(sock, 32)
    n = struct.unpack("<I", recv_bytes(sock, 4))[0]
    sbody = recv_bytes(sock, n)
    if not hmac.compare_digest(smac, _mac(secret, b"S", cnonce, snonce, sbody)):
        raise AuthError("peer failed the challenge: it does not know the shared secret")
    sock.settimeout(None)
    return dict(json.loads(sbody))


def server_handshake(sock: socket.socket, secret: bytes, hello: dict[str, Any]) -> dict[str, Any]:
    sock.settimeout(HANDSHAKE_TIMEOUT)
    snonce = os.urandom(16)
    sock.sendall(MAGIC + snonce)
    cnonce = recv_bytes(sock, 16)
    cmac = recv_bytes(sock, 32)
    n = struct.unpack("<I", recv_bytes(sock, 4))[0]
    if n > 1 << 16:
        raise AuthError("oversized hello")
    body = recv_bytes(sock, n)
    if not hmac.compare_digest(cmac, _mac(secret, b"C", snonce, cnonce, body)):
        sock.sendall(b"NO")
        raise AuthError("a client failed the challenge (wrong shared secret)")
    sbody = json.dumps(hello).encode()
    sock.sendall(b"OK" + _mac(secret, b"S", cnonce, snonce, sbody) + struct.pack("<I", len(sbody)) + sbody)
    sock.settimeout(None)
    return dict(json.loads(body))


# ---------------------------------------------------------------- links
class Lane:
    """One socket of a peer link with its sender thread (queue) and receiver thread."""

    def __init__(self, link: Link, index: int, sock: socket.socket) -> None:
        self.acks: list[tuple[int, int, int]] = []  # (status, tid, count) waiting to be flushed
        self.reader = Reader(sock)
        self.link = link
        self.index = index  # 0 = control, 1.. = data lanes
        self.sock = sock
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.send_lock = threading.Lock()
        self.rest: list[memoryview] | None = None  # the unsent tail of messages `send_inline` started
        self.delay = 0.0  # fault injection: seconds slept before each data message
        self.staging: Any = None  # pinned host buffer for CUDA regions (lazy)
        self._poll = select.poll()  # "is more waiting?" without a syscall that raises when nothing is
        self._poll.register(sock, select.POLLIN)
        self._fd = sock.fileno()
        # caller reads (see the module docstring): whoever holds `token` reads the socket; once this side wrote
        # on the lane (`shared`), the receiver thread waits in `_ep` (the socket and the `_kick` eventfd)
        self.token = threading.Lock()
        # the C lane loop (see the module docstring): its receiver loop (data lanes) and the caller's send and ack wait
        self.native = getattr(link.engine, "_native_regions", None) is not None
        self._native: Any = _native.Lane(self._fd) if self.native and index and _native is not None else None
        self._shared = False
        self.spin = SPIN_S > 0  # a waiting caller spins before it sleeps (cleared while acks take longer than that)
        self._ep: Any = None
        self._kick = -1
        name = f"wbt-{link.engine.name}-{link.peer}-{index}"
        self.tx = threading.Thread(target=self._send_loop, name=name + "-tx", daemon=True)
        self.rx = threading.Thread(target=self._recv_loop, name=name + "-rx", daemon=True)

    def start(self) -> None:
        self.tx.start()
        self.rx.start()

    @property
    def shared(self) -> bool:
        """This side has written on the lane (its acks come back on it: a waiting caller may read them)."""
        return self._shared

    @shared.setter
    def shared(self, value: bool) -> None:
        if value and not self._shared and self._native is not None:
            self._native.share()  # the C receiver loop sends no more acks on the socket and hands the lane over
        self._shared = value

    def __enter__(self) -> Lane:
        """`with lane:` holds the send lock, the tail of a message `send_inline` started already sent
        (every sender goes through here, so no message ever cuts into another)."""
        self.send_lock.acquire()
        if self.rest is not None:
            try:
                send_gather(self.sock, self.rest)
            except BaseException:
                self.send_lock.release()
                raise
            self.rest = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.send_lock.release()

    def send_now(self, bufs: list[Any]) -> None:
        """Send a small message from the calling thread (never from a control receiver)."""
        with self:
            if len(bufs) == 1:
                self.sock.sendall(bufs[0])
            else:
                send_gather(self.sock, bufs)

    def post(self, item: Any) -> None:
        self.queue.put(item)

    def _take_idle(self) -> bool:
        """Take the send lock if the lane is idle (no injected delay, nothing queued, no unsent rest);
        the caller releases it. False (lock not held) otherwise."""
        if self.delay or not self.queue.empty() or not self.send_lock.acquire(blocking=False):
            return False
        if self.rest is not None:
            self.send_lock.release()
            return False
        return True

    def send_inline(self, bufs: list[Any]) -> bool:
        """Send whole messages from the calling thread when this lane is idle (no queue, no lock holder, no
        injected delay); False (nothing sent) otherwise. Never blocks: what the socket does not take at once
        stays as the lane's `rest`, a job for the sender thread is queued, and whichever sender enters the
        lane next sends it before anything else (see `__enter__`)."""
        # idle: no injected delay, nothing queued, no unsent rest, the send lock free (as `_take_idle`, inline)
        if self.delay or self.rest is not None or not self.queue.empty() or not self.send_lock.acquire(False):
            return False
        if self.rest is not None:
            self.send_lock.release()
            return False
        try:
            try:
                rest = send_some(self.sock, bufs, self.native)
            except OSError as exc:
                self.link.failed(exc, self)
                return True
            if rest:
                self.rest = rest
                self.queue.put(_finish_rest)  # the sender thread sends it unless another sender did first
            return True
        finally:
            self.send_lock.release()

    def send_small(self, data: bytes) -> bool:
        """Send one small message (an ack) from the calling thread if this lane is idle, never blocking; False
        (nothing sent) when the lane is busy, delayed or its socket full, so the caller sends it elsewhere."""
        if not self._take_idle():
            return False
        try:
            try:
                k = self.sock.send(data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self.link.failed(exc, self)
                return True
            if k < len(data):  # the sender thread sends the tail before anything else (see `__enter__`)
                self.rest = [memoryview(data)[k:]]
                self.queue.put(_finish_rest)
            return True
        finally:
            self.send_lock.release()

    def ack(self, status: int, tid: int, count: int = 1) -> None:
        """Queue an acknowledgement (sent by `flush_acks`, merged with the last one of the same transfer)."""
        if self.acks and self.acks[-1][0] == status and self.acks[-1][1] == tid:
            self.acks[-1] = (status, tid, self.acks[-1][2] + count)
        else:
            self.acks.append((status, tid, count))

    def flush_acks(self) -> None:
        acks, self.acks = self.acks, []
        if not acks:
            return
        if len(acks) == 1 and self.index:
            st, tid, n = acks[0]
            one = HEADER.pack(ACK, st, 1, 0, tid, 0, n, 0, 0)
            if not self.send_small(one):
                self.link.ctrl.send_now([one])
            return
        msgs = [pack(ACK, flags=st, tid=tid, count=n) for st, tid, n in acks]
        if self.index == 0:
            self.link.ctrl.post(msgs)  # a control receiver never blocks on a send
        elif not self.send_small(msgs[0] if len(msgs) == 1 else b"".join(msgs)):
            self.link.ctrl.send_now(msgs)  # this lane is busy: the peer's control receiver always drains

    def _more_waiting(self, cheap: bool = False) -> bool:
        """Bytes of another message already here (buffered or in the socket): acks can wait for it.
        `cheap`: after a small payload an empty buffer means nothing more (the last read took all there was)."""
        if self.reader.buffered():
            return True
        if cheap and not self.reader.lean:
            return False
        try:
            ready = self._poll.poll(0)
            return bool(ready and ready[0][1] & select.POLLIN)
        except OSError:
            return False

    def _send_loop(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if callable(item):
                    item(self)  # a data message: the callable sends it (holding send_lock)
                else:
                    self.send_now(item)
        except (OSError, PeerGone) as exc:
            self.link.failed(exc, self)
        except Exception as exc:  # noqa: BLE001 - a bug must still surface as a failed link
            self.link.engine._log(f"lane {self.index} to {self.link.peer}: send failed: {type(exc).__name__}: {exc}")
            self.link.failed(exc, self)

    def _recv_loop(self) -> None:
        """Read and handle messages. Holding the read token throughout until this side writes on the lane
        (`shared`); from then on it waits for data in `epoll` without the token and takes the token only to
        read what arrived, so a waiting caller can read its own acks (`read_acks`)."""
        handler = self.link.engine._on_message
        reader = self.reader
        try:
            if self._native is not None and not self.delay and not self._native_loop(handler):
                return
            while True:
                if self._ep is not None and not self._wait_readable():
                    return
                with self.token:
                    if self._ep is not None and not self._more_waiting():
                        continue  # a caller read it, or a kick with nothing left
                    while True:
                        if not self._handle(reader.header(), handler):
                            return
                        if self.shared and not self._more_waiting():
                            if self._ep is None:
                                self._go_shared()
                            break
        except (OSError, PeerGone) as exc:
            self.link.failed(exc, self)
        except Exception as exc:  # noqa: BLE001 - a protocol violation or a bug: drop the link, say why
            self.link.engine._log(f"dropped the link to {self.link.peer}: {type(exc).__name__}: {exc}")
            self.link.failed(exc, self)
        finally:
            self._close_wait()

    def _handle(self, msg: tuple[int, ...], handler: Callable[[Lane, tuple[int, ...]], None]) -> bool:
        """One message the receiver read (either loop's): the peer's goodbye closes the link (False); anything else
        goes to `handler`, then the acks are flushed unless more is waiting (buffered, or after a large payload in
        the socket: one poll)."""
        if msg[0] == BYE:
            self.flush_acks()
            self.link.closed_by_peer()
            return False
        handler(self, msg)
        acks, reader = self.acks, self.reader
        if acks and (len(acks) >= ACK_BATCH or not (reader.end > reader.pos or reader.lean and self._more_waiting())):
            self.flush_acks()
        return True

    def _native_loop(self, handler: Callable[[Lane, tuple[int, ...]], None]) -> bool:
        """The receiver loop in C (`_tcp_native.Lane.run`, GIL released) while only this thread sends on the socket:
        plain writes into known host regions land and are acked there; any other message comes back here and is
        handled as the Python loop handles it. Returns True when this side starts writing on the lane (the Python
        loop goes on from there), False once the peer said goodbye."""
        run, reader = self._native.run, self.reader
        regions = self.link.engine._native_regions  # type: ignore[attr-defined]
        with self.token:
            while True:
                code, reader.pos, reader.end, acks = run(reader.buf, reader.pos, reader.end, regions)
                if acks:
                    for st, tid, n in acks:
                        self.ack(st, tid, n)
                if code == _native.R_PY:
                    if not self._handle(reader.header(), handler):
                        return False
                elif code == _native.R_EOF:
                    raise PeerGone("connection closed by peer")
                elif code == _native.R_SHARED:
                    self.flush_acks()
                    if not reader.buffered():
                        self._go_shared()
                    return True
                elif self.acks:  # R_ACKS
                    self.flush_acks()
                if self.sock.fileno() < 0:
                    raise PeerGone("socket closed")

    def _go_shared(self) -> None:
        """From now on the receiver thread waits in `epoll` (the socket, and an eventfd a caller kicks)."""
        ep = select.epoll()
        try:
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            ep.close()
            raise
        ep.register(self.sock.fileno(), select.EPOLLIN)
        ep.register(kick, select.EPOLLIN)
        self._kick = kick
        self._ep = ep

    def _wait_readable(self) -> bool:
        """Block (token not held) until the socket or a kick has something; False once the lane is closed."""
        ep = self._ep
        while True:
            if self.sock.fileno() < 0:
                return False
            try:
                events = ep.poll(1.0)
            except (OSError, ValueError):
                return False
            for fd, _ in events:
                if fd == self._kick:
                    try:
                        os.eventfd_read(self._kick)
                    except OSError:
                        pass
            if events:
                return True

    def _close_wait(self) -> None:
        """Close the epoll and the eventfd holding the read token, so no caller uses them meanwhile."""
        got = self.token.acquire(timeout=CALLER_READ_S + 5.0)
        try:
            ep, kick = self._ep, self._kick
            self._ep, self._kick = None, -1
            if ep is not None:
                ep.close()
            if kick >= 0:
                os.close(kick)
        finally:
            if got:
                self.token.release()

    def read_acks(self, t: Any, seconds: float = CALLER_READ_S) -> None:
        """Caller reads: the waiting caller of a write `t` that went out on this lane reads the acks from the
        socket itself until `t` is done (or `seconds` passed, or a message other than an ack is next: that one
        is the receiver thread's). Returns when the receiver thread keeps the lane. Reads never block:
        a peer that stops mid-message cannot hold the caller beyond `seconds`."""
        # the receiver thread holds the token only while it reads what arrived (often this very ack): wait that out
        if self._ep is None or not (self.token.acquire(False) or self.token.acquire(True, CALLER_SLICE_MS / 1000)):
            return
        self._reap(t, seconds, None)

    def send_reaping(self, bufs: list[Any], t: Any) -> bool:
        """`send_inline` with the receiver thread's epoll masked meanwhile, then the acks that already came back
        read from this thread (non-blocking): on loopback the peer often answers while this thread is still in
        the send, and then no thread is woken for the ack at all."""
        if self._ep is None or not self.token.acquire(False):
            return self.send_inline(bufs)
        return self._reap(t, 0.0, bufs)

    def _reap(self, t: Any, seconds: float, bufs: list[Any] | None) -> bool:
        """Holding the token (released here): mask the receiver thread's epoll, send `bufs` if given, read acks
        until `t` is done or `seconds` passed (0: only what is there now), re-arm the epoll (kick if bytes stay
        buffered). True unless `bufs` were not sent."""
        ep = self._ep  # closed only by a holder of the token
        reader = self.reader
        handover = False
        fd = self._fd
        try:
            if ep is None or self.sock.fileno() < 0:
                return self.send_inline(bufs) if bufs is not None else True
            ep.modify(fd, 0)  # the receiver thread sleeps through what this caller reads
            if bufs is not None and not self.send_inline(bufs):
                return False
            if self.native:
                handover = self._reap_native(t, seconds)
                return True
            handler, poll, sched_yield = self.link.engine._on_message, self._poll.poll, os.sched_yield
            deadline = 0.0
            while True:
                pos = reader.pos
                if reader.end > pos:
                    if reader.buf[pos] != ACK:
                        handover = True
                        break
                    if reader.end - pos >= HEADER_SIZE:  # a whole ack header is buffered: take it here
                        reader.pos = pos + HEADER_SIZE
                        handler(self, HEADER.unpack_from(reader.buf, pos))
                        if t._state:
                            break
                        continue
                if t._state:
                    break
                if not seconds:  # the send phase: one look that does not wait (the ack is often there already)
                    if poll(0):  # (cheaper than a recv that raises BlockingIOError)
                        reader.fill_nowait()
                        continue
                    break
                if deadline:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    ready = poll(min(CALLER_SLICE_MS, left * 1000.0))
                else:  # the first slice: spin a little (no wake-up latency when the ack comes soon), then sleep
                    deadline = time.monotonic() + seconds
                    ready = None
                    if self.spin:
                        end = perf_counter() + SPIN_S
                        while not ready and perf_counter() < end:
                            sched_yield()  # the peer may share this core: let it run (returns at once if not)
                            ready = poll(0)
                        self.spin = bool(ready)  # keep spinning on this lane while its acks come back within it
                        waited = 0.0
                    else:
                        waited = perf_counter()
                    if not ready:
                        ready = poll(CALLER_SLICE_MS)
                    if waited and SPIN_S and ready and perf_counter() - waited < SPIN_S:
                        self.spin = True  # an ack came back within the spin again
                if ready:
                    if ready[0][1] & select.POLLNVAL:
                        raise PeerGone("socket closed")
                    reader.fill_nowait()
        except (OSError, ValueError, PeerGone) as exc:
            self.link.failed(exc, self)
        except Exception as exc:  # noqa: BLE001 - a protocol violation or a bug: drop the link, say why
            self.link.engine._log(f"dropped the link to {self.link.peer}: {type(exc).__name__}: {exc}")
            self.link.failed(exc, self)
        finally:
            try:
                if ep is not None and self.sock.fileno() >= 0:
                    ep.modify(fd, select.EPOLLIN)
                    if handover or reader.end > reader.pos:  # bytes in the buffer: epoll cannot see them
                        os.eventfd_write(self._kick, 1)
            except (OSError, ValueError):
                pass
            self.token.release()
        return True

    def _reap_native(self, t: Any, seconds: float) -> bool:
        """`_reap`'s reading of acks with the waits in C (`_tcp_native.wait_ack`, GIL released): spin up to
        `WORKBENCH_TCP_SPIN_US` on the first slice, then `poll` in slices of `CALLER_SLICE_MS` until `t` is done or
        `seconds` passed (0: one look that does not wait). True when a message other than an ack is next."""
        reader, handler, wait = self.reader, self.link.engine._on_message, _native.wait_ack
        buf, fd = reader.buf, self._fd
        slice_ns = CALLER_SLICE_MS * 1_000_000 if seconds else 0
        spin_ns = int(SPIN_S * 1e9) if seconds and self.spin else 0
        t0 = perf_counter()
        deadline = t0 + seconds
        first = bool(seconds and SPIN_S)  # no data seen yet in this wait: the spin's verdict is still open
        while True:
            if t._state:  # done by another route (the receiver thread read the ack first, a timeout, a failure)
                return False
            code, pos, reader.end, _ = wait(fd, buf, reader.pos, reader.end, slice_ns, spin_ns)
            reader.pos = pos
            if first and code:  # the first data since the wait began: keep spinning while it comes within the spin
                self.spin = perf_counter() - t0 < SPIN_S
                first = False
            spin_ns = 0
            if code == 1:  # W_ACK: a whole ack header at pos
                reader.pos = pos + HEADER_SIZE
                handler(self, HEADER.unpack_from(buf, pos))
                continue
            if code == 2:  # W_OTHER: the receiver thread's
                return True
            if code == 3:  # W_EOF
                raise PeerGone("connection closed by peer")
            if first:  # a slice passed with nothing: no ack within the spin
                self.spin = False
                first = False
            if t._state or not seconds or perf_counter() >= deadline:
                return False

    def close(self) -> None:
        self.queue.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Link:
    """A connection to one peer engine: control lane + data lanes."""

    def __init__(self, engine: LinkOwner, peer: str, address: dict[str, Any], socks: list[socket.socket]) -> None:
        self.engine = engine
        self.peer = peer
        self.address = address
        self.lanes = [Lane(self, i, s) for i, s in enumerate(socks)]
        self.ctrl = self.lanes[0]
        self.data = self.lanes[1:]
        self.alive = True
        self._lock = threading.Lock()
        self._next = 0
        self.partial: dict[int, int] = {}  # receiver: tid -> shards landed (sharded writes with imm)

    def start(self) -> None:
        for lane in self.lanes:
            lane.start()

    def next_lane(self) -> int:
        with self._lock:
            i = self._next
            self._next = (i + 1) % len(self.data)
            return i

    def failed(self, exc: BaseException, lane: Lane | None = None) -> None:
        with self._lock:
            if not self.alive:
                return
            self.alive = False
        where = f" (lane {lane.index})" if lane is not None else ""
        self.engine._link_down(self, PeerGone(f"peer {self.peer!r} is gone{where}: {exc}"))
        self.close(send_bye=False)

    def closed_by_peer(self) -> None:
        with self._lock:
            if not self.alive:
                return
            self.alive = False
        self.engine._link_down(self, PeerGone(f"peer {self.peer!r} closed its engine"))
        self.close(send_bye=False)

    def close(self, send_bye: bool = True) -> None:
        if send_bye:
            with self._lock:
                was = self.alive
                self.alive = False
            if was:
                for lane in self.lanes:
                    if lane._native is not None:
                        lane._native.share()  # its C receiver loop sends nothing more on the socket
                    try:
                        lane.sock.settimeout(1.0)
                        lane.send_now([pack(BYE)])
                    except OSError:
                        pass
        for lane in self.lanes:
            lane.close()


def connect_link(engine: Any, address: dict[str, Any], lanes: int, secret: bytes, hello: dict[str, Any],
                 sockbuf: int | None, timeout: float) -> tuple[list[socket.socket], dict[str, Any]]:
    """Open and authenticate `lanes + 1` sockets to `address` within `timeout` seconds in all;
    return them and the peer's hello (`socket.timeout` when the time ran out)."""
    socks: list[socket.socket] = []
    peer_hello: dict[str, Any] = {}
    conn = os.urandom(8).hex()
    deadline = time.monotonic() + timeout
    try:
        for i in range(lanes + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"connecting took longer than {timeout} s")
            s = socket.create_connection((address["host"], address["port"]), timeout=left)
            socks.append(s)
            tune(s, sockbuf)
            peer_hello = client_handshake(s, secret, dict(hello, lane=i, lanes=lanes, conn=conn),
                                          max(0.001, deadline - time.monotonic()))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, peer_hello


class Listener:
    """Accepts connections, authenticates them, groups sockets of one connection into a `Link`."""

    def __init__(self, engine: LinkOwner, host: str, port: int, secret: bytes, sockbuf: int | None,
                 on_link: Callable[[list[socket.socket], dict[str, Any]], None]) -> None:
        self.engine = engine
        self.secret = secret
        self.sockbuf = sockbuf
        self.on_link = on_link
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self._partial: dict[str, tuple[float, dict[int, socket.socket]]] = {}
        self._unauthenticated: dict[socket.socket, float] = {}  # in handshake: socket -> accept time
        self.dropped = 0  # unauthenticated connections dropped over the cap
        self._lock = threading.Lock()
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name=f"wbt-{engine.name}-accept", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._unauthenticated[s] = time.monotonic()
                evict = []
                while len(self._unauthenticated) > MAX_PENDING_HANDSHAKES:
                    oldest = next(iter(self._unauthenticated))
                    del self._unauthenticated[oldest]
                    evict.append(oldest)
                    self.dropped += 1
            for old in evict:
                try:
                    old.shutdown(socket.SHUT_RDWR)  # its handshake thread fails at once and closes it
                except OSError:
                    pass
            threading.Thread(target=self._handshake, args=(s,), daemon=True).start()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"pending_handshakes": len(self._unauthenticated), "dropped_unauthenticated": self.dropped}

    def _handshake(self, s: socket.socket) -> None:
        try:
            tune(s, self.sockbuf)
            hello = server_handshake(s, self.secret, self.engine._hello())
            conn, lane, lanes = str(hello["conn"]), int(hello["lane"]), int(hello["lanes"])
            if not 0 <= lane <= lanes <= 64:
                raise ValueError(f"bad lane {lane} of {lanes}")
        except Exception as exc:  # noqa: BLE001 - whatever a stranger sends, reject it and go on
            with self._lock:
                self._unauthenticated.pop(s, None)
            self.engine._log(f"rejected a connection: {exc}")
            s.close()
            return
        with self._lock:
            self._unauthenticated.pop(s, None)
        with self._lock:
            now = time.monotonic()
            for key in [k for k, (t0, _) in self._partial.items() if now - t0 > 60]:
                for old in self._partial.pop(key)[1].values():
                    old.close()
            _, got = self._partial.setdefault(conn, (now, {}))
            got[lane] = s
            if len(got) < lanes + 1:
                return
            del self._partial[conn]
        self.on_link([got[i] for i in range(lanes + 1)], hello)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            for _, got in self._partial.values():
                for s in got.values():
                    s.close()
            self._partial.clear()
            for s in self._unauthenticated:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._unauthenticated.clear()
