"""A serving worker process: one engine (colocated, prefill or decode) driven over a pipe.

The front end sends requests; the worker runs steps while it has work and sends back each
step's new tokens and its statistics. A prefill worker hands every finished prompt's KV pages
to the decode worker through `transport`: after each layer of the step that completes a
prompt, one paged WRITE of that layer's pages with the request's immediate; the decode
worker admits the sequence once `counter.total(imm)` reaches the number of layers — it never
depends on message order.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any

from workbench.serve.worker_spec import ROLES, WorkerSpec, num_pages, rank_device  # noqa: F401 (ROLES: old path)


def main(conn: Any, spec: WorkerSpec) -> None:
    """Entry point of the worker process."""
    try:
        _Worker(conn, spec).run()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except BaseException:  # noqa: BLE001 - report the cause to the front end, then die
        try:
            conn.send(("fatal", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        raise


class SchedStat:
    """This thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) and run-queue wait so far (Linux
    `/proc/thread-self/schedstat`'s second field, read with one `pread` of a descriptor kept open; its first field,
    the CPU time, is only brought up to date at the scheduler's ticks for a running thread): a step's `t_cpu` and
    `t_runq` say how much of it ran on a core and how long it waited for one (another process on the same cores).
    `read()` is None where the kernel does not tell."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = None

    def read(self) -> tuple[int, int] | None:
        if self.fd is None:
            return None
        try:
            a = os.pread(self.fd, 96, 0).split()
            return time.thread_time_ns(), int(a[1])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def warm_up(engine: Any) -> None:
    """Run a few steps on scratch sequences before taking requests, as serving engines do (vLLM's profile and
    warm-up runs): a fresh worker's first forward loads its kernels and libraries on first use — measured on one
    H200, 407-425 ms for the first step of a 1.2 B Llama whose steps then take 15-30 ms — and without this the
    first requests after a start pay it in their time to first token. Two prompts (one prefill step of two
    chunks), then two decode steps; every page is freed after."""
    from workbench.serve.engine import Seq
    from workbench.serve.sampling import SamplingParams

    n = max(1, min(16, engine.capacity // 4, engine.cfg.max_batched_tokens // 2))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    seqs = [Seq(f"__warm_up_{i}", [1 + (j * 7 + i) % 200 for j in range(max(1, n - 11 * i))], params) for i in range(2)]
    for seq in seqs:
        engine.add(seq)
    for _ in range(16):
        if not engine.has_work:
            break
        engine.step()
    for seq in seqs:
        engine.abort(seq.id)
        if seq.pages:               # a prefill worker keeps a finished prompt's pages for its hand-off
            engine.alloc.release(seq.pages)
            seq.pages = []
    engine.last_batch, engine.last_step, engine.last_admitted = (0, 0), {}, []
    engine.preemptions = 0


class _Worker:
    def __init__(self, conn: Any, spec: WorkerSpec) -> None:
        import torch

        from workbench.serve.engine import Engine, EngineConfig
        from workbench.serve.kv import KVCache
        from workbench.serve.model import Model

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.conn, self.spec = conn, spec
        dtype = getattr(torch, spec.dtype)
        if spec.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(spec.device))
        self.followers: list[Any] = []
        if spec.tp > 1:
            if spec.role != "colocated":
                raise RuntimeError("tensor parallelism is served colocated here (tp with prefill/decode workers: not yet)")
            self.followers = _start_tp(spec)
        model: Any
        if spec.pp > 1:
            if spec.role != "colocated" or spec.tp > 1:
                raise RuntimeError("pipeline stages are served colocated and without tp here (not yet combined)")
            from workbench.serve.pipeline import PipelineModel

            model = PipelineModel(spec, dtype)
        else:
            model = Model.load(spec.model, device=spec.device, dtype=dtype, tp_rank=0, tp_size=spec.tp)
        pages = num_pages(spec, model)
        kv = KVCache(model.cfg, pages, spec.page_size, dtype=dtype, device=spec.device, kv_heads=model.num_kv_heads,
                     layers=len(model.layers))
        c = model.cfg
        self.engine = Engine(model, EngineConfig(pages, spec.page_size, spec.max_batched_tokens, spec.max_seqs,
                                                 spec.role), kv)
        graphs, capture_s = 0, 0.0
        if spec.tp == 1 and spec.pp == 1:
            if spec.cuda_graph and spec.device.startswith("cuda"):
                graphs = self.engine.use_cuda_graphs(pieces=spec.piece_graphs)
                capture_s = self.engine.capture_seconds
            warm_up(self.engine)
        self.lock = threading.Lock()
        self.tx: Any = None
        self.region: Any = None
        self.peer: Any = None            # prefill: the decode worker's KV descriptor
        self.peer_layer_bytes = 0
        self.reservations: list[tuple[str, int]] = []   # decode: (rid, n_tokens) waiting for pages
        self.reserved: dict[str, tuple[list[int], int]] = {}
        self.draining: list[tuple[int, list[int], float]] = []   # decode: (imm, pages, deadline) of aborted requests
        self.next_imm = 1
        self.sending: dict[str, dict[str, Any]] = {}     # prefill: rid -> transfers in flight
        self.done_tx: list[str] = []
        info: dict[str, Any] = {"pid": os.getpid(), "pages": pages, "page_size": spec.page_size,
                                "cuda_graphs": graphs, "graph_capture_s": capture_s,
                                "page_bytes": kv.page_bytes, "layer_bytes": kv.layer_bytes,
                                "kv_bytes": kv.nbytes, "capacity": self.engine.capacity,
                                "max_position": c.max_position, "layers": c.num_layers}
        if spec.role in ("prefill", "decode"):
            from transport import Engine as Transport

            self.tx = Transport(spec.transport, lanes=spec.lanes, host=spec.transport_host, name=spec.name)
            self.region = self.tx.register(kv.data)
            info["descriptor"] = self.region.descriptor.to_bytes()
        if spec.role == "prefill":
            self.engine.on_layer = self._send_layer
        self.last_bcast = time.time()
        if spec.tp > 1:
            self.engine.on_batch = lambda items: self._bcast(("step", items))
        conn.send(("ready", info))

    def _bcast(self, msg: tuple[Any, ...]) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([msg], src=0)
        self.last_bcast = time.time()

    # ----- the loop -----
    def run(self) -> None:
        # seconds the loop spent since the last step on messages (`g_admit`: requests in, aborts), on sending
        # the last step's outputs to the front end (`g_send`) and on the rest (`g_house`); logged with the next
        # step, so a step's period (its start to the next one's) splits into its phases and these
        gap = {"g_admit": 0.0, "g_send": 0.0, "g_house": 0.0}
        sched = SchedStat()
        try:
            while True:
                busy = self.engine.has_work or self.reservations or self.draining
                if self.followers and not busy and time.time() - self.last_bcast > 5:
                    self._bcast(("ping",))   # idle: tell the other TP ranks the leader lives
                if self.conn.poll(0 if busy else 0.05):
                    a = time.perf_counter()
                    msg = self.conn.recv()
                    if msg[0] == "stop":
                        return
                    self._handle(msg)
                    if msg[0] == "abort" and not self.engine.has_work:
                        self.conn.send(("stats", self.engine.stats()))   # the gauges drop to idle now
                    gap["g_admit"] += time.perf_counter() - a
                    continue
                a = time.perf_counter()
                self._release_sent()
                self._grant_reservations()
                self._expire_pending()
                gap["g_house"] += time.perf_counter() - a
                if self.engine.has_work:
                    c0 = sched.read()
                    t0, m0 = time.time(), time.monotonic()
                    outs = self.engine.step()
                    t1 = time.time()
                    c1 = sched.read()
                    if self.engine.last_batch[0] or outs:
                        stats = self.engine.stats()
                        stats.update(self.engine.last_step, **gap, t0=t0, t1=t1)
                        if c0 is not None and c1 is not None:   # the step on a core, and waiting for one
                            stats.update(t_cpu=(c1[0] - c0[0]) * 1e-9, t_runq=(c1[1] - c0[1]) * 1e-9)
                        if self.engine.last_admitted:   # when each new request reached the engine (wall clock)
                            stats["admitted"] = [(sid, t0 - (m0 - arr)) for sid, arr in self.engine.last_admitted]
                        a = time.perf_counter()
                        self.conn.send(("out", outs, stats))
                        gap = {"g_admit": 0.0, "g_send": time.perf_counter() - a, "g_house": 0.0}
                    elif self.engine.pending_kv:
                        time.sleep(0.0005)
        finally:
            sched.close()
            if hasattr(self.engine.model, "close"):
                self.engine.model.close()
            if self.followers:
                try:
                    self._bcast(("stop",))
                except Exception:  # noqa: BLE001
                    pass
                for f in self.followers:
                    try:
                        f.wait(10)
                    except Exception:  # noqa: BLE001
                        f.kill()
                        f.wait(5)
            if self.tx is not None:
                self.tx.close()

    def _handle(self, msg: tuple[Any, ...]) -> None:
        from workbench.serve.engine import Seq

        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params, dst = msg
            seq = Seq(rid, list(prompt), params)
            if dst is not None:
                seq.meta["dst"] = dst
            self.engine.add(seq)
        elif kind == "abort":
            rid = msg[1]
            held = self.engine.seqs.get(rid)
            if held is not None and held in self.engine.pending_kv:
                # pages a prefill worker may still be writing: free them only once every layer landed
                self.draining.append((held.meta["imm"], held.pages, time.time() + self.spec.kv_timeout))
                held.pages = []
            self.engine.abort(rid)
            if rid in self.reserved:
                pages, imm = self.reserved.pop(rid)
                self.draining.append((imm, pages, time.time() + self.spec.kv_timeout))
            self.reservations = [r for r in self.reservations if r[0] != rid]
        elif kind == "reserve":
            self.reservations.append((msg[1], msg[2]))
        elif kind == "start":
            _, rid, prompt, first, params = msg
            if rid not in self.reserved:
                return
            pages, imm = self.reserved.pop(rid)
            layers = self.engine.model.cfg.num_layers
            counter = self.tx.counter
            seq = Seq(rid, list(prompt), params, out=[first], pages=pages, computed=len(prompt))
            seq.ready = lambda: counter.total(imm) >= layers
            seq.meta["deadline"] = time.time() + self.spec.kv_timeout
            seq.meta["imm"] = imm
            self.engine.add(seq)
        elif kind == "peer":
            from transport import MemoryDescriptor

            self.peer = MemoryDescriptor.from_bytes(msg[1])
            self.peer_layer_bytes = msg[2]

    # ----- decode side -----
    def _grant_reservations(self) -> None:
        if self.draining:
            layers, now, keep = self.engine.model.cfg.num_layers, time.time(), []
            for imm, pages, deadline in self.draining:
                if self.tx.counter.total(imm) >= layers or now > deadline:
                    self.engine.alloc.release(pages)
                else:
                    keep.append((imm, pages, deadline))
            self.draining = keep
        while self.reservations:
            rid, n = self.reservations[0]
            got = self.engine.reserve(n)
            if got is None:
                return
            pages = got
            self.reservations.pop(0)
            imm = self.next_imm
            self.next_imm = self.next_imm % 0xFFFF_FFF0 + 1
            self.reserved[rid] = (pages, imm)
            self.conn.send(("reserved", rid, pages, imm))

    def _expire_pending(self) -> None:
        now = time.time()
        for seq in list(self.engine.pending_kv):
            if now > seq.meta.get("deadline", now + 1):
                self.engine.abort(seq.id)
                self.conn.send(("error", seq.id, f"KV pages of the prompt did not arrive within "
                                                 f"{self.spec.kv_timeout:g} s (prefill worker gone?)"))

    # ----- prefill side -----
    def _send_layer(self, layer: int, seqs: list[Any]) -> None:
        if self.peer is None:
            raise RuntimeError("prefill worker has no decode peer yet")
        kv = self.engine.kv
        for seq in seqs:
            dst = seq.meta.get("dst")
            if dst is None:
                continue
            dst_pages, imm = dst
            n = -(-len(seq.prompt) // kv.page_size)
            st = self.sending.setdefault(seq.id, {"left": kv.num_layers, "t0": time.time(), "bytes": 0,
                                                  "pages": seq.pages, "error": None, "writes": []})
            st["bytes"] += n * kv.page_bytes
            t_sub = time.time()
            self.tx.write_paged(self.region, self.peer, page_bytes=kv.page_bytes, src_pages=seq.pages[:n],
                                dst_pages=dst_pages[:n], src_offset=layer * kv.layer_bytes,
                                dst_offset=layer * self.peer_layer_bytes, imm=imm, timeout=self.spec.kv_timeout,
                                callback=lambda t, rid=seq.id, t_sub=t_sub, nb=n * kv.page_bytes:
                                self._sent(rid, t, t_sub, nb))

    def _sent(self, rid: str, transfer: Any, t_sub: float, nbytes: int) -> None:
        with self.lock:
            st = self.sending.get(rid)
            if st is None:
                return
            st["writes"].append((nbytes, time.time() - t_sub))   # one layer's paged write: submit → done
            exc = transfer.exception() if hasattr(transfer, "exception") else None
            if exc is not None:
                st["error"] = repr(exc)
            st["left"] -= 1
            if st["left"] == 0:
                st["t1"] = time.time()
                self.done_tx.append(rid)

    def _release_sent(self) -> None:
        with self.lock:
            done, self.done_tx = self.done_tx, []
            items = [(rid, self.sending.pop(rid)) for rid in done]
        for rid, st in items:
            self.engine.alloc.release(st["pages"])
            self.conn.send(("kv", rid, st["bytes"], st["t0"], st["t1"], st["error"], st["writes"]))


# ----- tensor parallelism: rank 0 runs the engine, the other ranks replay its batches -----
def _init_tp(spec: WorkerSpec, rank: int, port: int) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dev = rank_device(spec, rank)
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=spec.tp, timeout=timedelta(seconds=60),
                            device_id=torch.device(dev) if dev.startswith("cuda") else None)


def _start_tp(spec: WorkerSpec) -> list[Any]:
    """Start ranks 1.. as plain subprocesses (a worker is a daemonic process: it may not fork
    multiprocessing children) and join them in one process group."""
    import json
    import socket
    import subprocess
    import sys
    from dataclasses import asdict

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys, json; from workbench.serve.worker import follower_main; follower_main(*json.loads(sys.argv[1]))"
    followers = [subprocess.Popen([sys.executable, "-c", code, json.dumps([asdict(spec), r, port])])
                 for r in range(1, spec.tp)]
    _init_tp(spec, 0, port)
    return followers


def follower_main(spec: dict[str, Any], rank: int, port: int) -> None:
    _follower(WorkerSpec(**spec), rank, port)


def _follower(spec: WorkerSpec, rank: int, port: int) -> None:
    """A tensor-parallel rank > 0: its shard of the weights and KV heads; runs every batch rank 0 sends."""
    import torch
    import torch.distributed as dist

    from workbench.serve.kv import KVCache
    from workbench.serve.model import Batch, Model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    _init_tp(spec, rank, port)
    dev = rank_device(spec, rank)
    dtype = getattr(torch, spec.dtype)
    model = Model.load(spec.model, device=dev, dtype=dtype, tp_rank=rank, tp_size=spec.tp)
    kv = KVCache(model.cfg, num_pages(spec, model), spec.page_size, dtype=dtype, device=dev,
                 kv_heads=model.num_kv_heads)
    try:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            msg = box[0]
            if msg[0] == "stop":
                return
            if msg[0] == "step":
                model.forward(Batch.build(msg[1], spec.page_size, device=dev, merge_pairs=model.merge_pairs), kv)
    finally:
        dist.destroy_process_group()
