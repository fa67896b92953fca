"""Serving a `Placement` (workbench.plan.placement): replicas of pipeline stages on mixed GPUs.

Each stage is priced as its own worker (`WorkerCost` of the stage's layers on its TP group, in its
formats, on its GPU kind); the replica's scheduler loop then runs with the prices of its bottleneck
stage (the one slowest at a decode step of the full batch and at a full prefill chunk, summed):
with `pp` micro-batches in flight the pipeline's period is pp × that stage's time. The sends between
stages are priced on the links they cross (`workbench.sim.p2p`: a 10 GbE hop between a 3090 node and
an A100 node costs what it costs), summed over the boundaries. The KV pool is the smallest of the
stages' pools (every stage holds its own layers' KV). Requests go to replicas by the placement's
routing weights. Offload is not priced here (a stage that offloads is reported as such).
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.serving import SLO, Requests, ServingPlan, Traffic
from workbench.sim.serve import Outcome, Worker, _result, metrics, run_engine
from workbench.sim.serve_cost import WorkerCost, overheads


def _stage_model(model: Any, first: int, last: int) -> Any:
    """The model restricted to layers [first, last] (dense/MoE layer kinds kept)."""
    n = last - first + 1
    dense = max(min(model.dense_layers, last + 1) - first, 0) if model.is_moe else 0
    kw: dict[str, Any] = {"layers": n}
    if model.is_moe:
        kw["dense_layers"] = min(dense, n - 1) if dense < n else 0
        if dense >= n:  # an all-dense stage of a MoE model: price it as a dense model's layers
            kw.update(experts=0, top_k=0, shared_experts=0, expert_ffn=0, dense_layers=0)
    return replace(model, **kw)


def pipeline_cost(cluster: Any, model: Any, stages: Any, plan: ServingPlan) -> tuple[WorkerCost, list[WorkerCost]]:
    """(the replica's price as one WorkerCost, the per-stage costs)."""
    from workbench.sim.p2p import transfer_seconds

    costs = []
    for k, st in enumerate(stages):
        sub = _stage_model(model, st.first, st.last)
        p = replace(plan, tp=st.tp, pp=1, replicas=1, precision=st.precision, kv_precision=st.kv_precision)
        try:
            c = WorkerCost(cluster, sub, p, "colocated", list(st.devices))
        except WorkbenchError as exc:
            raise WorkbenchError(f"placement stage {k} ({', '.join(st.devices)}): {exc}") from None
        c.embed_parts = (k == 0, k == len(stages) - 1)  # type: ignore[attr-defined]
        c.memory = c._memory(overheads()["reserve_GiB"] * 2**30)
        if not c.memory.fits:
            raise WorkbenchError(f"placement stage {k} ({', '.join(st.devices)}): layers {st.first}..{st.last} leave "
                                 f"no KV cache on {c.spec.model} (weights {c.memory.weights / 2**30:.1f} GiB)")
        costs.append(c)
    pp = len(costs)
    m_dec = float(plan.max_seqs)
    score = [float(c.step(m_dec, 0.0, m_dec * 1024, 1, True)) + float(c.step(plan.max_tokens, plan.max_tokens *
                                                                            plan.max_tokens / 2.0, 0.0, 1, False, 1.0))
             for c in costs]
    b = int(np.argmax(score))
    out = copy.copy(costs[b])
    out.pp = pp
    g = out.grid
    m_per = np.exp(g) / 1.0  # the kernel evaluates tables at m / pp
    if pp > 1:
        sends = np.zeros_like(g)
        for a, z in zip(stages[:-1], stages[1:]):
            sends += np.array([transfer_seconds(cluster, a.devices[0], z.devices[0],
                                                int(x * model.hidden * out.act_bytes)) for x in m_per])
        out.t_send = sends / (pp - 1)
    out.t_head = costs[-1].t_head
    blocks = min(c.memory.blocks for c in costs)
    out.memory = replace(costs[b].memory, blocks=blocks, kv_tokens=blocks * plan.block)
    out.layers_per_stage = costs[b].layers_per_stage
    out.kernels = costs[b].kernels
    out._scalar_tables()
    return out, costs


def simulate_placement(cluster: Any, model: Any, placement: Any, traffic: Any, slo: Any = None,
                       plan: Any = None, job: Any = None) -> Any:
    """Serve `traffic` with a `Placement` on `cluster`; a Result like `simulate_serving`'s (one worker per
    replica, labelled `replica<r>`). `plan`: scheduler knobs (max_seqs, max_tokens, block, ...)."""
    from workbench.models.presets import load_model
    from workbench.plan.placement import Placement
    from workbench.topology.presets import load_cluster

    t = time.perf_counter()
    cluster, model = load_cluster(cluster), load_model(model)
    if not isinstance(placement, Placement):
        placement = Placement.from_dict(placement)
    placement.validate(cluster)
    base, traffic, slo = ServingPlan.parse(plan), Traffic.parse(traffic), SLO.parse(slo)
    req = traffic.draw()
    n = len(req)
    weights = np.asarray(placement.routing, float)
    # requests to replicas in proportion to the routing weights (deterministic: largest remainder, in order)
    share = np.floor(np.cumsum(weights) * n + 1e-9).astype(int)
    which = np.searchsorted(share, np.arange(n), side="right")
    which = np.minimum(which, len(weights) - 1)
    o = Outcome(req, np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64),
                req.arrival.astype(float).copy(), np.zeros(n, bool), np.full(n, -1, np.int64), [], None, 0,
                len(placement.devices))
    first = 0
    for r, rep in enumerate(placement.replicas):
        cost, _ = pipeline_cost(cluster, model, rep.stages, base)
        idx = np.flatnonzero(which == r)
        devs = tuple(d for st in rep.stages for d in st.devices)
        w = Worker("replica", r, devs, first, cost)
        first += len(devs)
        if not len(idx):
            continue
        closed = int(round(req.closed * weights[r])) if req.closed else 0
        er = run_engine(cost, req.arrival[idx], req.isl[idx], req.osl[idx], max(closed, 1) if req.closed else 0,
                        req.prefix)
        o.t_sched[idx], o.t_first[idx], o.t_finish[idx] = er.t_sched, er.t_first, er.t_finish
        o.preempt[idx], o.arrival[idx], o.failed[idx] = er.preempt, er.arrival, er.failed
        o.worker_of[idx] = r
        o.prefix_hits += er.prefix_hits
        o.runs.append((w, er, idx))
    m = metrics(o, slo)
    res = _result(cluster, o, m, job)
    res.metrics["sim_seconds"] = time.perf_counter() - t
    return res


__all__ = ["Requests", "pipeline_cost", "simulate_placement"]
