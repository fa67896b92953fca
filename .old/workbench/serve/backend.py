"""The front end's side of the workers: start them, route requests, stream tokens back.

`Backend` starts one colocated worker, or a prefill and a decode worker (disaggregated), as
separate processes, and turns their messages into per-request asyncio streams. A worker that
dies fails every request it holds with a message naming it and its exit code; the backend
stays up and says so in `health()`. Statistics for `/metrics` and the live stream are kept
here: per-step batch sizes, KV occupancy per worker, KV transfers per link.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench.serve.sampling import SamplingParams
from workbench.serve.worker import WorkerSpec


class Overloaded(Exception):
    """Too many requests in flight: the server answers 429."""


class WorkerDied(Exception):
    """A worker process died while holding the request: the server answers 503 naming it."""


@dataclass(frozen=True)
class Event:
    tokens: tuple[int, ...] = ()
    finish: str | None = None
    error: str | None = None


@dataclass
class _Req:
    rid: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Event]
    workers: tuple[str, ...]
    t0: float = field(default_factory=time.time)
    done: bool = False
    t_first: float | None = None     # when the first token reached the front end (the reader thread)


class _Proc:
    def __init__(self, spec: WorkerSpec, ctx: Any) -> None:
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_entry, args=(child, spec), name=f"workbench-serve-{spec.name}", daemon=True)
        self.info: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.dead: str | None = None
        self.send_lock = threading.Lock()
        self.proc.start()
        child.close()

    def send(self, msg: tuple[Any, ...]) -> None:
        if self.dead:
            raise WorkerDied(self.dead)
        with self.send_lock:
            try:
                self.conn.send(msg)
            except (OSError, BrokenPipeError) as exc:
                raise WorkerDied(f"worker {self.spec.name!r} is gone ({exc})") from None


def _entry(conn: Any, spec: WorkerSpec) -> None:
    if spec.netns:  # an emulated host: join its network namespace before any socket exists
        import ctypes

        fd = os.open(f"/run/netns/{spec.netns}", os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {spec.netns!r}")
        os.close(fd)
    os.environ.update(spec.env)
    if spec.transport == "nixl":
        # The nixl agent runs in a child process, which a daemonic process may not start. Only this
        # process's own view changes: the backend still stops (and at exit terminates) the worker.
        mp.current_process().daemon = False
    from workbench.serve.worker import main

    main(conn, spec)


class Backend:
    """Workers behind one interface: `await`-able token streams per request.

    mode: `colocated` (one worker) or `disaggregated` (prefill + decode workers, KV pages over
    `transport`). `prefill`/`decode` override fields of the decode/prefill worker specs
    (e.g. devices `cuda:0`/`cuda:1`, `transport="cuda_ipc"`).
    """

    def __init__(self, model: str, mode: str = "colocated", *, max_inflight: int = 256,
                 start_timeout: float = 120.0, prefill: dict[str, Any] | None = None,
                 decode: dict[str, Any] | None = None, **spec: Any) -> None:
        if mode not in ("colocated", "disaggregated"):
            raise WorkbenchError(f"mode: {mode!r} is not one of colocated, disaggregated")
        self.model, self.mode, self.max_inflight = model, mode, max_inflight
        base = WorkerSpec(model=model, **spec)
        if mode == "colocated":
            self.specs = [replace(base, name="worker-0", role="colocated")]
        else:
            self.specs = [replace(base, name="prefill-0", role="prefill", **(prefill or {})),
                          replace(base, name="decode-0", role="decode", **(decode or {}))]
        self.start_timeout = start_timeout
        self.procs: dict[str, _Proc] = {}
        self.reqs: dict[str, _Req] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.t_start = time.time()
        self.steps: deque[dict[str, Any]] = deque(maxlen=100_000)   # per-step stats rows (worker, t0, t1, batch)
        self.transfers: deque[dict[str, Any]] = deque(maxlen=100_000)  # KV transfers (bytes, t0, t1)
        # per request, where its time to first token went: submitted to a worker, reached its engine, first token
        # back (seconds since t_start), and its first step's start and end
        self.request_log: deque[dict[str, Any]] = deque(maxlen=100_000)
        self._admitted: dict[str, tuple[float, float, float]] = {}
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "preemptions": 0}
        self.kv_expected = 0   # prompts handed to the prefill worker with decode pages to write
        self.finished: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # ----- lifecycle -----
    def start(self) -> Backend:
        os.environ.setdefault("WORKBENCH_TRANSPORT_SECRET", secrets.token_hex(16))
        ctx = mp.get_context("spawn")
        for spec in self.specs:
            self.procs[spec.name] = _Proc(spec, ctx)
        deadline = time.time() + self.start_timeout
        for p in self.procs.values():
            while not p.conn.poll(0.1):
                if not p.proc.is_alive():
                    self.stop()
                    raise WorkbenchError(f"serve: worker {p.spec.name!r} exited with code {p.proc.exitcode} "
                                         f"while loading {p.spec.model!r}")
                if time.time() > deadline:
                    self.stop()
                    raise WorkbenchError(f"serve: worker {p.spec.name!r} did not start within {self.start_timeout:g} s")
            msg = p.conn.recv()
            if msg[0] != "ready":
                self.stop()
                raise WorkbenchError(f"serve: worker {p.spec.name!r} failed to start:\n{msg[1]}")
            p.info = msg[1]
        if self.mode == "disaggregated":
            dec = self.procs["decode-0"]
            self.procs["prefill-0"].send(("peer", dec.info["descriptor"], dec.info["layer_bytes"]))
        for p in self.procs.values():
            t = threading.Thread(target=self._reader, args=(p,), name=f"serve-reader-{p.spec.name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping = True
        for p in self.procs.values():
            try:
                if not p.dead:
                    p.conn.send(("stop",))
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs.values():
            p.proc.join(5)
            if p.proc.is_alive():
                p.proc.kill()
                p.proc.join(5)
            p.conn.close()

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until every KV transfer handed to the prefill worker is logged in `transfers`.

        The decoder starts on the immediate count, so a request can finish before the prefill
        worker has seen its own write acknowledged; call this before reading `transfers` as complete.
        """
        end = time.time() + timeout
        while len(self.transfers) < self.kv_expected and time.time() < end:
            if any(p.dead for p in self.procs.values()):
                return False
            time.sleep(0.01)
        return len(self.transfers) >= self.kv_expected

    def __enter__(self) -> Backend:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----- facts -----
    @property
    def context_length(self) -> int:
        caps = [min(p.info.get("capacity", 0), p.info.get("max_position", 0)) for p in self.procs.values()]
        return min(caps) if caps else 0

    def health(self) -> tuple[bool, str]:
        dead = [p.dead for p in self.procs.values() if p.dead]
        return (not dead, "; ".join(dead) if dead else "ok")

    def stats(self) -> dict[str, Any]:
        """Gauges for /metrics: requests running and waiting, KV usage (the fullest worker)."""
        with self.lock:
            inflight = len(self.reqs)
        running = sum(p.stats.get("running", 0) for p in self.procs.values())
        usage = max((p.stats.get("kv_used_pages", 0) / max(1, p.stats.get("kv_pages", 1))
                     for p in self.procs.values()), default=0.0)
        return {"num_requests_running": running, "num_requests_waiting": max(0, inflight - running),
                "kv_cache_usage_perc": usage, **self.counters}

    # ----- requests -----
    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Admit a request now (raises `Overloaded` or `WorkerDied` at once) and return its events
        as they come: tokens, then one with `finish` (or `error`). Call from the event loop and
        iterate the result: closing it early aborts the request and frees its pages."""
        ok, why = self.health()
        if not ok:
            raise WorkerDied(why)
        loop = asyncio.get_running_loop()
        with self.lock:
            if len(self.reqs) >= self.max_inflight:
                raise Overloaded(f"{len(self.reqs)} requests in flight (the bound is {self.max_inflight})")
            rid = f"r{next(self.ids)}"
            workers = tuple(self.procs)
            req = _Req(rid, list(prompt), params, loop, asyncio.Queue(), workers)
            self.reqs[rid] = req
            self.counters["prompt_tokens"] += len(prompt)
        try:
            self._submit(req)
        except WorkerDied:
            self._close(rid, abort=True)
            raise
        return self._events(req)

    def _submit(self, req: _Req) -> None:
        rid = req.rid
        if self.mode == "colocated":
            self.procs["worker-0"].send(("add", rid, req.prompt, req.params, None))
        elif req.params.max_tokens == 1:
            self.procs["prefill-0"].send(("add", rid, req.prompt, req.params, None))
        else:
            self.procs["decode-0"].send(("reserve", rid, len(req.prompt)))

    async def _events(self, req: _Req) -> AsyncIterator[Event]:
        rid = req.rid
        try:
            while True:
                ev = await req.queue.get()
                yield ev
                if ev.finish is not None or ev.error is not None:
                    return
        finally:
            self._close(rid, abort=True)

    def _close(self, rid: str, abort: bool) -> None:
        with self.lock:
            req = self.reqs.pop(rid, None)
        self._admitted.pop(rid, None)
        if req is None:
            return
        if abort and not req.done:
            for name in req.workers:
                p = self.procs[name]
                if not p.dead:
                    try:
                        p.send(("abort", rid))
                    except WorkerDied:
                        pass

    def _push(self, rid: str, ev: Event) -> None:
        with self.lock:
            req = self.reqs.get(rid)
        if req is None:
            return
        if ev.tokens and req.t_first is None:
            req.t_first = time.time()
        if ev.finish is not None or ev.error is not None:
            req.done = True
            t_add, s0, s1 = self._admitted.pop(rid, (float("nan"),) * 3)
            self.request_log.append({"rid": rid, "t_submit": req.t0 - self.t_start, "t_engine": t_add,
                                     "step_t0": s0, "step_t1": s1, "prompt_tokens": len(req.prompt),
                                     "t_first": (req.t_first or float("nan")) - self.t_start,
                                     "t_end": time.time() - self.t_start, "error": ev.error})
            if ev.finish is not None:
                self.finished[ev.finish] = self.finished.get(ev.finish, 0) + 1
        if ev.tokens:
            self.counters["generation_tokens"] += len(ev.tokens)
        req.loop.call_soon_threadsafe(req.queue.put_nowait, ev)

    # ----- worker messages -----
    def _reader(self, p: _Proc) -> None:
        name = p.spec.name
        while True:
            try:
                msg = p.conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._dispatch(p, msg)
            except WorkerDied as exc:
                self._fail_all(str(exc), worker=None)
            except Exception as exc:  # noqa: BLE001 - a bad message must not stop the reader
                import sys

                print(f"workbench.serve: message {msg[0]!r} from {name!r} failed: {exc!r}", file=sys.stderr)
        if self._stopping:
            return
        p.proc.join(2)
        cause = p.stats.get("fatal") or ""
        p.dead = (f"worker {name!r} (pid {p.proc.pid}) died with exit code {p.proc.exitcode}"
                  + (f": {cause.strip().splitlines()[-1]}" if cause else ""))
        self._fail_all(p.dead, worker=name)

    def _fail_all(self, why: str, worker: str | None) -> None:
        with self.lock:
            victims = [r.rid for r in self.reqs.values() if worker is None or worker in r.workers]
        for rid in victims:
            self._push(rid, Event(error=why))

    def _dispatch(self, p: _Proc, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "out":
            _, outs, stats = msg
            self.counters["preemptions"] += stats.get("preemptions", 0) - p.stats.get("preemptions", 0)
            p.stats.update(stats)
            self.steps.append({"worker": p.spec.name, "t0": stats["t0"] - self.t_start, "t1": stats["t1"] - self.t_start,
                               "batch_seqs": stats["batch_seqs"], "batch_tokens": stats["batch_tokens"],
                               "kv_bytes_used": stats["kv_bytes_used"], "running": stats["running"],
                               "waiting": stats["waiting"],
                               # the step's composition and phase seconds (Engine.last_step, the worker loop's gap)
                               **{k: v for k, v in stats.items() if k.startswith(("t_", "g_", "prefill_", "decode_"))
                                  or k == "sampled"}})
            for sid, t_add in stats.get("admitted", ()):
                self._admitted[sid] = (t_add - self.t_start, stats["t0"] - self.t_start, stats["t1"] - self.t_start)
            for o in outs:
                if o.finish == "prefilled":
                    with self.lock:
                        req = self.reqs.get(o.id)
                    if req is None:
                        continue
                    self._push(o.id, Event(o.tokens))
                    self.procs["decode-0"].send(("start", o.id, req.prompt, o.tokens[0], req.params))
                else:
                    self._push(o.id, Event(o.tokens, o.finish))
                    if p.spec.role == "prefill" and o.finish is not None:
                        self.procs["decode-0"].send(("abort", o.id))
        elif kind == "reserved":
            _, rid, pages, imm = msg
            with self.lock:
                req = self.reqs.get(rid)
            if req is None:
                p.send(("abort", rid))
                return
            self.kv_expected += 1
            self.procs["prefill-0"].send(("add", rid, req.prompt, req.params, (pages, imm)))
        elif kind == "kv":
            _, rid, nbytes, t0, t1, err, writes = msg
            self.transfers.append({"rid": rid, "bytes": nbytes, "t0": t0 - self.t_start, "t1": t1 - self.t_start,
                                   "link": f"{p.spec.name}->decode-0", "error": err, "writes": writes})
            if err:
                self._push(rid, Event(error=f"KV transfer failed: {err}"))
        elif kind == "stats":
            p.stats.update(msg[1])
        elif kind == "error":
            self._push(msg[1], Event(error=msg[2]))
        elif kind == "fatal":
            p.stats["fatal"] = msg[1]
