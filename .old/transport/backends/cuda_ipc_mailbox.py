"""Immediates through GPU-visible memory: a receiver's mailbox of rings in shared host memory.

The receiving engine creates one file in `/dev/shm` holding `RINGS` rings and names it in the
descriptors of its CUDA regions. A writer claims one ring the first time it sends that receiver
an immediate (under `flock`, once), maps the file and registers it with CUDA (pinned, mapped,
portable), so a GPU can store into it. Per write with an immediate the writer reserves the next
sequence number on the host and, on the copy's own stream right after the copy, a one-thread
kernel stores the entry (imm, region), fences (system scope) and then stores the sequence
number. The receiver's watcher thread reads the sequence words with plain loads (no CUDA call,
no socket) and counts each immediate once; the bytes of that write landed before its entry.

Ring layout (little-endian u64 words): a 16-word header — owner pid (0: free), generation,
consumed (written by the receiver: every entry below it was counted), posted (written by the
writer: entries reserved) and the writer's engine name at bytes 64..127 — then `ENTRIES`
entries of two words: `imm | region << 32`, and `position + 1` once the entry is valid. A
writer never runs more than `ENTRIES` ahead of `consumed`; a full ring, a receiver without a
mailbox or a failed claim sends the immediate over the control socket instead.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHM_DIR = Path("/dev/shm")
PREFIX = "wbt-mbox-"
NAME_RE = re.compile(r"wbt-mbox-(\d{1,10})-[0-9a-f]{8}")
RINGS = 64
ENTRIES = 1024
HEADER_WORDS = 16
RING_WORDS = HEADER_WORDS + 2 * ENTRIES
FILE_BYTES = -(-RINGS * RING_WORDS * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
OWNER, GENERATION, CONSUMED, POSTED = 0, 1, 2, 3
NAME_BYTES = 64
SPIN_S = 0.0005  # after an arrival, poll without sleeping this long
FAST_S = 50e-6  # then sleep this long between polls while writes are posted or recently seen
IDLE_S = 0.0005  # and this long once idle for IDLE_AFTER_S
IDLE_AFTER_S = 0.05
EMPTY_S = 0.005  # and this long while no writer holds a ring
STUCK_S = 1.0  # an entry missing this long from a writer whose process is gone is given up


class MailboxError(OSError):
    """The mailbox cannot be created, opened or claimed (the caller falls back to the control socket)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(directory: Path = SHM_DIR) -> int:
    """Unlink mailboxes whose creating process is gone (a receiver killed before its close)."""
    gone = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        m = NAME_RE.fullmatch(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(directory / name)
                gone += 1
            except OSError:
                pass
    return gone


def _table(mm: mmap.mmap) -> np.ndarray:
    return np.frombuffer(mm, np.uint64, RINGS * RING_WORDS).reshape(RINGS, RING_WORDS)


class _RingState:
    __slots__ = ("gen", "next", "taken", "peer", "since")

    def __init__(self, gen: int, peer: str) -> None:
        self.gen, self.next, self.peer = gen, 0, peer
        self.taken: set[int] = set()
        self.since: float | None = None  # when an entry was first seen missing


class Mailbox:
    """The receiver's side: creates the file, polls every claimed ring, calls `on_imm(imm, region, peer)`."""

    def __init__(self, on_imm: Callable[[int, int, str], Any], log: Callable[[str], Any] | None = None,
                 directory: Path = SHM_DIR, thread_name: str = "wbt-mbox", watch: bool = True) -> None:
        sweep_stale(directory)
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = directory / self.name
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise MailboxError(f"cannot create the imm mailbox {self.path}: {exc}") from exc
        try:
            os.ftruncate(fd, FILE_BYTES)
            self._mm = mmap.mmap(fd, FILE_BYTES)
        except OSError as exc:
            os.close(fd)
            os.unlink(self.path)
            raise MailboxError(f"cannot map the imm mailbox {self.path}: {exc}") from exc
        os.close(fd)
        self.table = _table(self._mm)
        self.on_imm = on_imm
        self.log = log or (lambda _s: None)
        self.counted = 0
        self._rings: dict[int, _RingState] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        if watch:
            self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
            self._thread.start()

    def poll(self) -> tuple[int, bool]:
        """Count the entries that landed; (how many, whether any reserved entry is still missing).

        A ring its writer released (owner 0: it synchronised its streams first, so every entry it will
        ever store is stored) is scanned once more and then marked consumed up to `posted`, which frees
        it for the next writer; so is the ring of a writer that died with entries missing."""
        table = self.table
        active = np.flatnonzero(table[:, OWNER] | (table[:, POSTED] ^ table[:, CONSUMED]))
        if not active.size:
            if self._rings:
                self._rings.clear()
            return 0, False
        found, waiting = 0, False
        now = time.monotonic()
        for r in active.tolist():
            row = table[r]
            owner = int(row[OWNER])  # read first: once it reads 0, every entry is in place
            gen = int(row[GENERATION])
            st = self._rings.get(r)
            if st is None or st.gen != gen:
                raw = row[HEADER_WORDS - NAME_BYTES // 8:HEADER_WORDS].tobytes()
                st = self._rings[r] = _RingState(gen, raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
            posted = int(row[POSTED])
            nxt = st.next
            missing = False
            taken = st.taken
            for p in range(nxt, min(posted, nxt + ENTRIES)):
                if p in taken:
                    continue
                at = HEADER_WORDS + 2 * (p % ENTRIES)
                if int(row[at + 1]) != p + 1:
                    missing = True
                    continue
                word = int(row[at])
                taken.add(p)
                found += 1
                try:
                    self.on_imm(word & 0xFFFFFFFF, word >> 32, st.peer)
                except Exception as exc:  # noqa: BLE001 - one bad callback must not stop the watcher
                    self.log(f"imm mailbox: callback failed: {exc}")
            while nxt in taken:
                taken.discard(nxt)
                nxt += 1
            if missing:
                if st.since is None:
                    st.since = now
                elif now - st.since > STUCK_S and owner and not _alive(owner):
                    owner = 0  # its writer died before storing them: they never come
            else:
                st.since = None
            if not owner and posted > nxt:  # released (or dead): nothing more will land
                taken.clear()
                nxt, missing = posted, False
            if nxt != st.next:
                st.next = nxt
                if int(row[GENERATION]) == gen:
                    row[CONSUMED] = nxt
            waiting = waiting or missing
        for r in [r for r in self._rings if not table[r, OWNER] and table[r, POSTED] == table[r, CONSUMED]]:
            del self._rings[r]
        self.counted += found
        return found, waiting

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._closed:
            try:
                found, waiting = self.poll()
            except Exception as exc:  # noqa: BLE001
                self.log(f"imm mailbox: poll failed: {exc}")
                found, waiting = 0, False
                time.sleep(0.01)
            now = time.perf_counter()
            if found:
                last = now
            quiet = now - last
            if not self._rings:  # no writer has claimed a ring: nothing can arrive soon
                time.sleep(EMPTY_S)
            elif quiet < SPIN_S or (waiting and quiet < IDLE_AFTER_S):
                time.sleep(0)
            elif quiet < IDLE_AFTER_S or waiting:
                time.sleep(FAST_S)
            else:
                time.sleep(IDLE_S)

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._thread.join(5)
        del self.table
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Outbox:
    """The writer's side: one claimed ring of a receiver's mailbox (opened by its `name` from a descriptor)."""

    def __init__(self, name: str, writer: str, directory: Path = SHM_DIR) -> None:
        if not NAME_RE.fullmatch(name):
            raise MailboxError(f"not an imm mailbox name: {name[:60]!r}")
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise MailboxError(f"cannot open the imm mailbox {path}: {exc}") from exc
        try:
            if os.fstat(fd).st_size < FILE_BYTES:
                raise MailboxError(f"the imm mailbox {path} is shorter than {FILE_BYTES} bytes")
            self._mm = mmap.mmap(fd, FILE_BYTES)
            self.table = _table(self._mm)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self.ring = self._claim(writer)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        self.name = name
        self.row = self.table[self.ring]
        self.gen = int(self.row[GENERATION])
        self.posted = 0
        self.lock = threading.Lock()
        self.address = int(self.table.ctypes.data)  # host address of the whole file (the kernel's target)
        self.nbytes = FILE_BYTES

    def _claim(self, writer: str) -> int:
        pid = os.getpid()
        name = writer.encode()[:NAME_BYTES - 1].ljust(NAME_BYTES, b"\0")
        for r in range(RINGS):
            row = self.table[r]
            owner = int(row[OWNER])
            if owner and _alive(owner):
                continue
            if not owner and int(row[CONSUMED]) < int(row[POSTED]):
                continue  # released, but the receiver has not counted all of it yet
            row[OWNER] = 0
            row[HEADER_WORDS:] = 0
            row[CONSUMED] = 0
            row[POSTED] = 0
            row[HEADER_WORDS - NAME_BYTES // 8:HEADER_WORDS] = np.frombuffer(name, np.uint64)
            row[GENERATION] = int(row[GENERATION]) + 1
            row[OWNER] = pid
            return r
        raise MailboxError(f"every ring of the imm mailbox is taken ({RINGS} live writers)")

    def reserve(self) -> tuple[int, int] | None:
        """(host address of the next entry, its sequence value), or None when the ring is full."""
        with self.lock:
            p = self.posted
            if p - int(self.row[CONSUMED]) >= ENTRIES:
                return None
            self.posted = p + 1
            self.row[POSTED] = p + 1
        byte = (self.ring * RING_WORDS + HEADER_WORDS + 2 * (p % ENTRIES)) * 8
        return self.address + byte, p + 1

    def write_host(self, address: int, word: int, seq: int) -> None:
        """Store a reserved entry from the host (after the copy completed): the fallback when no kernel
        can post it, and what the CPU tests use."""
        w = (address - self.address) // 8
        flat = self.table.reshape(-1)
        flat[w] = word
        flat[w + 1] = seq

    def close(self) -> None:
        """Give the ring back (if it is still ours) and unmap."""
        try:
            if int(self.row[OWNER]) == os.getpid() and int(self.row[GENERATION]) == self.gen:
                self.row[OWNER] = 0
        except (ValueError, TypeError):
            pass
        del self.row, self.table
        try:
            self._mm.close()
        except BufferError:
            pass


def pack(imm: int, region: int) -> int:
    """An entry's first word."""
    return (imm & 0xFFFFFFFF) | (region & 0xFFFFFFFF) << 32
