"""The serving simulator: iteration-level continuous batching over a paged KV cache, request by request.

Each worker runs the loop an engine like vLLM's V1 runs (one iteration = one step):

1. requests that have arrived join the waiting queue (closed loop: a client sends its next request
   the moment its last one finishes);
2. every running sequence that has finished its prompt decodes one token; if the KV pool cannot hold
   the new tokens, the most recently admitted sequences are preempted (`recompute`: their blocks are
   freed and they re-prefill later; `swap`: their blocks go to host memory over PCIe and come back);
3. the rest of the token budget (`max_tokens`) goes to prompt chunks (at most `chunk` tokens per
   sequence per step): first the partly prefilled, then waiting requests in arrival order while
   fewer than `max_seqs` run and their blocks fit (`block` tokens per block; a shared `prefix` is
   computed and stored once with prefix caching);
4. the step's time comes from `WorkerCost` (the model's shapes on the worker's GPUs, plus the plan's host
   costs per step `scheduler_us` and per sequence `seq_us`); decoded and
   completed-prefill sequences get a token at its end.

Stretches where nothing but decoding can happen (no arrival that could be admitted, no prefill, no
block shortage) are priced as one array of steps, so long generations cost little to simulate.

Disaggregated plans run prefill workers first (prefill-only engines), move each request's KV cache
to a decode worker layer by layer (paged writes priced by `workbench.sim.p2p`, or by the plan's measured
`kv_us` and `kv_GBps`, overlapped with the prefill: only what is left after the last layer is exposed), then run the decode workers on the
arrivals that leaves. Closed-loop traffic couples the two; it is solved by iterating to a fixed point.

The Result: events (one row per step per worker: prefill/decode/mixed compute with its collectives'
share; KV transfers with their links; one `request` row per request with its latencies), memory
(KV-cache bytes per worker over time, weights, activations), links (KV transfers and the workers'
TP/EP collectives per GPU link over time), and
`vllm bench serve` metrics (see `workbench.core.metrics.SERVING`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.serving import SLO, Requests, ServingPlan, Traffic
from workbench.sim.serve_cost import WorkerCost

_NAN = float("nan")


@dataclass
class EngineRun:
    """What one worker's engine did: per request (indices into the worker's requests) and per step."""

    t_sched: np.ndarray
    t_first: np.ndarray
    t_finish: np.ndarray
    preempt: np.ndarray
    arrival: np.ndarray
    step_start: np.ndarray
    step_dt: np.ndarray
    step_prefill: np.ndarray
    step_decode: np.ndarray
    step_blocks: np.ndarray
    itl_extra: list[float] = field(default_factory=list)
    prefix_hits: int = 0
    failed: np.ndarray | None = None


def _ceil_div(a: np.ndarray | int, b: int) -> Any:
    return -(-a // b)


def run_engine(cost: WorkerCost, arrival: np.ndarray, isl: np.ndarray, osl: np.ndarray, closed: int = 0,
               prefix: int = 0, mode: str = "colocated", first_token: np.ndarray | None = None) -> EngineRun:
    """Simulate one worker's engine over its requests (arrival-ordered arrays; the loop is
    `workbench.sim.serve_kernel`).

    `closed` > 0: closed loop with that many clients (arrivals of later requests are set by finishes).
    `mode`: colocated; prefill (each request ends when its prompt is done and its first token sampled);
    decode (requests arrive with their prompt's KV already in place and their first token out at
    `first_token`). Colocated: `arrival` is when clients send; a request reaches the engine `plan.request_us`
    later (HTTP, tokenisation, the pipe to the worker and the tokens' way back, as one term), and the returned
    `arrival` is the clients' again."""
    from workbench.sim import serve_kernel as K

    plan = cost.plan
    n = len(isl)
    arr = np.ascontiguousarray(arrival, dtype=np.float64).copy()
    req_s = plan.request_us * 1e-6 if mode == "colocated" else 0.0
    arr += req_s  # closed loop: the kernel sets arrivals itself, request_us included
    osl_eff = np.ones(n, np.int64) if mode == "prefill" else np.ascontiguousarray(osl, dtype=np.int64)
    ip = np.zeros(11, np.int64)
    ip[K.I_B] = plan.block
    ip[K.I_TOTAL] = cost.memory.blocks
    ip[K.I_CHUNK] = plan.chunk or plan.max_tokens
    ip[K.I_MAX_TOKENS] = plan.max_tokens
    ip[K.I_MAX_SEQS] = plan.max_seqs
    ip[K.I_PBLOCKS] = (prefix // plan.block) if (prefix and plan.prefix_caching and mode != "decode") else 0
    ip[K.I_CHUNKED] = int(plan.chunked_prefill)
    ip[K.I_SWAP] = int(plan.preemption == "swap")
    ip[K.I_CLOSED] = closed
    ip[K.I_DECODE_MODE] = int(mode == "decode")
    ip[K.I_NO_EVICT] = int(plan.policy == "guaranteed_no_evict")
    fp = cost.kernel_params()
    fp[K.F_SWAP_S] = cost.memory.kv_bytes_per_token / max(cost.dp, 1) / _swap_Bps(cost)
    ft = np.zeros(n) if first_token is None else np.ascontiguousarray(first_token, dtype=np.float64)
    out = K.kernel()(arr, np.ascontiguousarray(isl, dtype=np.int64), osl_eff, ft, ip, fp, *cost.kernel_tables())
    t_sched, t_first, t_finish, preempt, failed, s0, sdt, spf, sdc, sbl, extra, hits = out
    return EngineRun(t_sched, t_first, t_finish, preempt, arr - req_s, s0, sdt, spf, sdc, sbl, list(extra), int(hits),
                     failed)


def _swap_Bps(cost: WorkerCost) -> float:
    from workbench.sim.serve_cost import overheads
    from workbench.topology.catalogue import node_link

    gen = cost.spec.pcie_gen or 4
    return node_link("pcie", gen)[0] * 1e9 * overheads()["swap_GBps_fraction"]
# ====================================================================== workers and the whole job
@dataclass(frozen=True)
class Worker:
    role: str  # colocated | prefill | decode
    index: int
    devices: tuple[str, ...]
    first_rank: int
    cost: WorkerCost


def workers(cluster: Any, model: Any, plan: ServingPlan) -> list[Worker]:
    """The plan's workers on the cluster's GPUs in order (disaggregated: prefill workers first)."""
    gpus = cluster.gpus
    roles: list[tuple[str, int]]
    if plan.disaggregated:
        roles = [("prefill", plan.prefill_workers), ("decode", plan.decode_workers)]
    else:
        per = plan.gpus_per_worker()
        reps = plan.replicas or max(len(gpus) // per, 1)
        roles = [("colocated", reps)]
    need = sum(plan.gpus_per_worker(r) * k for r, k in roles)
    if need > len(gpus):
        what = ", ".join(f"{k} {r} worker(s) of {plan.gpus_per_worker(r)} GPUs" for r, k in roles)
        raise WorkbenchError(f"plan.replicas: {what} need {need} GPUs; the cluster has {len(gpus)} "
                             "(lower replicas/workers or tp, or give a bigger cluster)")
    out: list[Worker] = []
    at = 0
    cache: dict[tuple[Any, ...], WorkerCost] = {}
    for role, count in roles:
        g = plan.gpus_per_worker(role)
        for j in range(count):
            devs = tuple(gpus[at:at + g])
            key = (role, tuple(cluster.gpu_spec(d).model for d in devs),
                   len({cluster.node_of(d) for d in devs}))
            cost = cache.get(key)
            if cost is None:
                cost = _worker_cost(cluster, model, plan, role, devs)
                cost.require_fit()
                cache[key] = cost
            out.append(Worker(role, j, devs, at, cost))
            at += g
    return out


_TABLES: dict[tuple[Any, ...], WorkerCost] = {}


def _worker_cost(cluster: Any, model: Any, plan: ServingPlan, role: str, devs: tuple[str, ...]) -> WorkerCost:
    """A WorkerCost; its price tables are shared by every worker with the same GPUs' shape, parallelism
    and formats (roles, devices and scheduling knobs only change its memory and labels)."""
    import copy

    from workbench.sim.serve_cost import overheads

    tp, ep = plan.worker(role)
    pp = plan.pp if role == "colocated" else 1
    sig = (tuple(cluster.gpu_spec(d).model for d in devs), len({cluster.node_of(d) for d in devs}))
    key = (id(cluster), model, sig, tp, ep, pp, plan.dp, plan.precision, plan.kv_precision, plan.cuda_graph,
           plan.scheduler_us)
    base = _TABLES.get(key)
    if base is None or base.cluster is not cluster:
        if len(_TABLES) > 256:
            _TABLES.clear()
        base = _TABLES[key] = WorkerCost(cluster, model, plan, role, list(devs))
    if base.plan == plan and base.role == role and tuple(base.devices) == devs:
        return base
    c = copy.copy(base)
    c.plan, c.role, c.devices = plan, role, list(devs)
    c.memory = c._memory(overheads()["reserve_GiB"] * (1 << 30))
    return c


@dataclass
class Outcome:
    """Per-request results of a whole job (global request order) and what each worker did."""

    req: Requests
    t_sched: np.ndarray
    t_first: np.ndarray
    t_finish: np.ndarray
    preempt: np.ndarray
    arrival: np.ndarray
    failed: np.ndarray
    worker_of: np.ndarray
    runs: list[tuple[Worker, EngineRun, np.ndarray]]  # worker, its run, its request indices
    transfers: pd.DataFrame | None = None
    prefix_hits: int = 0
    gpus: int = 0


def _split(n: int, k: int) -> list[np.ndarray]:
    return [np.arange(r, n, k) for r in range(k)]


def _closed_share(closed: int, k: int, r: int) -> int:
    return closed // k + (1 if r < closed % k else 0) if closed else 0


def simulate_requests(cluster: Any, model: Any, plan: ServingPlan, req: Requests,
                      only_first: bool = False) -> Outcome:
    """Run every worker over its share of the requests (round robin); `only_first`: colocated plans
    simulate replica 0 only (its share), for the search: replicas are identical."""
    ws = workers(cluster, model, plan)
    n = len(req)
    t_sched, t_first, t_finish = np.full(n, _NAN), np.full(n, _NAN), np.full(n, _NAN)
    preempt = np.zeros(n, np.int64)
    failed = np.zeros(n, bool)
    arrival = req.arrival.astype(float).copy()
    worker_of = np.full(n, -1, np.int64)
    runs: list[tuple[Worker, EngineRun, np.ndarray]] = []
    gpus = sum(len(w.devices) for w in ws)
    hits = 0
    # longer than the engine's max_len: rejected, as engines reject prompts over max_model_len
    too_long = (req.isl + req.osl) > plan.max_len if plan.max_len else np.zeros(n, bool)
    if not plan.disaggregated:
        failed |= too_long
        parts = _split(n, len(ws))
        for r, (w, idx) in enumerate(zip(ws, parts)):
            if only_first and r > 0:
                break
            idx = idx[~too_long[idx]]
            if not len(idx):
                continue
            er = run_engine(w.cost, req.arrival[idx], req.isl[idx], req.osl[idx],
                            _closed_share(req.closed, len(ws), r), req.prefix)
            t_sched[idx], t_first[idx], t_finish[idx] = er.t_sched, er.t_first, er.t_finish
            preempt[idx], arrival[idx], failed[idx] = er.preempt, er.arrival, er.failed  # type: ignore[assignment]
            worker_of[idx] = r
            hits += er.prefix_hits
            runs.append((w, er, idx))
        return Outcome(req, t_sched, t_first, t_finish, preempt, arrival, failed, worker_of, runs, None, hits, gpus)
    pws = [w for w in ws if w.role == "prefill"]
    dws = [w for w in ws if w.role == "decode"]
    arr = req.arrival.astype(float).copy()
    if req.closed:
        arr = _closed_guess(pws[0].cost, dws[0].cost, req)
    rounds = 6 if req.closed else 1
    out: Outcome | None = None
    req_s = plan.request_us * 1e-6  # outside the engines: the prefill worker sees a request request_us after it is sent
    for _ in range(rounds):
        out = _disaggregated(cluster, pws, dws, req, arr + req_s, gpus)
        out.arrival = arr.copy()
        if not req.closed:
            break
        fin = np.sort(out.t_finish[~np.isnan(out.t_finish)])
        new = arr.copy()
        c = min(req.closed, n)
        new[:c] = 0.0
        m = min(n - c, len(fin))
        new[c:c + m] = fin[:m]
        if np.allclose(new, arr, rtol=1e-3, atol=1e-4):
            break
        arr = new
    assert out is not None
    return out


def _closed_guess(pc: WorkerCost, dc: WorkerCost, req: Requests) -> np.ndarray:
    """First guess of closed-loop arrival times: waves of `closed` requests, each lasting one request's
    prefill plus its decode at that batch."""
    c = max(req.closed, 1)
    isl, osl = float(req.isl.mean()), float(req.osl.mean())
    pre = float(pc.step_seconds(isl, isl * isl / 2, 0.0, 1, False, 1.0))
    step = float(dc.step_seconds(c, 0.0, c * (isl + osl / 2), c, True))
    wave = pre + osl * step
    return (np.arange(len(req)) // c) * wave


def kv_protocol(transport: str, src: str, dst: str) -> str | None:
    """The protocol rows that price a KV write by the real server's `transport` (None: the route's links)."""
    if transport == "tcp":
        return "tcp-engine"
    if transport == "cuda_ipc":
        return "cuda_ipc-local" if src == dst else "cuda_ipc"
    return None


def _disaggregated(cluster: Any, pws: list[Worker], dws: list[Worker], req: Requests, arr: np.ndarray,
                   gpus: int) -> Outcome:
    from workbench.sim.p2p import route, write

    n = len(req)
    t_sched, t_first, t_finish = np.full(n, _NAN), np.full(n, _NAN), np.full(n, _NAN)
    preempt = np.zeros(n, np.int64)
    failed = np.zeros(n, bool)
    worker_of = np.full(n, -1, np.int64)
    runs: list[tuple[Worker, EngineRun, np.ndarray]] = []
    order = np.argsort(arr, kind="stable")
    hits = 0
    pf_done = np.full(n, _NAN)
    p_of = np.zeros(n, np.int64)
    if pws[0].cost.plan.max_len:  # longer than the engine's max_len: rejected
        failed |= (req.isl + req.osl) > pws[0].cost.plan.max_len
    for r, w in enumerate(pws):
        idx = order[r::len(pws)]
        idx = idx[~failed[idx]]
        if not len(idx):
            continue
        er = run_engine(w.cost, arr[idx], req.isl[idx], req.osl[idx], 0, req.prefix, mode="prefill")
        t_sched[idx] = er.t_sched
        pf_done[idx] = er.t_finish
        preempt[idx] += er.preempt
        failed[idx] |= er.failed
        p_of[idx] = r
        hits += er.prefix_hits
        runs.append((w, er, idx))
    # ---- KV moved layer by layer from the prefill worker's GPUs to the decode worker's GPUs
    pcost, dcost = pws[0].cost, dws[0].cost
    L = pcost.model.layers
    B = pcost.plan.block
    pairs = max(min(pcost.tp, dcost.tp), 1)
    per_tok_pair = pcost.kv_bytes_per_token_model() / L / pairs  # bytes per token per layer per GPU pair
    d_of = np.zeros(n, np.int64)
    d_of[order] = np.arange(n) % len(dws)
    uniq = np.unique(req.isl)
    t_layer = np.zeros(len(uniq))
    t_all = np.zeros(len(uniq))
    src0, dst0 = pws[0].devices[0], dws[0].devices[0]
    page = int(B * per_tok_pair)
    memo = cluster.graph.__dict__.setdefault("_serve_kv_writes", {})
    plan = pcost.plan
    measured_kv = plan.kv_us is not None or plan.kv_GBps is not None
    proto = kv_protocol(plan.kv_transport, src0, dst0)
    for j, s in enumerate(uniq.tolist()):
        pages = int(_ceil_div(s, B))
        if measured_kv:  # the hand-off as measured: a fixed cost per layer write, then its bytes at kv_GBps
            per_layer = pages * max(page, 1) / (plan.kv_GBps * 1e9) if plan.kv_GBps else 0.0
            t_layer[j] = (plan.kv_us or 0.0) * 1e-6 + per_layer
            t_all[j] = t_layer[j] + (L - 1) * per_layer
            continue
        key = (src0, dst0, pages, page, L, proto)
        hit = memo.get(key)
        if hit is None:
            one = write(cluster, src0, dst0, pages=pages, page_bytes=max(page, 1), protocol=proto).seconds
            rest = write(cluster, src0, dst0, pages=pages * (L - 1), page_bytes=max(page, 1),
                         steady_state=True, protocol=proto).seconds if L > 1 else 0.0
            hit = memo[key] = (one, one + rest)
        t_layer[j], t_all[j] = hit
    pos = np.searchsorted(uniq, req.isl)
    span = np.nan_to_num(pf_done - t_sched)
    # layer l's pages leave once layer l is prefilled: the transfer starts after the first layer and
    # overlaps the rest; one (prefill worker, decode worker) pair carries one transfer at a time
    start = pf_done - span * (L - 1) / L
    landed = np.full(n, _NAN)
    busy: dict[tuple[int, int], float] = {}
    for i in np.argsort(np.nan_to_num(pf_done, nan=np.inf), kind="stable").tolist():
        if failed[i] or np.isnan(pf_done[i]):
            continue
        pair = (int(p_of[i]), int(d_of[i]))
        s0 = max(float(start[i]), busy.get(pair, -np.inf))
        end = max(s0 + float(t_all[pos[i]]), float(pf_done[i]) + float(t_layer[pos[i]]))
        start[i], landed[i] = s0, end
        busy[pair] = end
    lanes = route(cluster, src0, dst0).lanes
    link_names = tuple(cluster.graph.links[i].name for lane in lanes for i in lane.links)
    nbytes = req.isl * pcost.kv_bytes_per_token_model()
    transfers = pd.DataFrame({"request": np.arange(n), "start": start, "end": landed, "bytes": nbytes,
                              "src": [pws[p].devices[0] for p in p_of], "dst": [dws[d].devices[0] for d in d_of]})
    transfers.attrs["links"] = link_names
    transfers.attrs["pairs"] = [(pws[a].devices, dws[b].devices) for a in range(len(pws)) for b in range(len(dws))]
    transfers.attrs["n_pairs"] = pairs
    for r, w in enumerate(dws):
        idx = np.flatnonzero((d_of == r) & ~failed)
        if not len(idx):
            continue
        idx = idx[np.argsort(landed[idx], kind="stable")]
        er = run_engine(w.cost, landed[idx], req.isl[idx], req.osl[idx], 0, 0, mode="decode",
                        first_token=landed[idx])
        t_first[idx] = landed[idx]
        t_finish[idx] = er.t_finish
        preempt[idx] += er.preempt
        failed[idx] |= er.failed
        worker_of[idx] = len(pws) + r
        runs.append((w, er, idx))
    return Outcome(req, t_sched, t_first, t_finish, preempt, arr.copy(), failed, worker_of, runs, transfers, hits,
                   gpus)


# ====================================================================== metrics
def _stats(x: np.ndarray, name: str, w: np.ndarray | None = None) -> dict[str, float]:
    if len(x) == 0:
        return {f"{s}_{name}_ms": 0.0 for s in ("mean", "median", "std", "p99")}
    if w is None:
        return {f"mean_{name}_ms": float(x.mean() * 1e3), f"median_{name}_ms": float(np.median(x) * 1e3),
                f"std_{name}_ms": float(x.std() * 1e3), f"p99_{name}_ms": float(np.percentile(x, 99) * 1e3)}
    o = np.argsort(x)
    xs, ws = x[o], w[o].astype(float)
    cw = np.cumsum(ws)
    tot = cw[-1]
    mean = float((xs * ws).sum() / tot)

    def q(p: float) -> float:
        return float(xs[min(np.searchsorted(cw, p * tot, side="left"), len(xs) - 1)])
    std = float(np.sqrt(((xs - mean) ** 2 * ws).sum() / tot))
    return {f"mean_{name}_ms": mean * 1e3, f"median_{name}_ms": q(0.5) * 1e3, f"std_{name}_ms": std * 1e3,
            f"p99_{name}_ms": q(0.99) * 1e3}


def request_table(o: Outcome) -> pd.DataFrame:
    """One row per request: arrival, queue, TTFT, TPOT, E2E (seconds), lengths, preemptions, worker label."""
    ok = ~o.failed & ~np.isnan(o.t_finish)
    ttft = o.t_first - o.arrival
    e2el = o.t_finish - o.arrival
    osl = o.req.osl
    tpot = np.where(osl > 1, (e2el - ttft) / np.maximum(osl - 1, 1), np.nan)
    label = np.full(len(osl), "", dtype=object)
    for w, _, idx in o.runs:  # disaggregated: the decode worker's label (its runs come after the prefill ones)
        label[idx] = f"{w.role}{w.index}"
    return pd.DataFrame({"request": np.arange(len(osl)), "arrival": o.arrival, "queue_s": o.t_sched - o.arrival,
                         "ttft_s": ttft, "tpot_s": tpot, "e2el_s": e2el, "input_tokens": o.req.isl,
                         "output_tokens": osl, "preemptions": o.preempt, "worker": label, "completed": ok})


def metrics(o: Outcome, slo: SLO, scale: int = 1) -> dict[str, Any]:
    """`vllm bench serve` metrics of an outcome (`scale`: replicas a one-replica outcome stands for)."""
    ok = ~o.failed & ~np.isnan(o.t_finish)
    ttft = (o.t_first - o.arrival)[ok]
    e2el = (o.t_finish - o.arrival)[ok]
    osl = o.req.osl[ok]
    many = osl > 1
    tpot = (e2el[many] - ttft[many]) / (osl[many] - 1)
    n = int(ok.sum())
    dur = float(np.nanmax(o.t_finish[ok]) - np.nanmin(o.arrival[ok])) if n else 0.0
    dur = max(dur, 1e-12)
    out_tok = float(osl.sum())
    in_tok = float(o.req.isl[ok].sum())
    good = np.ones(n, bool)
    if slo.ttft:
        good &= ttft * 1e3 <= slo.ttft
    if slo.tpot:
        tp_all = np.zeros(n)
        tp_all[many] = tpot
        good &= tp_all * 1e3 <= slo.tpot
    if slo.e2el:
        good &= e2el * 1e3 <= slo.e2el
    itl_x, itl_w = [], []
    for w, er, _ in o.runs:
        if w.role == "prefill":
            continue
        # a decode's inter-token gap runs from the previous step that decoded (steps without decodes
        # in between, e.g. whole-prompt prefills, stall every running sequence)
        keep = np.flatnonzero(er.step_decode > 0)
        if len(keep):
            ends = er.step_start[keep] + er.step_dt[keep]
            gaps = np.diff(ends, prepend=ends[0] - er.step_dt[keep[0]])
            itl_x.append(gaps)
            itl_w.append(er.step_decode[keep])
        if er.itl_extra:
            itl_x.append(np.asarray(er.itl_extra))
            itl_w.append(np.ones(len(er.itl_extra), np.int64))
    m: dict[str, Any] = {
        "completed": n * scale, "failed": int(o.failed.sum()) * scale, "duration_s": dur,
        "request_throughput": n / dur * scale, "request_goodput": float(good.sum()) / dur * scale,
        "output_throughput": out_tok / dur * scale, "total_token_throughput": (in_tok + out_tok) / dur * scale,
        "total_input_tokens": int(in_tok) * scale, "total_output_tokens": int(out_tok) * scale,
    }
    m.update(_stats(ttft, "ttft"))
    m.update(_stats(tpot, "tpot"))
    if itl_x:
        m.update(_stats(np.concatenate(itl_x), "itl", np.concatenate(itl_w)))
    else:
        m.update(_stats(np.zeros(0), "itl"))
    m.update(_stats(e2el, "e2el"))
    peak = 0.0
    for w, er, _ in o.runs:
        if len(er.step_blocks) and w.cost.memory.blocks:
            peak = max(peak, float(er.step_blocks.max()) / w.cost.memory.blocks)
    gpus = o.gpus
    m.update({"peak_kv_usage": peak, "preemptions": int(o.preempt.sum()) * scale,
              "prefix_cache_hit_rate": o.prefix_hits / max(in_tok, 1.0),
              "kv_capacity_tokens": int(o.runs[0][0].cost.memory.kv_tokens) if o.runs else 0,
              "num_gpus": gpus, "goodput_per_gpu": m["request_goodput"] / max(gpus, 1),
              "output_throughput_per_gpu": m["output_throughput"] / max(gpus, 1)})
    return m


# ====================================================================== the Result
def _result(cluster: Any, o: Outcome, m: dict[str, Any], job: Any) -> Any:
    from workbench.result import Result

    frames = []
    mem_rows: list[dict[str, Any]] = []
    for w, er, _idx in o.runs:
        k = len(er.step_start)
        if k:
            pf, dc = er.step_prefill, er.step_decode
            op = np.where(pf == 0, "decode", np.where(dc == 0, "prefill", "mixed"))
            frames.append(pd.DataFrame({
                "rank": w.first_rank, "device": w.devices[0], "kind": "compute", "op": op, "bytes": 0,
                "links": [()] * k, "start": er.step_start, "end": er.step_start + er.step_dt,
                "worker": f"{w.role}{w.index}", "prefill_tokens": pf, "decode_seqs": dc, "kv_blocks": er.step_blocks}))
            comm = w.cost.comm_seconds(pf + dc)
            if comm.any():
                end = er.step_start + er.step_dt
                frames.append(pd.DataFrame({
                    "rank": w.first_rank, "device": w.devices[0], "kind": "collective",
                    "op": "all_to_all" if w.cost.ep > 1 else "all_reduce", "bytes": 0, "links": [()] * k,
                    "start": end - np.minimum(comm, er.step_dt), "end": end, "worker": f"{w.role}{w.index}"}))
        mem = w.cost.memory
        for cat, b in (("weights", mem.weights), ("activations", mem.activations), ("reserve", mem.reserve)):
            mem_rows.append({"rank": w.first_rank, "category": cat, "bytes": b, "time": 0.0,
                             "worker": f"{w.role}{w.index}", "device": w.devices[0]})
        if k:
            pick = np.unique(np.linspace(0, k - 1, min(k, 400)).astype(int))
            per_block = mem.kv_bytes_per_token * w.cost.plan.block / max(w.cost.dp, 1)
            for t, b in zip(er.step_start[pick] + er.step_dt[pick], er.step_blocks[pick]):
                mem_rows.append({"rank": w.first_rank, "category": "kv_cache", "bytes": float(b) * per_block,
                                 "time": float(t), "worker": f"{w.role}{w.index}", "device": w.devices[0],
                                 "capacity": mem.kv_pool})
    rt = request_table(o)
    rank_of = np.zeros(len(rt), np.int64)
    dev_of = np.empty(len(rt), object)
    for w, _, idx in o.runs:
        rank_of[idx] = w.first_rank
        dev_of[idx] = w.devices[0]
    dev_of[dev_of == None] = ""  # noqa: E711
    frames.append(rt.assign(rank=rank_of, device=dev_of, kind="compute", op="request", bytes=0,
                            links=[()] * len(rt), start=rt["arrival"], end=rt["arrival"] + rt["e2el_s"].fillna(0.0)))
    links_rows: list[dict[str, Any]] = []
    if o.transfers is not None and len(o.transfers):
        tr = o.transfers
        names = tr.attrs.get("links", ())
        frames.append(pd.DataFrame({"rank": -1, "device": tr["src"] + "->" + tr["dst"], "kind": "transfer",
                                    "op": "kv_transfer", "bytes": tr["bytes"].astype(np.int64),
                                    "links": [names] * len(tr), "start": tr["start"], "end": tr["end"],
                                    "request": tr["request"]}))
        links_rows = _link_rows(cluster, tr)
    links_rows += _collective_link_rows(cluster, o)
    events = pd.concat(frames, ignore_index=True) if frames else None
    return Result(events=events, memory=pd.DataFrame(mem_rows), links=pd.DataFrame(links_rows) if links_rows else None,
                  metrics=m, source="sim", fidelity="closed-form", job=job)


def _collective_link_rows(cluster: Any, o: Outcome, bins: int = 200) -> list[dict[str, Any]]:
    """Mean rate of the workers' TP all-reduces and EP all-to-alls on each GPU's own link over time bins:
    per step and GPU, ring all-reduce moves 2(t−1)/t of each layer's two activations, all-to-all
    (t−1)/t of the routed tokens both ways."""
    from workbench.sim.p2p import route

    ends = [float((er.step_start + er.step_dt).max()) for _, er, _ in o.runs if len(er.step_start)]
    if not ends:
        return []
    edges = np.linspace(0.0, max(ends), bins + 1)
    width = edges[1] - edges[0]
    acc: dict[str, np.ndarray] = {}
    cap: dict[str, float] = {}
    for w, er, _ in o.runs:
        c = w.cost
        if (c.tp <= 1 and c.ep <= 1) or not len(er.step_start):
            continue
        mod = c.model
        m = (er.step_prefill + er.step_decode).astype(float)
        per = np.zeros_like(m)
        if c.tp > 1:
            per += 2 * c.layers_per_stage * m * mod.hidden * c.act_bytes * 2 * (c.tp - 1) / c.tp
        if c.ep > 1:
            per += 2 * c.n_moe * (m / c.ep) * mod.top_k * mod.hidden * c.act_bytes * (c.ep - 1) / c.ep
        mid = er.step_start + er.step_dt / 2
        hist = np.histogram(mid, bins=edges, weights=per)[0] / width
        group = list(w.devices)
        for k, dev in enumerate(group):
            peer = group[(k + 1) % len(group)]
            lanes = route(cluster, dev, peer).lanes
            if not lanes or not lanes[0].links:
                continue
            lk = cluster.graph.links[lanes[0].links[0]]
            acc[lk.name] = acc.get(lk.name, 0.0) + hist
            cap[lk.name] = lk.GBps
    rows: list[dict[str, Any]] = []
    for name, rate in acc.items():
        for b in np.flatnonzero(rate > 0):
            v = float(rate[b]) / 1e9
            rows.append({"link": name, "start": float(edges[b]), "end": float(edges[b + 1]), "GBps": v,
                         "utilisation": v / cap[name] if cap[name] else 0.0})
    return rows


def _link_rows(cluster: Any, tr: pd.DataFrame, bins: int = 200) -> list[dict[str, Any]]:
    """Mean KV-transfer rate per link over time bins (every transfer spread evenly over its span)."""
    from workbench.sim.p2p import route

    ok = tr.dropna(subset=["start", "end"])
    if ok.empty:
        return []
    t0, t1 = float(ok["start"].min()), float(ok["end"].max())
    if t1 <= t0:
        return []
    edges = np.linspace(t0, t1, bins + 1)
    width = edges[1] - edges[0]
    rows: list[dict[str, Any]] = []
    npairs = int(tr.attrs.get("n_pairs", 1))
    for (src, dst), g in ok.groupby(["src", "dst"]):
        # every GPU pair of the two workers carries its shard of the KV over its own lanes
        pdevs = next(((p, d) for p, d in tr.attrs.get("pairs", []) if p[0] == src and d[0] == dst), ((src,), (dst,)))
        s, e = g["start"].to_numpy(), g["end"].to_numpy()
        rate = np.zeros(bins)
        r = g["bytes"].to_numpy() / np.maximum(e - s, 1e-9) / npairs
        for si, ei, ri in zip(s, e, r):  # each transfer spread over the bins it overlaps
            for b in range(max(int((si - t0) / width), 0), min(int((ei - t0) / width), bins - 1) + 1):
                ov = min(ei, edges[b + 1]) - max(si, edges[b])
                if ov > 0:
                    rate[b] += ri * ov / width
        live = np.flatnonzero(rate > 1e-9 * max(float(rate.max()), 1.0))
        for a, b in zip(pdevs[0][:npairs], pdevs[1][:npairs]):
            lanes = route(cluster, str(a), str(b)).lanes
            for lane in lanes:
                for li in lane.links:
                    lk = cluster.graph.links[li]
                    for k in live:
                        v = float(rate[k]) / len(lanes) / 1e9
                        rows.append({"link": lk.name, "start": float(edges[k]), "end": float(edges[k + 1]),
                                     "GBps": v, "utilisation": v / lk.GBps})
    if rows:
        df = pd.DataFrame(rows).groupby(["link", "start", "end"], as_index=False).sum()
        return list(df.to_dict("records"))  # type: ignore[arg-type]
    return []


def step_events(result: Any) -> pd.DataFrame:
    """The engine steps of a simulated serving Result (its compute events other than the per-request rows)."""
    ev = result.events
    return ev[(ev["kind"] == "compute") & (ev["op"] != "request")]


def requests(result: Any) -> pd.DataFrame:
    """The per-request rows of a serving Result (events with op 'request') as their own DataFrame."""
    ev = result.events
    cols = ["request", "arrival", "queue_s", "ttft_s", "tpot_s", "e2el_s", "input_tokens", "output_tokens",
            "preemptions", "worker", "completed", "rank", "device"]
    r = ev[ev["op"] == "request"]
    r = r[[c for c in cols if c in r.columns]].reset_index(drop=True)
    ints = {c: "int64" for c in ("request", "input_tokens", "output_tokens", "preemptions") if c in r}
    return r.astype(ints).astype({"completed": bool} if "completed" in r else {})


# ====================================================================== entry points
def simulate_serving(cluster: Any, model: Any, plan: Any = None, traffic: Any = "concurrency=16,isl=1024,osl=256",
                     slo: Any = None, job: Any = None) -> Any:
    """Simulate serving `traffic` with `plan` on `cluster`; a Result (events, memory, links, metrics)."""
    from workbench.models.presets import load_model
    from workbench.topology.presets import load_cluster

    t = time.perf_counter()
    cluster, model = load_cluster(cluster), load_model(model)
    plan, traffic, slo = ServingPlan.parse(plan), Traffic.parse(traffic), SLO.parse(slo)
    o = simulate_requests(cluster, model, plan, traffic.draw())
    m = metrics(o, slo)
    res = _result(cluster, o, m, job)
    res.metrics["sim_seconds"] = time.perf_counter() - t
    return res


def simulate_job(job: Any) -> Any:
    """The serving engine behind `workbench.simulate(job)` for `Serving` workloads."""
    wl = job.workload
    return simulate_serving(job.cluster, job.model, job.plan, wl.traffic, wl.slo, job=job)


def evaluate(cluster: Any, model: Any, plan: ServingPlan, req: Requests, slo: SLO) -> dict[str, Any]:
    """Metrics only (no Result tables), replica 0 standing for identical replicas: what the search calls."""
    t = time.perf_counter()
    ws = workers(cluster, model, plan)
    if plan.disaggregated:
        o = simulate_requests(cluster, model, plan, req)
        m = metrics(o, slo)
    else:
        k = len(ws)
        sub = Requests(req.arrival[::k], req.isl[::k], req.osl[::k], _closed_share(req.closed, k, 0), req.prefix)
        o = simulate_requests(cluster, model, replace(plan, replicas=1), sub)
        o.gpus = sum(len(w.devices) for w in ws)
        m = metrics(o, slo, scale=k)
        m["num_gpus"] = o.gpus
        m["goodput_per_gpu"] = m["request_goodput"] / o.gpus
        m["output_throughput_per_gpu"] = m["output_throughput"] / o.gpus
    m["sim_seconds"] = time.perf_counter() - t
    return m


def load_sweep(cluster: Any, model: Any, plans: dict[str, Any], traffic: Any, rates: Any, slo: Any = None) -> pd.DataFrame:
    """Metrics of each named plan at each open-loop request rate (the same traffic otherwise): TTFT/TPOT
    versus load curves. One row per (plan, rate)."""
    from workbench.models.presets import load_model
    from workbench.topology.presets import load_cluster

    cluster, model, base = load_cluster(cluster), load_model(model), Traffic.parse(traffic)
    rows = []
    for name, plan in plans.items():
        for r in rates:
            m = simulate_serving(cluster, model, plan, replace(base, rate=float(r), concurrency=0), slo).metrics
            rows.append({"plan": name, "rate": float(r), **{k: v for k, v in m.items() if not isinstance(v, dict)}})
    return pd.DataFrame(rows)
