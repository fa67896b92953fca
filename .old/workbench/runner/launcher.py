"""Launch the ranks of a real run with torchrun semantics, collect their telemetry live, build the Result.

`start_train` starts `world = dp × tp × pp` processes of `python -m workbench.runner.worker`
with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set (locally by default; in
network namespaces with `hosts=`), listens on a TCP socket for their telemetry batches and
turns them into `Update`s on the returned handle while they run. If a rank fails (error,
exit, signal) or stops making progress, the others are stopped within seconds and `wait()`
raises `RunFailed` naming that rank, with the partial `Result` attached.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.core.stream import RunHandle, Update
from workbench.errors import RunFailed, WorkbenchError
from workbench.models.spec import ModelSpec
from workbench.options import parse_options
from workbench.result import (
    EVENT_COLUMNS,
    LINK_COLUMNS,
    MEMORY_COLUMNS,
    Result,
    events_frame,
    links_frame,
    memory_frame,
)
from workbench.runner.gpt import GPTConfig, gpt_config

PLAN_KEYS = ("dp", "tp", "pp", "mbs", "gbs", "zero")
_SECONDARY = re.compile(r"connection|closed|reset|broken pipe|timed out|timeout|peer|gloo|nccl", re.I)


# ------------------------------------------------------------------ job description
def plan_dict(plan: Any, world: int | None = None) -> dict[str, int]:
    """{dp, tp, pp, mbs, gbs, zero} from a spec string `dp=2,tp=1,pp=1,mbs=2,gbs=8`, a dict or a plan object."""
    vals: dict[str, int] = {}
    if plan is None:
        vals = {"dp": world or 1}
    elif isinstance(plan, str):
        for k, v in parse_options(plan, "plan", "dp=2").items():
            if k not in PLAN_KEYS:
                if k in ("ep", "cp", "recompute", "precision", "schedule", "vpp"):
                    continue  # options of the simulator's plan that this workload does not use
                raise WorkbenchError(f"plan.{k}: unknown option (the run uses {', '.join(PLAN_KEYS)})")
            if not re.fullmatch(r"\d+", v):
                raise WorkbenchError(f"plan.{k}: expected a whole number, got {v!r}")
            vals[k] = int(v)
    else:
        get = plan.get if isinstance(plan, dict) else (lambda n, _p=plan: getattr(_p, n, None))
        for k, names in (("dp", ("dp",)), ("tp", ("tp",)), ("pp", ("pp",)), ("mbs", ("mbs", "micro_batch")),
                         ("gbs", ("gbs", "global_batch")), ("zero", ("zero", "zero_stage"))):
            for n in names:
                got = get(n)
                if got is not None:
                    vals[k] = int(got)
                    break
    p = {"dp": 1, "tp": 1, "pp": 1, "zero": 0} | vals
    p.setdefault("mbs", 2)
    p.setdefault("gbs", p["dp"] * p["mbs"] * max(2, p["pp"]))
    for k in ("dp", "tp", "pp", "mbs", "gbs"):
        if p[k] < 1:
            raise WorkbenchError(f"plan.{k}: must be at least 1, got {p[k]}")
    if p["gbs"] % (p["dp"] * p["mbs"]):
        raise WorkbenchError(f"plan.gbs: {p['gbs']} must be a multiple of dp*mbs = {p['dp'] * p['mbs']}")
    return p


def runnable_plan(job: Any) -> Any:
    """The job's plan completed with what its engine does, or an error naming a field it cannot do."""
    if getattr(job.workload, "engine", "megatron") == "native":
        return native_plan(job)
    return megatron_plan(job)


def native_plan(job: Any) -> Any:
    """The plan the native engine runs: dp (FSDP2 / ZeRO 0-3), tp (+sp), pp (+vpp), recompute, bf16/fp32.

    Defaults: precision bf16 on GPUs (fp32 on CPU ranks), sp with tp > 1, zero=1 with dp > 1
    (FSDP2 keeping gathered parameters until backward: ZeRO-2's traffic), recompute none.
    """
    from workbench.plan.spec import Plan

    pl, wl, m = job.plan, job.workload, job.model
    for name, value, ok in (("cp", pl.cp, (None, 1)), ("ep", pl.ep, (None, 1)), ("offload", pl.offload, (None, False)),
                            ("precision", pl.precision, (None, "bf16", "fp32"))):
        if value not in ok:
            raise WorkbenchError(f"plan.{name}: the native engine cannot do {name}={value} (it supports "
                                 f"{[v for v in ok if v is not None]}); simulate it instead")
    from workbench.runner.llama import check_spec

    check_spec(m)
    p = plan_dict(pl.to_dict())
    tp, pp, dp = p["tp"], p["pp"], p["dp"]
    vpp = int(pl.vpp or 1)
    if m.is_moe and tp > 1:
        raise WorkbenchError("plan.tp: the native engine shards dense layers only; MoE models run with tp=1")
    for what, n in (("heads", m.heads), ("kv_heads", m.kv_heads), ("ffn", m.ffn)):
        if n % tp:
            raise WorkbenchError(f"plan.tp: {tp} must divide model.{what}={n}")
    if pp * vpp > m.layers:
        raise WorkbenchError(f"plan.pp: pp × vpp = {pp * vpp} chunks need at least as many layers (model.layers={m.layers})")
    micro = p["gbs"] // (dp * p["mbs"])
    if vpp > 1 and (pp < 2 or micro % pp):
        raise WorkbenchError(f"plan.gbs: the interleaved schedule needs pp ≥ 2 and micro-batches per step "
                             f"(gbs/(dp·mbs) = {micro}) a multiple of pp={pp}")
    precision = pl.precision or ("bf16" if wl.backend == "nccl" else "fp32")
    zero = p["zero"] if pl.zero is not None else (1 if dp > 1 else 0)
    sp = bool(pl.sp) if pl.sp is not None else tp > 1
    return Plan(tp=tp, pp=pp, dp=dp, ep=1, cp=1, sp=sp and tp > 1, vpp=vpp, zero=zero,
                recompute=pl.recompute or "none", mbs=p["mbs"], gbs=p["gbs"], precision=precision, offload=False)


def megatron_plan(job: Any) -> Any:
    """The plan of the hand-written engine: fp32 GPT blocks with TP (no sequence parallelism), a GPipe
    pipeline and DP with ZeRO-0/1; nothing is dropped silently.
    """
    from workbench.plan.spec import Plan

    pl, wl = job.plan, job.workload
    unsupported = {"cp": (pl.cp, (None, 1)), "ep": (pl.ep, (None, 1)), "vpp": (pl.vpp, (None, 1)),
                   "recompute": (pl.recompute, (None, "none")), "precision": (pl.precision, (None, "fp32")),
                   "offload": (pl.offload, (None, False)), "zero": (pl.zero, (None, 0, 1))}
    for name, (value, ok) in unsupported.items():
        if value not in ok:
            raise WorkbenchError(f"plan.{name}: the hand-written (megatron) engine cannot do {name}={value} "
                                 f"(it supports {name} in {[v for v in ok if v is not None]}); use engine=native")
    if pl.sp and (pl.tp or 1) > 1:
        raise WorkbenchError("plan.sp: the hand-written (megatron) engine does TP without sequence parallelism "
                             "(use sp=0, or engine=native)")
    m = job.model
    if m.gated or m.kv_heads != m.heads or m.experts or m.is_mla:
        raise WorkbenchError(f"model: the hand-written (megatron) engine builds plain GPT blocks; {m.name} is "
                             "gated/GQA/MoE/MLA (use engine=native)")
    p = plan_dict(pl.to_dict())
    c = gpt_config(m)
    if c.heads % p["tp"] or c.ffn_size % p["tp"]:
        raise WorkbenchError(f"plan.tp: {p['tp']} must divide model.heads={c.heads} and the FFN size {c.ffn_size}")
    if p["pp"] > c.layers:
        raise WorkbenchError(f"plan.pp: {p['pp']} stages need at least as many layers (model.layers={c.layers})")
    if wl.backend == "nccl" and (pl.precision or "fp32") != "fp32":
        raise WorkbenchError("plan.precision: the hand-written (megatron) engine computes in fp32")
    return Plan(tp=p["tp"], pp=p["pp"], dp=p["dp"], ep=1, cp=1, sp=False, vpp=1, zero=p["zero"], recompute="none",
                mbs=p["mbs"], gbs=p["gbs"], precision="fp32", offload=False)


def worker_job(job: Any) -> dict[str, Any]:
    """The wire form of a training Job for the rank processes (JSON: model, plan, workload fields)."""
    plan = runnable_plan(job)
    wl = job.workload
    common = {"steps": int(wl.steps), "backend": wl.backend, "optimizer": wl.optimizer, "lr": float(wl.lr),
              "seed": int(wl.seed), "telemetry": wl.telemetry, "job": job.to_dict()}
    if getattr(wl, "engine", "megatron") == "native":
        p = {k: getattr(plan, k) for k in (*PLAN_KEYS, "vpp", "sp", "recompute", "precision")}
        return {"engine": "native", "model": asdict(job.model), "plan": p, "compile": bool(wl.compile),
                "corpus": wl.corpus, "checkpoint_dir": wl.checkpoint_dir, "export_dir": wl.export_dir} | common
    c = gpt_config(job.model)
    p = {k: int(getattr(plan, k)) for k in PLAN_KEYS}
    return {"engine": "megatron", "model": asdict(c), "plan": p} | common


def resolve_job(model: Any, plan: Any, world: int | None, steps: int, backend: str, optimizer: str = "adamw",
                lr: float = 1e-3, seed: int = 0, telemetry: bool | str = True) -> dict[str, Any]:
    """The wire form from loose arguments (the worker's own command line, and plain `torchrun` runs)."""
    c = gpt_config(model)
    p = plan_dict(plan, world)
    if c.heads % p["tp"] or c.ffn_size % p["tp"]:
        raise WorkbenchError(f"plan.tp: {p['tp']} must divide model.heads={c.heads} and the FFN size {c.ffn_size}")
    if p["pp"] > c.layers:
        raise WorkbenchError(f"plan.pp: {p['pp']} stages need at least as many layers (model.layers={c.layers})")
    if backend not in ("gloo", "nccl"):
        raise WorkbenchError(f"backend: {backend!r} is not gloo or nccl")
    if steps < 1:
        raise WorkbenchError(f"steps: must be at least 1, got {steps}")
    return {"model": asdict(c), "plan": p, "steps": int(steps), "backend": backend, "optimizer": optimizer,
            "lr": float(lr), "seed": int(seed), "telemetry": telemetry if telemetry == "ab" else bool(telemetry)}


# ------------------------------------------------------------------ telemetry → Result rows
def wire_bytes(op: str, nbytes: float, n: int) -> float:
    """Bytes each rank sends for `op` (the one collective algebra of `workbench.core.ops`)."""
    from workbench.core.ops import wire_bytes as _wire

    return _wire(op, nbytes, n)


class Aggregator:
    """Turns rank messages into Result rows; `update()` returns the rows new since the last call."""

    def __init__(self, job: dict[str, Any], cluster: Any, t0_wall: float) -> None:
        from workbench.runner.parallel import Layout

        self.job, self.cluster, self.t0 = job, cluster, t0_wall
        p = job["plan"]
        self.world = p["dp"] * p["tp"] * p["pp"]
        self.layouts = [Layout(p["dp"], p["tp"], p["pp"], r) for r in range(self.world)]
        gpus = list(cluster.gpus) if cluster is not None else []
        self.devices = [gpus[r] if r < len(gpus) else f"rank{r}" for r in range(self.world)]
        self.offset: dict[int, float] = {}
        self.events: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self.links: list[dict[str, Any]] = []
        self.steps: dict[int, dict[int, dict[str, Any]]] = {}
        self.hosts: dict[int, str] = {}
        self.done: set[int] = set()
        self.errors: dict[int, dict[str, Any]] = {}
        self.info: dict[int, dict[str, Any]] = {}
        self.last_seen: dict[int, float] = {}
        self._mark = (0, 0, 0)
        self._link_cache: dict[tuple[int, str, int], tuple[str, ...]] = {}
        self._cap: dict[str, float] = {}
        if cluster is not None:
            self._cap = {lk.name: lk.GBps for lk in cluster.graph.links}

    # ----- ingest -----
    def ingest(self, msg: dict[str, Any]) -> None:
        r = int(msg.get("rank", -1))
        kind = msg.get("type")
        self.last_seen[r] = time.time()
        if kind == "hello":
            self.offset[r] = float(msg["wall"]) - float(msg["perf"]) - self.t0
            self.hosts[r] = str(msg.get("host", ""))
        elif kind == "batch":
            off = self.offset.get(r, 0.0)
            for k, op, nb, group, peer, s, e, step, flops in msg.get("events", ()):
                links = self._links(r, group, peer)
                row = {"rank": r, "device": self.devices[r] if r < self.world else f"rank{r}", "kind": k, "op": op,
                       "bytes": nb, "links": links, "start": s + off, "end": e + off, "group": group,
                       "step": step, "flops": flops, "peer": peer,
                       "stage": self.layouts[r].p if 0 <= r < self.world else -1}
                self.events.append(row)
                if k != "compute" and links and e > s:
                    n = len(self.layouts[r].tp_ranks(0, 0)) if group == "tp" else (
                        self.job["plan"]["dp"] if group == "dp" else 2)
                    gbps = wire_bytes(op, nb, n) / (e - s) / 1e9
                    for lk in links:
                        cap = self._cap.get(lk) or float("nan")
                        self.links.append({"link": lk, "start": s + off, "end": e + off, "GBps": gbps,
                                           "utilisation": gbps / cap, "rank": r, "op": op})
            mem = msg.get("memory")
            if mem:
                t = float(mem[0]) + off
                for cat, b in mem[1].items():
                    self.memory.append({"rank": r, "category": cat, "bytes": int(b), "time": t})
            for st in msg.get("steps", ()):
                self.steps.setdefault(int(st["step"]), {})[r] = {
                    "start": st["start"] + off, "end": st["end"] + off, "loss": st["loss"], "cost_s": st["cost_s"],
                    "telemetry": st.get("telemetry", True)}
        elif kind == "info":
            self.info[r] = msg
        elif kind == "done":
            self.done.add(r)
        elif kind == "error":
            self.errors.setdefault(r, msg)

    def _links(self, rank: int, group: str, peer: int) -> tuple[str, ...]:
        if not group or self.cluster is None:
            return ()
        key = (rank, group, peer)
        if key not in self._link_cache:
            lay = self.layouts[rank]
            peers = [peer] if group == "pp" else (
                lay.tp_ranks(lay.d, lay.p) if group == "tp" else lay.dp_ranks(lay.p, lay.t))
            names: list[str] = []
            for q in peers:
                if q == rank or q < 0 or q >= self.world or self.devices[q].startswith("rank"):
                    continue
                try:
                    path = self.cluster.path(self.devices[rank], self.devices[q])
                except Exception:  # noqa: BLE001 - a device the cluster cannot route: no link ids
                    continue
                for lk in path.links:
                    if lk.name not in names:
                        names.append(lk.name)
            self._link_cache[key] = tuple(names)
        return self._link_cache[key]

    # ----- views -----
    @property
    def steps_done(self) -> int:
        """Steps that every rank has finished."""
        n = 0
        while len(self.steps.get(n, {})) == self.world:
            n += 1
        return n

    def rank_progress(self) -> dict[int, int]:
        return {r: sum(1 for s in self.steps.values() if r in s) for r in range(self.world)}

    def update(self, t: float) -> Update:
        """The rows since the last call (cheap: ~20 of these a second run beside the ranks)."""
        e0, m0, l0 = self._mark
        self._mark = (len(self.events), len(self.memory), len(self.links))
        steps = self.job["steps"]
        done = self.steps_done
        return Update(_rows(self.events[e0:], _EVENT_COLS), _rows(self.memory[m0:], _MEMORY_COLS),
                      _rows(self.links[l0:], _LINK_COLS), done, steps, done / steps, t)

    def result(self, updates: int = 0, duration: float = 0.0) -> Result:
        job, p = self.job, self.job["plan"]
        native = job.get("engine") == "native"
        c: Any = ModelSpec(**job["model"]) if native else GPTConfig(**job["model"])
        losses, times, costs, on = [], [], [], []
        last_stage = [r for r, lay in enumerate(self.layouts) if lay.p == p["pp"] - 1 and lay.t == 0]
        for s in sorted(self.steps):
            recs = self.steps[s]
            if len(recs) < self.world:
                break
            ls = [recs[r]["loss"] for r in last_stage if recs[r]["loss"] is not None]
            losses.append(sum(ls) / len(ls) if ls else None)
            dt = max(v["end"] for v in recs.values()) - min(v["start"] for v in recs.values())
            times.append(dt)
            on.append(all(v["telemetry"] for v in recs.values()))
            costs.append(max(v["cost_s"] for v in recs.values()) / dt * 100 if dt > 0 else 0.0)
        step_s = statistics.median(times) if times else float("nan")
        tokens = p["gbs"] * c.seq
        job_obj = self.job_object()
        # model FLOPs per step (the simulator's count, workbench.models.costs) over the step time, per GPU
        from workbench.models.costs import model_flops_per_token, parameter_count

        if job_obj is not None or native:
            flops_step = model_flops_per_token(job_obj.model if job_obj is not None else c) * tokens
        else:
            flops_step = 3 * (c.layers * c.layer_flops(tokens) + c.head_flops(tokens))
        tflops = flops_step / step_s / self.world / 1e12 if times else float("nan")
        precision = str(p.get("precision") or "fp32")
        try:
            peak = float(self.cluster.gpu_spec(self.devices[0]).peak(precision))
        except Exception:  # noqa: BLE001 - no cluster or no fp32 rate: no MFU
            peak = float("nan")
        metrics: dict[str, Any] = {
            "steps": len(losses), "losses": losses, "step_seconds": step_s, "step_seconds_all": times,
            "tokens_per_s": tokens / step_s if times else float("nan"),
            "tflops_per_gpu": tflops, "mfu": tflops / peak if peak > 0 else float("nan"),  # peak in TFLOP/s
            "events": len(self.events), "updates": updates,
            "updates_per_s": updates / duration if duration > 0 else 0.0,
            "telemetry": job["telemetry"], "telemetry_cost_pct": statistics.median(costs) if costs else float("nan"),
            "telemetry_overhead_pct": _ab_overhead(times, on),
            "ranks": self.world, "backend": job["backend"],
            "p2p": sorted({str(i.get("p2p")) for i in self.info.values()}) if self.info else None, "plan": p,
            "engine": job.get("engine", "megatron"),
            "model": c.name if native else c.as_spec(),
            "params": parameter_count(c).total if native else c.params(), "devices": self.devices, "hosts": self.hosts,
            "cluster": getattr(self.cluster, "name", None), "wall_seconds": duration,
        }
        return Result(events_frame(self.events), memory_frame(self.memory), links_frame(self.links), metrics,
                      source="run", fidelity="measured", job=job_obj)

    def job_object(self) -> Any:
        """The `Job` this run executed (None for a plain `torchrun` without one)."""
        from workbench.core.job import Job

        d = self.job.get("job")
        if not d:
            return None
        if self.cluster is not None:
            from dataclasses import replace

            return replace(Job.from_dict(d), cluster=self.cluster)
        return Job.from_dict(d)


_EVENT_COLS = (*EVENT_COLUMNS, "group", "step", "flops", "peer", "stage")
_MEMORY_COLS = MEMORY_COLUMNS
_LINK_COLS = (*LINK_COLUMNS, "rank", "op")


def _rows(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    """A Result-schema frame of `rows` (whose keys are `columns`), built without re-validating."""
    return pd.DataFrame.from_records(rows, columns=list(columns)) if rows else pd.DataFrame(columns=list(columns))


def _ab_overhead(times: list[float], on: list[bool]) -> float | None:
    """Telemetry overhead in percent from interleaved steps: the median over recording steps of
    (step / mean of its two silent neighbours) − 1, so slow drift in the machine's load cancels.
    Steps 0 and 1 (warm-up) are left out."""
    ratios = [times[i] / ((times[i - 1] + times[i + 1]) / 2) for i in range(3, len(times) - 1)
              if on[i] and not on[i - 1] and not on[i + 1]]
    if not ratios:
        return None
    return (statistics.median(ratios) - 1.0) * 100


# ------------------------------------------------------------------ the launcher
class TrainHandle(RunHandle):
    """A `RunHandle` for a launched training job; also knows its ranks' processes."""

    def __init__(self, steps: int) -> None:
        super().__init__(steps)
        self.pids: dict[int, int] = {}
        self.log_dir = ""

    def kill_rank(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to a rank (failure drills and tests)."""
        os.kill(self.pids[rank], sig)

    _abort: Any = None  # the launcher's synchronous stop, set when it starts

    def wait(self, timeout: float | None = None) -> Result:
        """As `RunHandle.wait`; Ctrl-C while waiting stops every rank before it propagates."""
        try:
            return super().wait(timeout)
        except KeyboardInterrupt:
            self._stop_on_interrupt()
            raise

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """As `RunHandle.updates`; Ctrl-C while iterating stops every rank before it propagates."""
        try:
            yield from super().updates(timeout)
        except KeyboardInterrupt:
            self._stop_on_interrupt()
            raise

    def _stop_on_interrupt(self) -> None:
        if self._abort is not None and not self.done:
            self._abort("interrupted")


class _Launch:
    def __init__(self, job: dict[str, Any], cluster: Any, hosts: list[str] | None, master_addr: str | None,
                 telemetry_addr: str | None, timeout: float, stall_timeout: float, env: dict[str, str] | None) -> None:
        self.job, self.cluster = job, cluster
        p = job["plan"]
        self.world = p["dp"] * p["tp"] * p["pp"]
        self.hosts, self.master_addr, self.telemetry_addr = hosts, master_addr, telemetry_addr
        self.timeout, self.stall_timeout, self.extra_env = timeout, stall_timeout, env or {}
        self.startup_timeout = 300.0  # before the first step: imports, rendezvous, building the model
        from workbench.validate import number

        number(timeout, "timeout", 0.0, 1e7, unit="seconds")
        number(stall_timeout, "stall_timeout", 0.0, 1e7, unit="seconds")
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.readers: list[threading.Thread] = []
        self.handle = TrainHandle(job["steps"])
        self.handle._cancel = self._request_cancel
        self.handle._abort = self.abort
        self._cancelled = threading.Event()
        self.t0 = time.time()
        self.agg = Aggregator(job, cluster, self.t0)

    def start(self) -> TrainHandle:
        self.log_dir = tempfile.mkdtemp(prefix="workbench-run-")
        if self.hosts and not self.telemetry_addr:  # namespaces share the filesystem: a Unix socket reaches us
            self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.server.bind(os.path.join(self.log_dir, "telemetry.sock"))
            self.server.listen(max(self.world, 8))
            address = "unix:" + os.path.join(self.log_dir, "telemetry.sock")
        else:
            self.server = socket.create_server(("0.0.0.0" if self.telemetry_addr else "127.0.0.1", 0),
                                               backlog=max(self.world, 8))
            address = f"{self.telemetry_addr or '127.0.0.1'}:{self.server.getsockname()[1]}"
        master = self.master_addr or "127.0.0.1"
        master_port = _free_port()
        self.handle.log_dir = self.log_dir
        threading.Thread(target=self._accept, daemon=True, name="workbench-accept").start()
        threads = self.job.get("threads") or max(1, (os.cpu_count() or 1) // self.world)
        job = dict(self.job, threads=threads)
        per_host = -(-self.world // len(self.hosts)) if self.hosts else self.world
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._spawn(job, master, master_port, address, threads, per_host)
        except BaseException:
            self._stop_all()
            self._close()
            _forget(self)
            raise
        threading.Thread(target=self._monitor, daemon=True, name="workbench-monitor").start()
        return self.handle

    def _spawn(self, job: dict[str, Any], master: str, master_port: int, address: str, threads: int,
               per_host: int) -> None:
        """Start every rank in its own process group, with a parent-death signal (Linux) so no rank
        outlives the launcher, even one killed with SIGKILL."""
        on_main = threading.current_thread() is threading.main_thread()
        guard = _death_signal_hook(os.getpid()) if on_main else None
        for r in range(self.world):
            env = dict(os.environ) | self.extra_env | {
                "RANK": str(r), "WORLD_SIZE": str(self.world), "LOCAL_RANK": str(r % per_host),
                "LOCAL_WORLD_SIZE": str(per_host), "MASTER_ADDR": master, "MASTER_PORT": str(master_port),
                "WORKBENCH_JOB": json.dumps(job), "WORKBENCH_TELEMETRY": address,
                "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
            cmd = [sys.executable, "-m", "workbench.runner.worker"]
            if self.hosts:
                cmd = ["ip", "netns", "exec", self.hosts[r // per_host]] + cmd
                env["WORKBENCH_HOST"] = self.hosts[r // per_host]
            log = open(os.path.join(self.log_dir, f"rank{r}.log"), "wb")  # noqa: SIM115
            try:
                self.procs[r] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True, preexec_fn=guard)
            finally:
                log.close()
            self.handle.pids[r] = self.procs[r].pid

    def abort(self, why: str = "cancelled") -> None:
        """Stop every rank now and wait for them (Ctrl-C, SIGTERM, interpreter exit); idempotent."""
        self._cancelled.set()
        self._stop_all()
        _forget(self)

    def _accept(self) -> None:
        self.server.settimeout(0.5)
        while not self.handle.done:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._read, args=(conn,), daemon=True, name="workbench-reader")
            t.start()
            self.readers.append(t)

    def _read(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for line in f:
                try:
                    self.inbox.put(json.loads(line))
                except ValueError:
                    continue

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return got
            self.agg.ingest(msg)
            got = True

    def _request_cancel(self) -> None:
        self._cancelled.set()

    def _cpu_seconds(self) -> dict[int, float]:
        """CPU time each live rank has used (Linux /proc): a rank computing a long step is busy, a hung
        one (blocked in a collective, or stopped) is not (its telemetry thread uses ~1 % of a core)."""
        used: dict[int, float] = {}
        for r, p in self.procs.items():
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                used[r] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
            except (OSError, ValueError, IndexError):
                continue
        return used

    def _monitor(self) -> None:
        last_progress, progress = time.time(), -1
        cpu_at, cpu_used = last_progress, self._cpu_seconds()
        first_fail: float | None = None
        fails: dict[int, tuple[float, str, bool]] = {}  # rank -> (seen at, reason, secondary)
        while True:
            time.sleep(0.05)
            now = time.time()
            self._drain()
            done_steps = sum(len(v) for v in self.agg.steps.values()) + len(self.agg.events)  # not memory: sent always
            if done_steps != progress:
                progress, last_progress = done_steps, now
            if now - cpu_at >= min(1.0, self.stall_timeout / 2):  # a rank using ≥ 8 % of a core is computing
                used = self._cpu_seconds()
                if any(used[r] - cpu_used.get(r, used[r]) >= 0.08 * (now - cpu_at) for r in used):
                    last_progress = now
                cpu_at, cpu_used = now, used
            for r, msg in self.agg.errors.items():
                if r not in fails:
                    err = str(msg.get("error", "error"))
                    fails[r] = (now, err, bool(_SECONDARY.search(err)))
            exited = {r: p.poll() for r, p in self.procs.items()}
            for r, rc in exited.items():
                if rc not in (None, 0) and r not in fails:
                    why = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
                    fails[r] = (now, why, rc > 0)
            if fails and first_fail is None:
                first_fail = now
            self.handle._emit(self.agg.update(now - self.t0))  # every ~50 ms, new rows or not
            if first_fail is not None and now - first_fail >= 0.5:  # grace: let the root cause show
                rank, (_, why, _) = min(fails.items(), key=lambda kv: (kv[1][2], kv[1][0]))
                self._fail(rank, why)
                return
            if self._cancelled.is_set():
                self._fail(None, "cancelled")
                return
            if all(rc == 0 for rc in exited.values()):
                self._finish()
                return
            limit = self.stall_timeout if progress > 0 else max(self.stall_timeout, self.startup_timeout)
            if now - last_progress > limit and self.agg.steps_done < self.job["steps"]:  # not while shutting down
                # the rank heard from least recently (a stopped process ships nothing), then the fewest steps
                prog = self.agg.rank_progress()
                seen = self.agg.last_seen
                slow = min(prog, key=lambda r: (seen.get(r, 0.0), prog[r], r))
                quiet = max(0.0, now - seen[slow] if slow in seen else now - self.t0)
                self._fail(slow, f"no rank finished a step for {limit:.0f} s (a hang); rank {slow} "
                                 f"finished {prog[slow]} steps and was last heard from {quiet:.1f} s ago")
                return
            if now - self.t0 > self.timeout:
                prog = self.agg.rank_progress()
                slow = min(prog, key=lambda r: (prog[r], r))
                if max(prog.values()) - prog[slow] <= 1:  # nobody is behind (a step of skew is normal): the run was slow
                    self._fail(None, f"the run exceeded its timeout of {self.timeout:g} s (every rank finished "
                                     f"{prog[slow]} of {self.job['steps']} steps); give a longer --timeout")
                else:
                    self._fail(slow, f"the run exceeded its timeout of {self.timeout:g} s "
                                     f"(rank {slow} finished {prog[slow]} of {self.job['steps']} steps, the fewest)")
                return

    def _stop_all(self) -> None:
        for p in self.procs.values():  # the whole group: a rank's own children go too
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.time() + 3
        for p in self.procs.values():
            try:
                p.wait(timeout=max(deadline - time.time(), 0.01))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait(timeout=5)

    def _close(self) -> None:
        for t in self.readers:
            t.join(timeout=2)
        self._drain()
        try:
            self.server.close()
        except OSError:
            pass

    def _fail(self, rank: int | None, why: str) -> None:
        self._stop_all()
        self._close()
        dur = time.time() - self.t0
        partial = self.agg.result(self.handle.updates_seen, dur)
        partial.metrics["failed_rank"] = rank
        log = ""
        if rank is not None:
            tb = self.agg.errors.get(rank, {}).get("traceback", "")
            try:
                log = Path(self.log_dir, f"rank{rank}.log").read_text(errors="replace")[-3000:]
            except OSError:
                log = ""
            log = (tb or "") + (("\n" + log) if log and log not in tb else "")
        err = RunFailed(rank, why, partial, log.strip()[-3000:])
        err.log_dir = self.log_dir  # type: ignore[attr-defined]
        _forget(self)
        self.handle._finish(error=err)

    def _finish(self) -> None:
        self._close()
        now = time.time()
        self.handle._emit(self.agg.update(now - self.t0))
        res = self.agg.result(self.handle.updates_seen, now - self.t0)
        _forget(self)
        if len(res.metrics["losses"]) < self.job["steps"]:
            err = RunFailed(None, f"the ranks exited after {res.metrics['steps']} of {self.job['steps']} steps", res)
            err.log_dir = self.log_dir  # type: ignore[attr-defined]
            self.handle._finish(error=err)
            return
        self.handle._finish(result=res)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_LIVE: set[_Launch] = set()
_LIVE_LOCK = threading.Lock()


def _forget(run: _Launch) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(run)


def stop_all_runs() -> None:
    """Stop the ranks of every run this process started that is still going (the CLI calls this on
    Ctrl-C/SIGTERM; it also runs at interpreter exit), waiting for them to exit."""
    with _LIVE_LOCK:
        runs = list(_LIVE)
    for run in runs:
        run.abort("the launcher is exiting")


atexit.register(stop_all_runs)


def _death_signal_hook(launcher_pid: int) -> Any:
    """A `preexec_fn` making the rank get SIGKILL when the launcher dies (Linux `PR_SET_PDEATHSIG`).

    libc is loaded here, before the fork: the child only calls `prctl`. The death signal follows the
    thread that forked, so it is used only when the ranks are started from the main thread."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # not Linux: process groups and stop_all_runs still apply
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != launcher_pid:  # the launcher died before the prctl took effect
            os._exit(1)

    return hook


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def default_cluster(world: int, backend: str) -> Any:
    """This machine (`workbench.topology.discover`), with `world` CPU ranks when the backend is gloo."""
    from workbench.topology import discover

    if backend == "nccl":
        return discover()
    c = discover(cpu_ranks=world)
    return c if not c.nodes[0].gpu_spec.is_cpu or c.num_gpus >= world else discover(cpu_ranks=world)


def start_job(job: Any, *, hosts: list[str] | None = None, master_addr: str | None = None,
              telemetry_addr: str | None = None, timeout: float = 900.0, stall_timeout: float = 120.0,
              collective_timeout_s: float = 120.0, threads: int | None = None, dump_params: str | None = None,
              p2p: str = "auto", fail_rank_at_step: tuple[int, int] | None = None,
              env: dict[str, str] | None = None) -> TrainHandle:
    """Start a training `Job` for real and return its handle at once (non-blocking).

    The job says what runs (model, plan, steps, backend, optimizer, telemetry); the keywords say
    how: `hosts`: network namespaces to spread the ranks over (`ip netns exec`; `master_addr` is
    rank 0's address there; telemetry comes back over a Unix socket); `p2p`: pipeline sends through
    the `transport` tcp engine (`auto` on CPU, `transport`) or `torch.distributed.send/recv`
    (`dist`, and always with NCCL); `stall_timeout`: no rank finishing a step for this long (after
    the first step; 300 s before it) fails the run naming the rank heard from least recently.
    Telemetry `"ab"` turns recording off and on in alternate steps, so
    `metrics["telemetry_overhead_pct"]` compares interleaved steps of one run.
    """
    from dataclasses import replace

    wire = worker_job(job)
    p = wire["plan"]
    world = p["dp"] * p["tp"] * p["pp"]
    if job.cluster.num_gpus < world:
        raise WorkbenchError(f"plan: {world} ranks need {world} devices; cluster {job.cluster.name} has "
                             f"{job.cluster.num_gpus} (give a cluster with more CPU ranks or GPUs)")
    if job.workload.backend == "nccl" and not hosts:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < world:
            raise WorkbenchError(f"backend: nccl needs {world} CUDA GPU(s) here, found "
                                 f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; use gloo")
    if hosts and os.geteuid() != 0:
        raise WorkbenchError("hosts: running ranks in network namespaces needs root (ip netns exec)")
    if p2p not in ("auto", "transport", "dist"):
        raise WorkbenchError(f"p2p: {p2p!r} is not auto, transport or dist")
    if wire["engine"] == "native" and (p2p == "transport" or dump_params):
        raise WorkbenchError(f"workload.engine: {'p2p=transport' if p2p == 'transport' else 'dump_params'} is a "
                             "feature of the hand-written engine (set engine='megatron')")
    wire["job"] = replace(job, plan=runnable_plan(job)).to_dict()
    if wire["engine"] == "native":  # tokenise the corpus once, here, rather than in every rank
        from workbench.runner import data

        corpus = data.prepare(data.corpus_files(job.workload.corpus), job.model.vocab)
        wire |= {"tokens": str(corpus.tokens), "tokenizer": str(corpus.tokenizer) if corpus.tokenizer else None,
                 "tokenizer_vocab": corpus.vocab}
    wire |= {"p2p": p2p, "collective_timeout_s": collective_timeout_s, "threads": threads, "dump_params": dump_params,
             "fail_rank_at_step": list(fail_rank_at_step) if fail_rank_at_step else None}
    return _Launch(wire, job.cluster, hosts, master_addr, telemetry_addr, timeout, stall_timeout, env).start()


def local_job(cluster: Any = None, model: Any = None, plan: Any = None, steps: int = 5, backend: str = "gloo", *,
              telemetry: bool | str = True, optimizer: str = "adamw", lr: float = 1e-3, seed: int = 0,
              **workload: Any) -> Any:
    """A training Job from loose arguments; without a cluster, this machine (`default_cluster`)."""
    from workbench.core.job import Job, Training
    from workbench.models.presets import load_model
    from workbench.topology import load_cluster

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise WorkbenchError(f"steps: must be a whole number ≥ 1, got {steps!r}")
    wl = Training(steps=steps, backend=backend, optimizer=optimizer, lr=lr, seed=seed,
                  telemetry=telemetry if telemetry == "ab" else bool(telemetry), **workload)
    mdl = load_model(model if model is not None else gpt_config(None).as_spec())
    pl = Training.parse_plan(plan)
    world = (pl.dp or 1) * (pl.tp or 1) * (pl.pp or 1)
    cl = load_cluster(cluster) if cluster is not None else default_cluster(world, backend)
    return Job(cl, mdl, pl, wl)


def start_train(cluster: Any = None, model: Any = None, plan: Any = None, steps: int = 5, backend: str = "gloo", *,
                telemetry: bool | str = True, optimizer: str = "adamw", lr: float = 1e-3, seed: int = 0,
                engine: str = "native", **options: Any) -> TrainHandle:
    """`start_job` of a training Job built from loose arguments (`local_job`): the CLI's and old callers' door.
    Workload fields (`compile`, `corpus`, `checkpoint_dir`, `export_dir`) pass through to the Training."""
    wl = {k: options.pop(k) for k in ("compile", "corpus", "checkpoint_dir", "export_dir") if k in options}
    job = local_job(cluster, model, plan, steps, backend, telemetry=telemetry, optimizer=optimizer, lr=lr, seed=seed,
                    engine=engine, **wl)
    return start_job(job, **options)


def run_train(cluster: Any = None, model: Any = None, plan: Any = None, steps: int = 5, backend: str = "gloo",
              **kwargs: Any) -> Result:
    """Run `start_train(...)` to the end and return the measured `Result` (raises `RunFailed`)."""
    return start_train(cluster, model, plan, steps, backend, **kwargs).wait()


def load_run(out_dir: str | Path, cluster: Any = None) -> Result:
    """The measured `Result` of a run launched by a plain `torchrun` (its `rank*.jsonl` files)."""
    files = sorted(Path(out_dir).glob("rank*.jsonl"))
    if not files:
        raise WorkbenchError(f"out_dir: no rank*.jsonl files in {out_dir} (pass --out to the worker)")
    msgs = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    hellos = [m for m in msgs if m.get("type") == "hello"]
    job = json.loads(Path(out_dir, "job.json").read_text()) if Path(out_dir, "job.json").exists() else None
    if job is None:
        raise WorkbenchError(f"out_dir: {out_dir}/job.json is missing (rank 0 writes it)")
    t0 = min(float(h["wall"]) for h in hellos) if hellos else 0.0
    agg = Aggregator(job, cluster, t0)
    for m in msgs:
        agg.ingest(m)
    return agg.result()
