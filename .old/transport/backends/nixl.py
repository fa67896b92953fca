"""NIXL backend (the `rdma` extra): writes move through NVIDIA NIXL (UCX here; LIBFABRIC/EFA or
UCX InfiniBand on real clusters), driven from a worker process.

Why a worker: NIXL is known to crash at interpreter exit. The agent lives in a spawned
process that the engine ends with `os._exit`, so no user ever sees that crash. Memory
that NIXL moves must be visible to the worker, so it lives in shared memory: allocate it
with `Engine.alloc(nbytes)` (or `alloc(nbytes, shm_name=...)` to adopt an existing
`multiprocessing.shared_memory` block). Other buffers (plain numpy arrays, CUDA tensors)
still work: their writes fall back to the engine's TCP lanes.

A submission (a write, a paged write, or all of one batch's writes to one peer region)
crosses the process boundary as one pipe message and becomes one NIXL WRITE transfer (one
`initialize_xfer` of all its descriptors). The worker drains every queued request per sweep,
polls its transfers to DONE and reports the finished ones together. DONE means the bytes
are in the target's memory, so the writer needs no acknowledgement; the immediate travels
as the transfer's NIXL notification (`wbt` + imm + region), which the target's worker
receives (`get_new_notifs`) and hands to its engine to count.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import multiprocessing as mp
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from transport.backends.base import DataPath, Done, EngineView, Pieces
from transport.completion import Transfer
from transport.descriptors import MemoryDescriptor
from transport.errors import BackendUnavailable, PeerGone, TransportError
from transport.memory import Region

NOTIF = struct.Struct("<4sIIQ")  # b"wbt1", imm, region, tid


def _worker(conn: Any, name: str, backends: list[str]) -> None:  # pragma: no cover - runs in the worker
    os.environ.setdefault("NIXL_LOG_LEVEL", "ERROR")
    try:
        from multiprocessing import shared_memory

        import numpy as np
        from nixl._api import nixl_agent, nixl_agent_config

        agent = nixl_agent(name, nixl_agent_config(backends=backends))
        conn.send(("md", agent.get_agent_metadata()))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        os._exit(1)
    shms: dict[str, Any] = {}
    regs: dict[int, Any] = {}
    remotes: dict[str, str] = {}
    inflight: dict[int, Any] = {}
    busy = 0.0  # when the worker last did something: poll fast for a while after that
    while True:
        try:
            now = time.monotonic()
            wait = 0.0 if inflight else (0.0002 if now - busy < 0.2 else (0.005 if regs else 0.05))
            ready = conn.poll(wait)
            while ready:
                busy = now
                op, rid, *args = conn.recv()
                try:
                    if op == "register":
                        shm_name, offset, nbytes = args
                        shm = shms.get(shm_name)
                        if shm is None:
                            # spawned children share their parent's resource tracker: the creator unlinks
                            shm = shms[shm_name] = shared_memory.SharedMemory(name=shm_name)
                        addr = int(np.frombuffer(cast(Any, shm.buf), np.uint8).ctypes.data) + offset
                        regs[addr] = agent.register_memory([(addr, nbytes, 0, "")], "DRAM")
                        # the metadata peers load names the registered memory: send it fresh
                        conn.send(("ok", rid, (addr, agent.get_agent_metadata())))
                    elif op == "deregister":
                        h = regs.pop(args[0], None)
                        if h is not None:
                            agent.deregister_memory(h)
                        conn.send(("ok", rid, None))
                    elif op == "write":
                        peer, md, pieces, notif = args
                        if remotes.get(peer) != md:  # new peer, or it registered more memory since
                            if peer in remotes:
                                agent.remove_remote_agent(peer)
                            agent.add_remote_agent(base64.b64decode(md))
                            remotes[peer] = md
                        local = agent.get_xfer_descs([(a, n, 0) for a, _, n in pieces], "DRAM")
                        remote = agent.get_xfer_descs([(b, n, 0) for _, b, n in pieces], "DRAM")
                        h = agent.initialize_xfer("WRITE", local, remote, peer, notif)
                        if agent.transfer(h) == "ERR":
                            agent.release_xfer_handle(h)
                            conn.send(("done", rid, "NIXL refused to post the transfer"))
                        else:
                            inflight[rid] = h
                    elif op == "exit":
                        conn.send(("ok", rid, None))
                        os._exit(0)  # skip NIXL's teardown (it can crash at interpreter exit)
                except Exception as exc:  # noqa: BLE001
                    conn.send(("done" if op == "write" else "error", rid, f"{type(exc).__name__}: {exc}"))
                ready = conn.poll(0)
            finished: list[tuple[int, str | None]] = []
            for rid, h in list(inflight.items()):
                st = agent.check_xfer_state(h)
                if st == "DONE":
                    agent.release_xfer_handle(h)
                    del inflight[rid]
                    finished.append((rid, None))
                elif st == "ERR":
                    del inflight[rid]
                    finished.append((rid, "NIXL transfer failed"))
            if finished:
                conn.send(("dones", 0, finished))
            if regs:
                notifs = agent.get_new_notifs()
                got = [(peer, m) for peer, msgs in notifs.items() for m in msgs if m[:4] == b"wbt1"]
                if got:
                    busy = time.monotonic()
                    conn.send(("notifs", 0, got))
            if inflight:
                time.sleep(10e-6)
        except (EOFError, OSError):
            os._exit(0)


class NixlPath(DataPath):
    """The data path of `Engine(backend="nixl")`; `backends` picks NIXL's plugins (default UCX)."""

    name = "nixl"

    def __init__(self, engine: EngineView, backends: tuple[str, ...] = ("UCX",), start_timeout: float = 60.0,
                 on_imm: Callable[[int, int, str], None] | None = None) -> None:
        if importlib.util.find_spec("nixl") is None:
            raise BackendUnavailable("the nixl backend needs NIXL: pip install 'workbench[rdma]'")
        super().__init__(engine)
        self.on_imm = on_imm  # (imm, region, peer) for each arrived notification
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, engine.name, list(backends)), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + start_timeout
        while not self.conn.poll(0.1):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.proc.kill()
                raise BackendUnavailable(f"the NIXL worker did not start (exit code {self.proc.exitcode})")
        kind, md = self.conn.recv()
        if kind != "md":
            self.proc.kill()
            raise BackendUnavailable(f"NIXL could not start: {md}")
        self.md = base64.b64encode(md).decode()
        self._ids = itertools.count(1)
        self._waiting: dict[int, Any] = {}
        self._send_lock = threading.Lock()
        self._shms: list[tuple[int, int, Any]] = []  # (base address, size, SharedMemory)
        self._own: list[Any] = []
        self.completed = 0
        self._closed = False
        self._reader = threading.Thread(target=self._read, name=f"wbt-{engine.name}-nixl", daemon=True)
        self._reader.start()

    # worker protocol ------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                kind, rid, value = self.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "dones":
                for r, err in value:
                    cb = self._waiting.pop(r, None)
                    if cb is not None:
                        cb("done", err)
                continue
            if kind == "notifs":
                for peer, msg in value:
                    try:
                        _, imm, region, _tid = NOTIF.unpack(msg)
                    except struct.error:
                        continue
                    if self.on_imm is not None:
                        self.on_imm(imm, region, peer.decode() if isinstance(peer, bytes) else str(peer))
                continue
            cb = self._waiting.pop(rid, None)
            if cb is not None:
                cb(kind, value)
        for cb in list(self._waiting.values()):
            cb("done", "the NIXL worker exited")
        self._waiting.clear()

    def _post(self, op: str, *args: Any, cb: Callable[[str, Any], None]) -> None:
        rid = next(self._ids)
        self._waiting[rid] = cb
        with self._send_lock:
            self.conn.send((op, rid, *args))

    def _call(self, op: str, *args: Any, timeout: float = 30.0) -> Any:
        ev, box = threading.Event(), []

        def cb(kind: str, value: Any) -> None:
            box.append((kind, value))
            ev.set()

        self._post(op, *args, cb=cb)
        if not ev.wait(timeout):
            raise TransportError(f"NIXL worker did not answer {op} within {timeout} s")
        kind, value = box[0]
        if kind == "error":
            raise TransportError(f"NIXL {op}: {value}")
        return value

    # memory ---------------------------------------------------------------------
    def alloc(self, nbytes: int, shm_name: str | None = None) -> Any:
        from multiprocessing import shared_memory

        import numpy as np

        shm = shared_memory.SharedMemory(name=shm_name) if shm_name else shared_memory.SharedMemory(
            create=True, size=max(nbytes, 1))
        if not shm_name:
            self._own.append(shm)
        arr = np.ndarray((nbytes,), np.uint8, buffer=shm.buf)
        self._shms.append((int(arr.ctypes.data), shm.size, shm))
        return arr

    def _shm_of(self, region: Region) -> tuple[str, int] | None:
        view = region.view
        if view is None or region.nbytes == 0:
            return None
        import numpy as np

        addr = int(np.frombuffer(view, np.uint8).ctypes.data)
        for base, size, shm in self._shms:
            if base <= addr and addr + region.nbytes <= base + size:
                return shm.name, addr - base
        return None

    def describe(self, region: Region) -> dict[str, Any]:
        found = self._shm_of(region)
        if found is None:
            return {}
        waddr, md = self._call("register", found[0], found[1], region.nbytes)
        region.extra["nixl_addr"] = waddr
        self.md = base64.b64encode(md).decode()
        return {"nixl": {"agent": self.engine.name, "addr": waddr, "md": self.md}}

    def forget(self, region: Region) -> None:
        waddr = region.extra.pop("nixl_addr", None)
        if waddr is not None and not self._closed:
            try:
                self._call("deregister", waddr)
            except TransportError:
                pass

    def handles(self, src: Region, dst: MemoryDescriptor) -> bool:
        return "nixl_addr" in src.extra and isinstance(dst.extra.get("nixl"), dict)

    @property
    def confirms_delivery(self) -> bool:
        return True

    @property
    def delivers_imm(self) -> bool:
        return True

    # data path --------------------------------------------------------------------
    def submit(self, t: Transfer, src: Region, dst: MemoryDescriptor, pieces: Pieces, done: Done,
               imm: int | None = None) -> None:
        la, rd = src.extra["nixl_addr"], dst.extra["nixl"]
        ra = int(rd["addr"])
        if len(pieces) == 1 and self.lanes > 1 and int(pieces.length[0]) >= 2 << 20:
            so, do, n = (int(v[0]) for v in (pieces.src, pieces.dst, pieces.length))
            k = -(-n // self.lanes)
            items = [(so + o, do + o, min(k, n - o)) for o in range(0, n, k)]
        else:
            items = pieces.tuples()
        t.lanes = tuple(range(min(self.lanes, len(items))))
        wire = [(la + so, ra + do, n) for so, do, n in items if n]
        notif = NOTIF.pack(b"wbt1", imm, dst.region, t.tid) if imm is not None else b""
        if not wire:  # nothing to move (zero-length writes): NIXL needs at least one byte
            done(None)
            return

        def cb(kind: str, value: Any) -> None:
            if value is None:
                self.completed += 1
                done(None)
            else:
                why = str(value)
                gone = "exited" in why or "REMOTE_DISCONNECT" in why  # our worker, or the peer's agent, went away
                done(PeerGone(f"{t.what}: {why}") if gone else TransportError(f"{t.what}: {why}"))

        if self._closed:
            done(TransportError(f"{t.what}: engine closed"))
            return
        self._post("write", str(rd["agent"]), str(rd["md"]), wire, notif, cb=cb)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call("exit", timeout=5)
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        for shm in self._own:
            try:
                shm.unlink()
            except OSError:
                pass
