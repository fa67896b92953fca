"""Training-step simulator: one sharded step of a dense or MoE transformer on a cluster.

`evaluate(cluster, model, plan)` gives the metrics in well under 2 ms (one representative rank
per pipeline stage; collective prices cached); `simulate_job(job)` adds the
events of every stage's representative rank in the shared `Result` schema.

Ranks map to GPUs in Megatron order — tp fastest, then cp, then dp, then pp — so a TP group
sits inside a node's NVLink domain and PP/DP groups cross the NICs. What is modelled:

- per layer and micro-batch: forward, backward (dgrad + wgrad) and recomputation GEMMs, flash
  attention and memory-bound ops timed by `workbench.sim.compute` (measured curves);
- TP collectives (2 all-gathers + 2 reduce-scatters per layer and direction with sequence
  parallelism, else 2 all-reduces), exposed; EP all-to-all (dispatch + combine), exposed; CP
  ring exchange of K/V overlapped with the attention it feeds (only the excess is exposed);
- the pipeline schedule (1F1B, or interleaved with `vpp` chunks) simulated op by op with the
  point-to-point sends between stages, so bubbles are what the schedule leaves;
- data parallelism: gradient all-reduce (ZeRO-0) or reduce-scatter (ZeRO-1/2) per layer bucket,
  overlapped with the last micro-batch's backward as Megatron's overlap_grad_reduce does; the
  parameter all-gather after the optimizer overlapped with the next step's first forward;
  ZeRO-3/FSDP gathers each layer's weights before its forward and backward and reduce-scatters
  its gradients every micro-batch, prefetched one layer ahead (exposed only beyond the layer's
  compute);
- the Adam step as a memory-bound op over the local (sharded) parameters;
- activation offload: stored activations copied to host over PCIe during the op, exposed
  beyond its compute.
Not modelled: contention between concurrent collectives on shared NICs, stragglers, kernel
launch gaps beyond those in the microbenchmarks, the CUDA context and allocator fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.models.costs import (
    activation_bytes_per_token,
    attention_core_flops,
    attention_score_bytes_per_token,
    backward_gemms,
    elementwise_bytes_per_token,
    layer_gemms,
    layer_kinds,
    model_flops_per_token,
    parameter_count,
)
from workbench.models.spec import ModelSpec
from workbench.plan.spec import Plan
from workbench.plan.validate import gpus_per_node, problem, split_layers
from workbench.sim.compute import DeviceModel, device_model
from workbench.sim.train_schedule import in_flight_stages, pipeline_times
from workbench.sim.train_stack import DEFAULT_STACK, Stack, load_stack
from workbench.topology.model import Cluster

GiB = 1024**3
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "buffers")
BREAKDOWN = ("forward", "backward", "recompute", "tp_comm", "ep_comm", "cp_comm", "fsdp_comm", "offload",
             "pp_comm", "pipeline_bubble", "dp_comm", "embedding_sync", "optimizer", "param_gather", "host_bound")


def _elem(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass
class StageCost:
    """Per-micro-batch durations of one virtual stage (chunk) and the parts they are made of."""

    fwd: float = 0.0
    bwd: float = 0.0
    parts_f: dict[str, float] = field(default_factory=dict)
    parts_b: dict[str, float] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    params: float = 0.0  # non-expert parameters per rank
    edge_params: float = 0.0  # of which the embedding and the LM head (FSDP2's root unit)
    expert_params: float = 0.0  # expert parameters per rank
    act_bytes: float = 0.0  # stored activations per micro-batch
    peak_layer_bytes: float = 0.0  # one layer's full activations (live during recompute)
    logits_bytes: float = 0.0
    layer_grad_comm: list[float] = field(default_factory=list)
    host_f: float = 0.0  # host seconds to issue one micro-batch's forward (stacks that price host dispatch)
    host_b: float = 0.0

    def add(self, which: str, part: str, seconds: float) -> None:
        d = self.parts_f if which == "f" else self.parts_b
        d[part] = d.get(part, 0.0) + seconds
        if which == "f":
            self.fwd += seconds
        else:
            self.bwd += seconds


@dataclass(frozen=True)
class TrainEstimate:
    """Metrics of one simulated training step (`to_metrics()` gives the documented JSON keys)."""

    plan: Plan
    step_seconds: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float
    memory: dict[str, float]  # bytes per category on the binding rank
    capacity: float
    fits: bool
    breakdown: dict[str, float]
    binding_stage: int
    model_flops: float
    hardware_flops: float
    memory_by_stage: tuple[dict[str, float], ...] = ()

    def to_metrics(self) -> dict[str, Any]:
        mem = {k: round(v / GiB, 3) for k, v in self.memory.items()}
        mem["total"] = round(sum(self.memory.values()) / GiB, 3)
        return {
            "step_seconds": self.step_seconds, "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu, "memory_GiB_per_gpu": mem,
            "memory_capacity_GiB": round(self.capacity / GiB, 3), "fits": self.fits,
            "breakdown_seconds": dict(self.breakdown), "binding_stage": self.binding_stage,
            "plan": self.plan.to_dict(),
        }


class TrainContext:
    """Everything about (cluster, model) that plans share: devices, rank→GPU map, price caches."""

    def __init__(self, cluster: Cluster, model: ModelSpec, params: Any = None) -> None:
        self.cluster = cluster
        self.model = model
        self.params = params
        self.world = cluster.num_gpus
        self.node_gpus = gpus_per_node(cluster)
        self._first = np.cumsum([0] + [n.gpus for n in cluster.nodes])[:-1]
        self._gpus: list[str] | None = None
        self.kinds = layer_kinds(model)
        self.pc = parameter_count(model)
        kinds_of_node = set(cluster.nodes)
        self.homogeneous = len(kinds_of_node) == 1
        self._spec0 = cluster.nodes[0].gpu_spec
        self.is_cpu = any(n.gpu_spec.is_cpu for n in kinds_of_node)
        self._coll: dict[tuple[Any, ...], float] = {}
        self._stage: dict[tuple[Any, ...], StageCost] = {}
        self._layer: dict[tuple[Any, ...], Any] = {}

    @property
    def gpus(self) -> list[str]:
        if self._gpus is None:
            self._gpus = self.cluster.gpus
        return self._gpus

    def gpu_name(self, rank: int) -> str:
        """The cluster's name of the GPU holding `rank` (`Cluster.gpus[rank]`, without building that list)."""
        if self.homogeneous:
            return f"n{rank // self.node_gpus}.g{rank % self.node_gpus}"
        return self.gpus[rank]

    def node_of(self, rank: int) -> int:
        if self.homogeneous:
            return rank // self.node_gpus
        return int(np.searchsorted(self._first, rank, side="right") - 1)

    def spec_of(self, rank: int) -> Any:
        if self.homogeneous:
            return self._spec0
        return self.cluster.nodes[self.node_of(rank)].gpu_spec

    def precisions(self) -> tuple[str, ...]:
        return tuple(dict(self.cluster.nodes[0].gpu_spec.peak_tflops))

    def coll(self, op: str, nbytes: float, ranks: tuple[int, ...]) -> float:
        """Seconds of collective `op` of nccl-tests size `nbytes` over ranks (cached)."""
        if len(ranks) <= 1 or nbytes <= 0:
            return 0.0
        key = (op, int(nbytes), ranks)
        hit = self._coll.get(key)
        if hit is None:
            from workbench.sim.collectives import collective

            hit = collective(self.cluster, op, int(nbytes), [self.gpu_name(r) for r in ranks], params=self.params).seconds
            self._coll[key] = hit
        return hit

    def slowdown(self, rank: int, stack: Stack) -> float:
        """Fractional compute slowdown while communication kernels run beside it: the stack's SM share
        for communication if it reserves one (1/(1 − share) − 1), else the measured GEMM slowdown beside
        an NCCL collective (`datasets/interference_measured.csv`)."""
        if stack.comm_sm_fraction is not None:
            return 1.0 / (1.0 - stack.comm_sm_fraction) - 1.0
        spec = self.spec_of(rank)
        if spec.is_cpu:
            return 0.0
        from workbench.sim.compute import interference_slowdown

        return interference_slowdown(spec.model)[0]

    def stretch(self, rank: int, stack: Stack, ranks: tuple[int, ...]) -> float:
        """Factor by which a collective over `ranks` lasts longer while compute runs beside it: the measured
        bus-bandwidth loss beside a GEMM (`datasets/interference_measured.csv`, two GPUs over NVLink) for a
        group inside one node; 1 across nodes (NIC-bound, not measured), on CPU ranks, and where the stack
        reserves SMs for communication (`comm_sm_fraction`)."""
        spec = self.spec_of(rank)
        if stack.comm_sm_fraction is not None or spec.is_cpu or len(ranks) <= 1:
            return 1.0
        if self.node_of(ranks[0]) != self.node_of(ranks[-1]):
            return 1.0
        from workbench.sim.compute import interference_comm_stretch

        return interference_comm_stretch(spec.model)[0]

    def pcie_Bps(self, rank: int) -> float:
        from workbench.topology.catalogue import node_link

        spec = self.spec_of(rank)
        return node_link("pcie", spec.pcie_gen)[0] * 1e9


def _groups(plan: Plan, stage: int) -> dict[str, tuple[int, ...]]:
    """Representative rank's groups (its stage's first rank) in Megatron order: tp, cp, dp, pp."""
    return _groups_of(plan.tp or 1, plan.cp or 1, plan.dp or 1, plan.pp or 1, plan.ep or 1, stage)


@lru_cache(maxsize=4096)
def _groups_of(tp: int, cp: int, dp: int, pp: int, ep: int, stage: int) -> dict[str, tuple[int, ...]]:
    base = stage * tp * cp * dp
    return {
        "tp": tuple(base + i for i in range(tp)),
        "cp": tuple(base + tp * i for i in range(cp)),
        "dp": tuple(base + tp * i for i in range(cp * dp)),  # gradient replicas: dp × cp
        "ep": tuple(base + tp * i for i in range(ep)),
        "edp": tuple(base + tp * ep * i for i in range(cp * dp // ep)),
    }


_COLPAR = ("qkv", "q", "q_down", "kv_down", "ffn_up", "shared_up", "router")  # GEMMs fed by the (SP-gathered) hidden


def _overlap(comm: float, compute: float, slow: float, stretch: float = 1.0) -> tuple[float, float]:
    """(exposed communication, extra compute time) when `comm` (seconds alone) runs beside `compute`.

    Beside compute the collective lasts `stretch` times longer (measured bus-bandwidth loss beside a GEMM);
    the compute it overlaps is slowed by `slow` (fractional GEMM slowdown beside a collective, measured).
    What the compute cannot cover finishes alone, at full speed, exposed."""
    beside = comm * stretch
    if beside <= compute:
        return 0.0, slow * beside
    return comm - compute / stretch, slow * compute


def _layer_cost(ctx: TrainContext, plan: Plan, kind: str, rank: int, groups: dict[str, tuple[int, ...]]) -> tuple:
    """(fwd parts, bwd parts, recompute parts, non-expert params, expert params, act bytes, full act bytes)
    of one layer per micro-batch on a rank."""
    m = ctx.model
    tp, cp, ep = plan.tp or 1, plan.cp or 1, plan.ep or 1
    sp = bool(plan.sp) and tp > 1
    prec = str(plan.precision)
    spec = ctx.spec_of(rank)
    st = load_stack(plan.stack)
    key = (kind, spec, plan.tp, plan.cp, plan.ep, sp, prec, plan.mbs, plan.recompute, plan.zero, groups["tp"],
           groups["ep"], groups["cp"], groups["dp"], groups["edp"], plan.dp, st.name)
    hit = ctx._layer.get(key)
    if hit is not None:
        return hit
    dm: DeviceModel = device_model(spec, prec)
    dma = device_model(spec, "fp32" if prec == "fp32" else ("bf16" if prec in ("fp8",) else prec))
    slow = ctx.slowdown(rank, st)
    k_tp, k_dp, k_cp = (ctx.stretch(rank, st, groups[g]) for g in ("tp", "dp", "cp"))
    elem = _elem(prec)
    b = plan.mbs or 1
    tokens = b * m.seq // cp
    f: dict[str, float] = {}
    bw: dict[str, float] = {}
    rc: dict[str, float] = {}
    gemms = layer_gemms(m, kind, tokens, tp, ep)
    imb = st.expert_imbalance
    gw = [imb if g.name.startswith("expert") else 1.0 for g in gemms]
    f_g = sum(w * dm.gemm_seconds(g.m, g.n, g.k, g.count) for g, w in zip(gemms, gw))
    dgrad = [w * dm.gemm_seconds(*_mnk(backward_gemms(g)[0])) for g, w in zip(gemms, gw)]
    wgrad = [w * dm.gemm_seconds(*_mnk(backward_gemms(g)[1])) for g, w in zip(gemms, gw)]
    b_g = sum(dgrad) + sum(wgrad)
    heads = m.heads // tp
    hd = m.qk_head_dim
    vd = m.v_head_dim if m.is_mla else m.head_dim
    if st.attention == "flash":
        attn_flops = attention_core_flops(m, b * m.seq // cp, m.seq, heads) * 0.5  # causal: half the square
        # ring CP: kernels on blocks of seq/cp queries and keys; all-gather CP: local queries against all keys
        kernel_seq = m.seq if (cp > 1 and st.cp_exchange == "all_gather") else m.seq // cp
        cap = st.attention_efficiency_cap
        f_a = dma.attention_seconds(attn_flops, kernel_seq, hd, True, cap=cap)
        b_a = dma.attention_seconds(2.5 * attn_flops, kernel_seq, hd, True, backward=True, cap=cap)
    else:  # unfused: QKᵀ and AV over the full square (the causal mask saves nothing), softmax and dropout in HBM
        q, kv, cnt = m.seq // cp, m.seq, b * heads
        qk = dma.bmm_seconds(q, kv, hd, cnt, elem)
        av = dma.bmm_seconds(q, vd, kv, cnt, elem)
        sq = float(cnt) * q * kv
        ew_f = sq * (2 * elem + ((2 * elem + 1) if m.dropout else 0))  # softmax r/w; dropout r/w + mask
        ew_b = sq * (3 * elem + ((2 * elem + 1) if m.dropout else 0))  # softmax bwd (y, dy -> dx); dropout bwd
        f_a = qk + av + dma.memory_seconds(ew_f)
        b_a = (dma.bmm_seconds(q, hd, kv, cnt, elem) + dma.bmm_seconds(kv, hd, q, cnt, elem)
               + dma.bmm_seconds(q, kv, vd, cnt, elem) + dma.bmm_seconds(kv, vd, q, cnt, elem) + dma.memory_seconds(ew_b))
    if st.elementwise == "eager" and prec == "bf16":  # PyTorch without the compiler: each op its own kernel
        # (bytes counted under autocast bf16, the regime the coefficients hold for; other precisions fused)
        from workbench.sim.train_host import eager_layer_bytes, eager_seconds

        e_f, e_b = eager_layer_bytes(m, tp, sp, tokens)
        f_e, b_e = eager_seconds(dm, e_f), eager_seconds(dm, e_b)
    else:
        ew = elementwise_bytes_per_token(m, kind, tp, sp, elem, st.elementwise) * tokens
        if kind == "moe":  # token permutation before the experts and un-permutation after (read + write each copy)
            ew += 2.0 * (1 + m.top_k) * m.hidden * elem * tokens / (tp if sp else 1)
        f_e = dm.memory_seconds(ew, ew / 8)
        b_e = 2 * f_e
    if prec == "fp8":  # each fp8 GEMM's input is quantized first (read bf16, write fp8): forward inputs,
        # and in backward the output gradients plus the transposed copies the wgrad GEMMs read
        q_f = sum(w * 3.0 * g.m * g.k * g.count for g, w in zip(gemms, gw))
        q_b = sum(w * 3.0 * (g.m * g.n + g.m * g.k) * g.count for g, w in zip(gemms, gw))
        f_e += dm.memory_seconds(q_f, q_f / 8)
        b_e += dm.memory_seconds(q_b, q_b / 8)
    f["forward"] = f_g + f_a + f_e
    bw["backward"] = b_g + b_a + b_e
    # tensor parallelism
    full = tokens * m.hidden * elem
    if tp > 1:
        colpar = [i for i, g in enumerate(gemms) if g.name in _COLPAR]
        dg_col = sum(dgrad[i] for i in colpar)
        wg_col = sum(wgrad[i] for i in colpar)
        if sp:
            ag, rs = ctx.coll("all_gather", full, groups["tp"]), ctx.coll("reduce_scatter", full, groups["tp"])
            t_f = 2 * ag + 2 * rs  # AG before QKV and FC1, RS after the projection and FC2
            if st.sp_async_backward:
                # backward: AG of the row-parallel outputs' gradients (exposed); the input re-gathered for the
                # weight gradient beside the dgrad GEMM and the input-gradient RS beside the wgrad GEMM
                # (Megatron's LinearWithGradAccumulationAndAsyncCommunication)
                e1, x1 = _overlap(2 * ag, dg_col, slow, k_tp)
                e2, x2 = _overlap(2 * rs, wg_col, slow, k_tp)
                t_b, extra_b = 2 * ag + e1 + e2, x1 + x2
            else:  # DTensor: each forward collective's transpose (RS for AG, AG for RS), exposed; the
                # gathered input is saved for the weight gradient, not re-gathered
                t_b, extra_b = 2 * ag + 2 * rs, 0.0
        else:
            ar = ctx.coll("all_reduce", full, groups["tp"])
            t_f = 2 * ar
            if st.tp_async_backward:  # the input-gradient all-reduce beside the wgrad GEMM
                e, extra_b = _overlap(2 * ar, wg_col, slow, k_tp)
                t_b = e
            else:
                t_b, extra_b = 2 * ar, 0.0
        if st.tp_overlap:  # userbuffers: every TP collective beside the GEMM it feeds or follows
            t_f, x_f = _overlap(t_f, f_g, slow, k_tp)
            t_b, x_b = _overlap(t_b, b_g, slow, k_tp)
            f["forward"] += x_f
            extra_b += x_b
        f["tp_comm"] = t_f
        bw["tp_comm"] = t_b
        bw["backward"] += extra_b
    # expert parallelism: dispatch + combine all-to-all, forward and backward
    if kind == "moe" and ep > 1:
        per_tok = (tokens // (tp if sp else 1)) * m.top_k * m.hidden
        disp_b = st.dispatch_bytes if st.dispatch_bytes is not None else elem
        nodes = max(1, len(groups["ep"]) * tp // max(ctx.node_gpus, 1))
        cross = 1.0
        local = 0.0
        if st.node_limit and nodes > 1:
            # each token crosses the fabric once per destination node (at most node_limit of them),
            # then is forwarded to its experts over NVLink inside the node
            cross = min(st.node_limit, nodes, m.top_k) / m.top_k
            node_grp = groups["ep"][:max(1, min(len(groups["ep"]), ctx.node_gpus // tp))]
            local = ctx.coll("all_to_all", per_tok * (disp_b + elem), node_grp)
        a2a = imb * (ctx.coll("all_to_all", per_tok * disp_b * cross, groups["ep"])
                     + ctx.coll("all_to_all", per_tok * elem * cross, groups["ep"])) + local
        f["ep_comm"] = a2a
        bw["ep_comm"] = a2a
    # context parallelism
    if cp > 1:
        kv_w = m.heads * (m.qk_head_dim + (m.v_head_dim if m.is_mla else m.head_dim)) if m.is_mla else 2 * m.kv_dim
        chunk = tokens * kv_w // tp * elem
        if st.cp_exchange == "all_gather":  # K/V gathered before attention, dK/dV reduce-scattered after: exposed
            ag = ctx.coll("all_gather", chunk * cp, groups["cp"])
            f["cp_comm"] = ag
            bw["cp_comm"] = ag + ctx.coll("reduce_scatter", chunk * cp, groups["cp"])
        else:  # ring: cp − 1 steps, each beside the attention block it feeds
            pair = (groups["cp"][0], groups["cp"][1])
            step = ctx.coll("send_recv", chunk, pair)
            ef, xf = _overlap((cp - 1) * step, f_a * (cp - 1) / cp, slow, k_cp)
            eb, xb = _overlap((cp - 1) * 2 * step, b_a * (cp - 1) / cp, slow, k_cp)
            f["cp_comm"], bw["cp_comm"] = ef, eb
            f["forward"] += xf
            bw["backward"] += xb
    # recomputation
    if plan.recompute == "full":
        for k, v in f.items():
            rc["recompute" if k == "forward" else k] = v
    elif plan.recompute == "selective":  # Megatron: the attention core (QKᵀ, softmax, dropout, AV) again
        rc["recompute"] = f_a
    pc = ctx.pc
    if kind == "dense":
        ne, ex = pc.dense_layer / tp, 0.0
    else:
        ne = (pc.attention + pc.norms + pc.moe_router + pc.shared) / tp
        ex = pc.experts * pc.expert / (ep * tp)
    # ZeRO-3 / FSDP: gather weights before forward and backward, reduce-scatter gradients, every micro-batch
    if plan.zero == 3 and (plan.dp or 1) * cp > 1:
        wbytes = elem
        gbytes = 4 if prec in ("bf16", "fp8", "fp32") else 2
        g_ne, g_ex = groups["dp"], groups["edp"]
        ag = ctx.coll("all_gather", ne * wbytes, g_ne) + ctx.coll("all_gather", ex * wbytes, g_ex)
        rs = ctx.coll("reduce_scatter", ne * gbytes, g_ne) + ctx.coll("reduce_scatter", ex * gbytes, g_ex)
        f["fsdp_comm"], xf = _overlap(ag, f["forward"], slow, k_dp)
        bw["fsdp_comm"], xb = _overlap(ag + rs, bw["backward"], slow, k_dp)
        f["forward"] += xf
        bw["backward"] += xb
        if st.sharding == "fsdp2":  # copy-out of each gather and the gradients' chunk_cat, on the compute stream
            out_b, rs_b = 2.0 * wbytes * (ne + ex), (wbytes + gbytes) * (ne + ex)
            f["forward"] += dm.memory_seconds(out_b)
            bw["backward"] += dm.memory_seconds(out_b) + dm.memory_seconds(rs_b)
        if plan.recompute == "full":
            rc["fsdp_comm"] = f["fsdp_comm"]
    act = activation_bytes_per_token(m, kind, tp, sp, str(plan.recompute), elem) * tokens
    act_full = activation_bytes_per_token(m, kind, tp, sp, "none", elem) * tokens
    if st.attention == "unfused":
        scores = attention_score_bytes_per_token(m, tp, m.seq, elem) * tokens
        act_full += scores
        if plan.recompute == "none":
            act += scores
    out = (f, bw, rc, ne, ex, act, act_full)
    ctx._layer[key] = out
    return out


def _mnk(g: Any) -> tuple[int, int, int, int]:
    return g.m, g.n, g.k, g.count


def _stage_costs(ctx: TrainContext, plan: Plan) -> list[StageCost]:
    """Costs of every virtual stage (chunk), index vs = chunk·pp + stage.

    On a homogeneous cluster every stage's groups are priced as stage 0's (they differ by whole
    nodes or by a shift inside one), so identical chunks share one `StageCost`.
    """
    pp, v = plan.pp or 1, plan.vpp or 1
    counts = split_layers(ctx.model.layers, pp * v)
    out: list[StageCost] = []
    start = 0
    casts = load_stack(plan.stack).param_cast == "autocast"  # its gradient accumulation depends on the micro-batches
    pkey = (plan.tp, plan.cp, plan.dp, plan.ep, plan.sp, plan.precision, plan.mbs, plan.recompute, plan.zero,
            plan.offload, pp * v, plan.stack, plan.micro_batches if casts else 0)
    for vs in range(pp * v):
        kinds = ctx.kinds[start:start + counts[vs]]
        start += counts[vs]
        stage = 0 if ctx.homogeneous else vs % pp
        edge = (vs == 0) + 2 * (vs == pp * v - 1)
        key = (pkey, kinds, edge, stage)
        sc = ctx._stage.get(key)
        if sc is None:
            sc = _one_stage(ctx, plan, kinds, edge, stage)
            ctx._stage[key] = sc
        out.append(sc)
    return out


def _one_stage(ctx: TrainContext, plan: Plan, kinds: tuple[str, ...], edge: int, stage: int) -> StageCost:
    m = ctx.model
    tp = plan.tp or 1
    sp = bool(plan.sp) and tp > 1
    prec = str(plan.precision)
    elem = _elem(prec)
    tokens = (plan.mbs or 1) * m.seq // (plan.cp or 1)
    rank = stage * tp * (plan.cp or 1) * (plan.dp or 1)
    groups = _groups(plan, stage)
    sc = StageCost()
    sc.layers = list(kinds)
    for kind in ("dense", "moe"):
        n = kinds.count(kind)
        if not n:
            continue
        f, bw, rc, ne, ex, act, act_full = _layer_cost(ctx, plan, kind, rank, groups)
        for k, t in f.items():
            sc.add("f", k, n * t)
        for k, t in bw.items():
            sc.add("b", k, n * t)
        for k, t in rc.items():
            sc.add("b", k, n * t)
        sc.params += n * ne
        sc.expert_params += n * ex
        sc.act_bytes += n * act
        sc.peak_layer_bytes = max(sc.peak_layer_bytes, act_full)
    dm = device_model(ctx.spec_of(rank), prec)
    if edge & 1:  # embedding lookup (vocab-parallel) and its gradient
        sc.params += m.vocab * m.hidden / tp
        sc.edge_params += m.vocab * m.hidden / tp
        e = tokens * m.hidden * elem
        sc.add("f", "forward", dm.memory_seconds(2 * e))
        sc.add("b", "backward", dm.memory_seconds(4 * e))
        sc.act_bytes += tokens * elem
    if edge & 2:  # final norm, LM head, cross-entropy in fp32
        if not m.tied or not edge & 1:
            sc.params += m.vocab * m.hidden / tp
            sc.edge_params += m.vocab * m.hidden / tp
        g = (tokens, max(m.vocab // tp, 1), m.hidden)
        sc.add("f", "forward", dm.gemm_seconds(*g) + dm.memory_seconds(3 * 4 * tokens * g[1]))
        sc.add("b", "backward", dm.gemm_seconds(g[0], g[2], g[1]) + dm.gemm_seconds(g[2], g[1], g[0])
               + dm.memory_seconds(2 * 4 * tokens * g[1]))
        if tp > 1 and sp:
            t = ctx.coll("all_gather", tokens * m.hidden * elem, groups["tp"])
            sc.add("f", "tp_comm", t)
            sc.add("b", "tp_comm", t)
        sc.logits_bytes = tokens * g[1] * (elem + 4)
    st = load_stack(plan.stack)
    if st.param_cast == "autocast" and prec != "fp32" and not _fsdp2_sharded(plan, st):
        # torch.autocast over fp32 parameters, per micro-batch: the forward casts every weight to bf16
        # (read 4, write 2 bytes); the backward casts its bf16 gradient to fp32 (read 2, write 4) and, from
        # the second micro-batch on, adds it to .grad (read 4 + 4, write 4)
        nparam = sc.params + sc.expert_params
        hint = nparam / max(7 * len(kinds), 1) * 6.0  # one weight matrix's cast (7 per layer)
        acc = (plan.micro_batches - 1) / max(plan.micro_batches, 1)
        sc.add("f", "forward", dm.memory_seconds(6.0 * nparam, hint))
        sc.add("b", "backward", dm.memory_seconds(6.0 * nparam, hint) + acc * dm.memory_seconds(12.0 * nparam, 2 * hint))
    spec = ctx.spec_of(rank)
    if st.host != "none" and not spec.is_cpu:  # the host's dispatch of each op (eager PyTorch, DTensor, compiled)
        from workbench.sim.train_host import host_costs, host_seconds

        sc.host_f, sc.host_b = host_seconds(host_costs(spec.model), st.host, tp, sp, len(kinds), bool(edge & 2))
    if plan.offload:  # copies to host during forward, back during backward (exposed beyond compute)
        t = sc.act_bytes / ctx.pcie_Bps(rank)
        sc.add("f", "offload", max(0.0, t - sc.parts_f.get("forward", 0.0)))
        sc.add("b", "offload", max(0.0, t - sc.parts_b.get("backward", 0.0)))
    return sc


def _fsdp2_sharded(plan: Plan, st: Stack) -> bool:
    """True where torch's FSDP2 shards this plan's parameters (its mixed-precision policy casts them)."""
    return st.sharding == "fsdp2" and (plan.zero or 0) >= 1 and (plan.dp or 1) * (plan.cp or 1) > 1


def _memory(ctx: TrainContext, plan: Plan, costs: list[StageCost], stage: int, held: int) -> dict[str, float]:
    """Bytes per category on a stage's representative rank at its peak (`held`: chunk activations in flight)."""
    pp, v, tp = plan.pp or 1, plan.vpp or 1, plan.tp or 1
    dp, cp, ep = plan.dp or 1, plan.cp or 1, plan.ep or 1
    prec = str(plan.precision)
    mine = [costs[c * pp + stage] for c in range(v)]
    ne = sum(c.params for c in mine)
    ex = sum(c.expert_params for c in mine)
    shard_ne, shard_ex = dp * cp, max(dp * cp // ep, 1)
    z = plan.zero or 0
    w_b = {"fp32": 4.0, "fp8": 3.0}.get(prec, 2.0)  # fp8: bf16 weights + an fp8 copy
    g_b = 4.0
    o_b = 8.0 if prec == "fp32" else 12.0  # Adam m, v (+ fp32 master copy for mixed precision)
    if load_stack(plan.stack).schedule == "dualpipe":  # two copies of the stage's parameters (DeepSeek-V3 Table 2)
        ne, ex = 2 * ne, 2 * ex
    weights = ne * w_b / (shard_ne if z >= 3 else 1) + ex * w_b / (shard_ex if z >= 3 else 1)
    grads = ne * g_b / (shard_ne if z >= 2 else 1) + ex * g_b / (shard_ex if z >= 2 else 1)
    optim = ne * o_b / (shard_ne if z >= 1 else 1) + ex * o_b / (shard_ex if z >= 1 else 1)
    per_chunk = max(c.act_bytes for c in mine)
    if plan.offload:
        held = min(held, 2)
    acts = per_chunk * held
    if plan.recompute == "full":
        acts += max(c.peak_layer_bytes for c in mine)
    acts += max(c.logits_bytes for c in mine)
    elem = _elem(prec)
    tokens = (plan.mbs or 1) * ctx.model.seq // cp
    buffers = 0.0
    if pp > 1:
        buffers += 2 * tokens * ctx.model.hidden * elem / (tp if plan.sp else 1)
    if tp > 1:
        buffers += tokens * ctx.model.hidden * elem  # the all-gathered sequence-parallel input
    if z >= 3:
        lay = max(c.params / max(len(c.layers), 1) for c in mine) + max(
            c.expert_params / max(len(c.layers), 1) for c in mine)
        buffers += 2 * lay * w_b  # the gathered layer and the prefetched next one
    return {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "buffers": buffers}


def _stage_sync_costs(ctx: TrainContext, plan: Plan, costs: list[StageCost], s: int) -> tuple[np.ndarray, float, float, float]:
    """(gradient sync seconds per chunk of the stage, tied-embedding all-reduce, optimizer, param all-gather)."""
    m = ctx.model
    pp, v, tp, cp, dp = plan.pp or 1, plan.vpp or 1, plan.tp or 1, plan.cp or 1, plan.dp or 1
    prec = str(plan.precision)
    z = plan.zero or 0
    g_bytes = 4 if prec in ("bf16", "fp8", "fp32") else 2
    groups = _groups(plan, 0 if ctx.homogeneous else s)
    rank = groups["tp"][0]
    mine = [costs[c * pp + s] for c in range(v)]
    ne = sum(c.params for c in mine)
    ex = sum(c.expert_params for c in mine)
    sync = np.zeros(v)
    if z < 3 and dp * cp > 1:
        op = "all_reduce" if z == 0 else "reduce_scatter"
        for i, c in enumerate(mine):  # one bucket per layer
            nl = max(len(c.layers), 1)
            sync[i] = nl * (ctx.coll(op, c.params / nl * g_bytes, groups["dp"])
                            + ctx.coll(op, c.expert_params / nl * g_bytes, groups["edp"]))
    emb = 0.0
    if m.tied and pp > 1 and s in (0, pp - 1):
        emb = ctx.coll("all_reduce", m.vocab * m.hidden / tp * g_bytes, (0, (pp - 1) * tp * cp * dp))
    shard = dp * cp if z >= 1 else 1
    eshard = max(dp * cp // (plan.ep or 1), 1) if z >= 1 else 1
    local = ne / shard + ex / eshard
    opt = device_model(ctx.spec_of(rank), prec).memory_seconds(local * (28 if prec == "fp32" else 30), 1e9)
    ag = 0.0
    if z in (1, 2) and dp * cp > 1:
        elem = _elem(prec)
        ag = ctx.coll("all_gather", ne * elem, groups["dp"]) + ctx.coll("all_gather", ex * elem, groups["edp"])
    return sync, emb, opt, ag


def _param_gather(ctx: TrainContext, plan: Plan, stk: Stack, costs: list[StageCost], s: int, ag: float,
                  slow: float) -> float:
    """Seconds a step spends on the ZeRO-1/2 parameter all-gather of stage `s` (`ag` seconds alone).

    Megatron: after the optimizer, beside the next step's first forward (exposed beyond it; the forward it
    overlaps slowed by the measured interference). FSDP2: each block's gather before its forward, the root
    unit's and the first block's exposed, the rest beside the forward (stretched, slowing it), plus the
    memory-bound copies on the compute stream (copy-out, gradient cast + chunk_cat) and the copy-in
    (cast + pack of the local shard) on the gather's stream.
    """
    pp, v = plan.pp or 1, plan.vpp or 1
    dp_group = _groups(plan, 0 if ctx.homogeneous else s)["dp"]
    k = ctx.stretch(s * (plan.tp or 1) * (plan.cp or 1) * (plan.dp or 1), stk, dp_group)
    mine = [costs[c * pp + s] for c in range(v)]
    fwd = sum(c.fwd for c in mine)
    if stk.sharding != "fsdp2":
        e, x = _overlap(ag, costs[s].fwd, slow, k)
        return e + x
    prec = str(plan.precision)
    elem = _elem(prec)
    n = sum(c.params + c.expert_params for c in mine)
    first = mine[0]
    nl = max(len(first.layers), 1)
    unit = first.edge_params + (first.params + first.expert_params - first.edge_params) / nl
    exposed = min(ag, ctx.coll("all_gather", unit * elem, dp_group))
    rank = dp_group[0]
    dm = device_model(ctx.spec_of(rank), prec)
    w = len(dp_group)
    cast = 4.0 + elem if prec != "fp32" else 0.0  # fp32 shard → bf16 (read 4, write 2); none in fp32
    b_in = (cast + 2 * elem) * n / w  # + the pack into the gather's input (read, write)
    copy_in = dm.memory_seconds(b_in, b_in / nl)  # one block's copy-in per kernel
    e, x = _overlap(ag - exposed + copy_in, fwd, slow, k)
    g_bytes = 4.0
    b_out, b_rs = 2.0 * elem * n, (elem + g_bytes) * n
    copies = dm.memory_seconds(b_out, b_out / nl) + dm.memory_seconds(b_rs, b_rs / nl)
    return exposed + e + x + copies


def _dualpipe_pairs(costs: list[StageCost], fdur: np.ndarray, bdur: np.ndarray, fsend: np.ndarray, bsend: np.ndarray,
                    slow: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DualPipe's overlapped forward+backward pair per stage: (forward without its all-to-all, backward
    + the communication the pair's compute could not hide + the slowdown of the compute it overlapped,
    exposed communication, that slowdown)."""
    ep_f = np.array([c.parts_f.get("ep_comm", 0.0) for c in costs])
    ep_b = np.array([c.parts_b.get("ep_comm", 0.0) for c in costs])
    comm = ep_f + ep_b + fsend + bsend
    compute = fdur + bdur - ep_f - ep_b
    exposed = np.maximum(comm - compute, 0.0)
    extra = slow * np.minimum(comm, compute)
    return fdur - ep_f, bdur - ep_b + exposed + extra, exposed, extra


_DEFAULTED = ("sp", "vpp", "ep", "cp", "zero", "recompute", "mbs", "precision", "offload", "stack")


def _fill_defaults(plan: Plan) -> Plan:
    if all(getattr(plan, f) is not None for f in _DEFAULTED):  # the search's plans: nothing to fill, no copy
        return plan
    return plan.with_defaults(sp=True, vpp=1, ep=1, cp=1, zero=1, recompute="none", mbs=1, precision="bf16",
                              offload=False, stack=DEFAULT_STACK)


def _stack_problem(plan: Plan, st: Stack) -> str | None:
    if st.schedule == "dualpipe":
        if (plan.pp or 1) % 2:
            return f"plan.pp: DualPipe (stack {st.name}) needs an even number of stages, got pp={plan.pp}"
        if (plan.vpp or 1) != 1:
            return f"plan.vpp: DualPipe (stack {st.name}) runs two chunks per stage itself; use vpp=1, got {plan.vpp}"
        if plan.micro_batches < 2 * (plan.pp or 1):
            return (f"plan.gbs: DualPipe (stack {st.name}) needs at least 2·pp = {2 * (plan.pp or 1)} micro-batches, "
                    f"got {plan.micro_batches}")
    return None


def evaluate(cluster: Cluster | TrainContext, model: ModelSpec | None = None, plan: Plan | None = None,
             *, detail: bool = False, check_fit: bool = False,
             skip_unfit: bool = False) -> TrainEstimate | tuple[TrainEstimate, dict[str, Any]]:
    """Metrics of one complete plan (raises `WorkbenchError` naming the problem if the plan is invalid).

    With `check_fit` a plan that does not fit in memory raises too; with `skip_unfit` (search) its
    timing is not simulated (NaN). With `detail` also returns the schedule arrays used to draw events.
    """
    ctx = cluster if isinstance(cluster, TrainContext) else TrainContext(cluster, model)  # type: ignore[arg-type]
    assert plan is not None
    plan = _fill_defaults(plan)
    why = problem(plan, ctx.world, ctx.node_gpus, ctx.model, ctx.precisions())
    if why:
        raise WorkbenchError(why)
    stk = load_stack(plan.stack)
    why = _stack_problem(plan, stk)
    if why:
        raise WorkbenchError(why)
    if plan.offload and ctx.is_cpu:
        raise WorkbenchError("plan.offload: CPU ranks already keep activations in host memory (use offload=0)")
    m = ctx.model
    pp, v, tp, cp, dp = plan.pp or 1, plan.vpp or 1, plan.tp or 1, plan.cp or 1, plan.dp or 1
    nmb = plan.micro_batches
    prec = str(plan.precision)
    elem = _elem(prec)
    costs = _stage_costs(ctx, plan)
    # capacity and memory first: cheap, and search rejects most plans here (vectorised over stages)
    cls_key: dict[tuple[int, ...], int] = {}
    cls = np.empty(pp, dtype=np.int64)
    statics: list[dict[str, float]] = []
    ids = [id(c) for c in costs]
    for st in range(pp):
        key = tuple(ids[st::pp])
        k = cls_key.get(key)
        if k is None:
            k = cls_key[key] = len(statics)
            statics.append(_memory(ctx, plan, costs, st, 1))
        cls[st] = k
    held = in_flight_stages(pp, v, nmb)
    if stk.schedule == "dualpipe":  # DeepSeek-V3 Table 2: PP + 1 micro-batches' activations on every device
        held = np.full(pp, min(pp + 1, nmb))
    if plan.offload:
        held = np.minimum(held, 2)
    act = np.array([c.act_bytes for c in costs]).reshape(v, pp).max(axis=0)
    static_total = np.array([sum(d.values()) for d in statics])
    totals = static_total[cls] + act * (held - 1)
    cap = min(ctx.spec_of(s * tp * cp * dp).memory_GB for s in (range(pp) if not ctx.homogeneous else [0])) * 1e9
    worst = int(np.argmax(totals))

    def mem_of(st: int) -> dict[str, float]:
        d = statics[int(cls[st])]
        return {**d, "activations": d["activations"] + float(act[st] * (held[st] - 1))}

    fits = bool(totals[worst] <= cap)
    if check_fit and not fits:
        raise WorkbenchError(f"plan: does not fit in memory: stage {worst} needs {totals[worst] / GiB:.1f} GiB per GPU "
                             f"of {cap / GiB:.1f} GiB ({', '.join(f'{k} {x / GiB:.1f}' for k, x in mem_of(worst).items())})"
                             "; try more pp/tp, zero=3, recompute=full or a smaller mbs")
    if skip_unfit and not fits:
        nan = float("nan")
        return TrainEstimate(plan=plan, step_seconds=nan, tokens_per_s=nan, tflops_per_gpu=nan, mfu=nan,
                             memory=mem_of(worst), capacity=cap, fits=False, breakdown={}, binding_stage=worst,
                             model_flops=nan, hardware_flops=nan)
    # pipeline sends (without SP, Megatron's scatter/gather sends 1/tp and all-gathers it over NVLink)
    tokens = (plan.mbs or 1) * m.seq // cp
    full_act = tokens * m.hidden * elem
    split = tp > 1 and (bool(plan.sp) or stk.p2p_scatter_gather)
    send_bytes = full_act / (tp if split else 1)
    pv = pp * v
    fsend = np.zeros(pv)
    bsend = np.zeros(pv)
    regather = ctx.coll("all_gather", full_act, tuple(range(tp))) if (split and not plan.sp) else 0.0
    if pp > 1 and ctx.homogeneous:
        fsend[:] = bsend[:] = ctx.coll("send_recv", send_bytes, (0, tp * cp * dp)) + regather
    elif pp > 1:
        for vs in range(pv):
            s, s2 = vs % pp, (vs + 1) % pp
            r1, r2 = s * tp * cp * dp, s2 * tp * cp * dp
            t = ctx.coll("send_recv", send_bytes, (r1, r2)) + regather
            fsend[vs] = t
            bsend[(vs + 1) % pv] = t
    fdur = np.array([c.fwd for c in costs])
    bdur = np.array([c.bwd for c in costs])
    # Megatron's 1F1B sends with a blocking batched isend/irecv (the sender waits); the interleaved schedule
    # overlaps them when the stack does (overlap_p2p_comm). A blocking send occupies the sending stage.
    blocking = pp > 1 and stk.schedule == "1f1b" and (v == 1 or not stk.p2p_overlap)
    fadd = np.zeros(pv)
    badd = np.zeros(pv)
    if blocking:
        fadd[:-1] = fsend[:-1]
        badd[1:] = bsend[1:]
        fdur, bdur = fdur + fadd, bdur + badd
        fsend, bsend = np.zeros(pv), np.zeros(pv)
    if stk.schedule == "dualpipe":
        # DeepSeek-V3 s3.2.1 / Table 2: a forward and a backward chunk of two micro-batches run as one
        # overlapped pair (the EP all-to-all and PP sends hide behind the other chunk's compute, on SMs
        # reserved for communication); bubble (PP/2 − 1)(F&B + B − 3W) with B ≈ W ≈ b/2 → (PP/2 − 1)·F
        fdur, bdur, dp_exposed, dp_extra = _dualpipe_pairs(costs, fdur, bdur, fsend, bsend, ctx.slowdown(0, stk))
        per_mb = fdur + bdur
        total = float(np.max(per_mb) * nmb + (pp / 2 - 1) * np.max(fdur))
        stage_end = np.full(pp, total)
        last_be = np.full(pv, total)
        last_bs = total - bdur
    else:
        stage_end, last_bs, last_be = pipeline_times(pp, v, nmb, fdur, bdur, fsend, bsend, exact=detail)
    # data-parallel gradient sync (bucketed per layer, overlapped with the last backward), optimizer, param gather
    sync_cache: dict[tuple[int, bool], tuple[np.ndarray, float, float, float]] = {}
    sync = np.zeros((v, pp))
    emb = np.zeros(pp)
    opt = np.zeros(pp)
    ag = np.zeros(pp)
    for st in range(pp):
        key2 = (int(cls[st]) if ctx.homogeneous else st, st in (0, pp - 1))
        hit = sync_cache.get(key2)
        if hit is None:
            hit = sync_cache[key2] = _stage_sync_costs(ctx, plan, costs, st)
        sync[:, st], emb[st], opt[st], ag[st] = hit
    stream_end = np.zeros(pp)
    # beside the backward the buckets last k_dp times longer (measured bus-bandwidth loss beside a GEMM)
    k_dp = ctx.stretch(0, stk, _groups(plan, 0)["dp"]) if stk.dp_overlap else 1.0
    if sync.any():
        nl = np.array([max(len(c.layers), 1) for c in costs], dtype=float).reshape(v, pp)
        width = int(nl.max())
        j = np.arange(1, width + 1, dtype=float)[None, :, None]  # (1, width, 1)
        bs = last_bs.reshape(v, 1, pp)
        be = last_be.reshape(v, 1, pp)
        valid = j <= nl[:, None, :]
        ready = np.where(valid, bs + j / nl[:, None, :] * (be - bs), -np.inf).reshape(v * width, pp)
        dur = np.where(valid, (k_dp * sync / nl)[:, None, :], 0.0).reshape(v * width, pp)
        order = np.argsort(ready, axis=0, kind="stable")
        ready = np.take_along_axis(ready, order, axis=0)
        dur = np.take_along_axis(dur, order, axis=0)
        suffix = np.cumsum(dur[::-1], axis=0)[::-1]  # work still queued from bucket k on
        stream_end = np.max(ready + suffix, axis=0)  # single comm stream: max_k(ready_k + remaining work)
    slow0 = ctx.slowdown(0, stk)
    if stk.dp_overlap:
        beside = np.maximum(0.0, stream_end - stage_end)  # queued work left when the backward ends (stretched s)
        # what is left finishes alone, at full speed; the part that ran beside the backward slowed it
        dp_tail = beside / k_dp + slow0 * np.maximum(k_dp * sync.sum(axis=0) - beside, 0.0)
    else:  # local DDP: the gradients are reduced after the backward pass, nothing overlaps
        dp_tail = sync.sum(axis=0)
    gather = np.zeros(pp)
    for st in range(pp):
        if ag[st] > 0:
            gather[st] = _param_gather(ctx, plan, stk, costs, st, float(ag[st]), slow0)
    step_by_stage = stage_end + dp_tail + emb + opt + gather
    host_extra = np.zeros(pp)
    if stk.host != "none" and stk.schedule != "dualpipe":
        from workbench.sim.train_host import host_bound

        for st in range(pp):  # the host runs ahead of the GPU until the step's end; bound by its issue time
            chunks = [costs[c * pp + st] for c in range(v)]
            if not any(c.host_f or c.host_b for c in chunks):
                continue
            segs = [seg for c in range(v) for seg in ((chunks[c].host_f, float(fdur[c * pp + st])),
                                                      (chunks[c].host_b, float(bdur[c * pp + st])))] * nmb
            tail = float(dp_tail[st] + emb[st] + opt[st] + gather[st])
            bound = host_bound(segs + [(0.0, tail)])
            host_extra[st] = max(0.0, bound - float(step_by_stage[st]))
        step_by_stage = step_by_stage + host_extra
    tails = list(zip(dp_tail.tolist(), emb.tolist(), opt.tolist(), gather.tolist()))
    crit = int(np.argmax(step_by_stage))
    step = float(step_by_stage[crit])
    # breakdown on the critical stage: busy parts, the idle rest of its pipeline is the bubble
    bd = dict.fromkeys(BREAKDOWN, 0.0)
    for c in range(v):
        sc = costs[c * pp + crit]
        for part, t in sc.parts_f.items():
            bd[part] += t * nmb
        for part, t in sc.parts_b.items():
            bd[part] += t * nmb
    if blocking:
        bd["pp_comm"] = nmb * float(sum(fadd[c * pp + crit] + badd[c * pp + crit] for c in range(v)))
    if stk.schedule == "dualpipe":
        bd["ep_comm"] = nmb * float(dp_exposed[crit])
        bd["backward"] += nmb * float(dp_extra[crit])
    busy = sum(bd.values())
    bd["pipeline_bubble"] = max(0.0, float(stage_end[crit]) - busy)
    bd["dp_comm"], bd["embedding_sync"], bd["optimizer"], bd["param_gather"] = tails[crit]
    bd["host_bound"] = float(host_extra[crit])  # the GPU waiting for the host's dispatch beyond its own work
    tokens_step = (plan.gbs or 0) * m.seq
    mf = model_flops_per_token(m) * tokens_step
    hf = mf
    if plan.recompute == "full":
        hf += mf / 3 - 2.0 * m.vocab * m.hidden * tokens_step
    elif plan.recompute == "selective":  # the attention core's forward again
        hf += m.layers * attention_core_flops(m, 1, m.seq, m.heads) * tokens_step
    peak = ctx.spec_of(0).peak(prec if prec in dict(ctx.spec_of(0).peak_tflops) else "bf16") * 1e12
    est = TrainEstimate(
        plan=plan, step_seconds=step, tokens_per_s=tokens_step / step, tflops_per_gpu=hf / step / ctx.world / 1e12,
        mfu=mf / step / ctx.world / peak, memory=mem_of(worst), capacity=cap, fits=fits,
        breakdown={k: round(float(x), 9) for k, x in bd.items()}, binding_stage=worst, model_flops=mf, hardware_flops=hf,
        memory_by_stage=tuple(mem_of(st) for st in range(pp)) if detail else (),
    )
    if detail:
        return est, {"costs": costs, "fsend": fsend, "bsend": bsend, "tails": tails, "ctx": ctx, "fdur": fdur,
                     "bdur": bdur, "blocking": fadd + badd if blocking else None, "host_extra": host_extra}
    return est


def simulate_job(job: Any) -> Any:
    """Simulate one training step of a `Job` with a complete plan; a `Result` with events of each
    stage's representative rank (`RankLayout.first_rank`), placed in the one rank order.

    `metrics` holds the JSON keys of `workbench simulate train --json`. Partial plans are completed
    by the plan search above this module (`workbench.simulate` / `workbench.plan.search.resolve_plan`).
    Events: forward/backward compute per (chunk, micro-batch) with their exposed TP/EP/CP
    collectives after them, the pipeline `send_recv`s, the data-parallel `all_reduce`/
    `reduce_scatter` buckets, `optimizer` and the parameter `all_gather`.
    """
    import pandas as pd

    from workbench.core.layout import RankLayout
    from workbench.result import Result

    ctx = TrainContext(job.cluster, job.model)
    p = complete_plan(ctx, job.plan)
    est, det = evaluate(ctx, None, p, detail=True)  # type: ignore[misc]
    events = _events(ctx, est, det)
    layout = RankLayout.of(p)
    mem_rows = []
    for s, mem in enumerate(est.memory_by_stage):
        rank = layout.first_rank(s)
        for cat, b in mem.items():
            mem_rows.append({"rank": rank, "category": cat, "bytes": b, "time": 0.0, "device": ctx.gpus[rank],
                             "stage": s})
    from dataclasses import replace

    return Result(events=events, memory=pd.DataFrame(mem_rows), metrics=est.to_metrics(), source="sim",
                  fidelity="closed-form", job=replace(job, plan=p))


def complete_plan(ctx: TrainContext, plan: Plan) -> Plan:
    """The plan with the defaults the simulator assumes; a missing degree or batch is an error here
    (the plan search above the simulator chooses those)."""
    from workbench.plan.spec import parse_plan

    plan = parse_plan(plan).with_defaults(precision="bf16")
    if not ctx.model.is_moe:
        plan = plan.with_defaults(ep=1)
    if plan.sp is None and plan.tp is not None:
        plan = plan.with_defaults(sp=plan.tp > 1)
    plan = plan.with_defaults(cp=1, vpp=1, zero=1, recompute="none", mbs=1, offload=False, stack=DEFAULT_STACK)
    missing = plan.missing
    if missing:
        raise WorkbenchError(f"plan.{missing[0]}: not set; give it, or let workbench.simulate search for it")
    return plan


_COMM_OPS = {"tp_comm": ("all_gather", "reduce_scatter"), "ep_comm": ("all_to_all",), "cp_comm": ("send_recv",),
             "fsdp_comm": ("all_gather", "reduce_scatter"), "offload": ("offload",)}


def _events(ctx: TrainContext, est: TrainEstimate, det: dict[str, Any]) -> Any:
    import pandas as pd

    from workbench.sim.train_schedule import run_schedule

    p = est.plan
    pp, v, tp, cp, dp = p.pp or 1, p.vpp or 1, p.tp or 1, p.cp or 1, p.dp or 1
    m = p.micro_batches
    costs: list[StageCost] = det["costs"]
    fdur, bdur = det["fdur"], det["bdur"]
    dual = load_stack(p.stack).schedule == "dualpipe"
    if dual:
        # DualPipe's metrics are closed form; its events are laid out to match them: after the (pp/2 − 1)
        # forwards of the warm-up, each stage runs its forward/backward pairs back to back
        warm = (pp / 2 - 1) * float(np.max(fdur))
        i = np.arange(m, dtype=float)[None, :]
        fstart = warm + i * (fdur + bdur)[:, None]
        fend = fstart + fdur[:, None]
        bstart, bend = fend, fend + bdur[:, None]
        clock = bend[:, -1].copy()
    else:
        fstart, fend, bstart, bend, clock = run_schedule(pp, v, m, fdur, bdur, det["fsend"], det["bsend"])
    rows: list[dict[str, Any]] = []
    tp_ops = ("all_gather", "reduce_scatter") if (p.sp and tp > 1) else ("all_reduce",)
    elem = _elem(str(p.precision))
    for vs, sc in enumerate(costs):
        s, chunk = vs % pp, vs // pp
        rank = s * tp * cp * dp
        dev = ctx.gpus[rank]
        for which, starts, parts in (("forward", fstart[vs], sc.parts_f), ("backward", bstart[vs], sc.parts_b)):
            comp = parts.get(which, 0.0) + parts.get("recompute", 0.0)
            for mb in range(m):
                t = float(starts[mb])
                base = {"rank": rank, "device": dev, "stage": s, "chunk": chunk, "microbatch": mb, "links": ()}
                rows.append({**base, "kind": "compute", "op": which, "bytes": 0, "start": t, "end": t + comp,
                             "group": ""})
                t += comp
                for part in ("tp_comm", "ep_comm", "cp_comm", "fsdp_comm", "offload"):
                    dur = parts.get(part, 0.0)
                    if dur <= 0 or (dual and part == "ep_comm"):  # DualPipe: beside the paired chunk
                        continue
                    ops = tp_ops if part == "tp_comm" else _COMM_OPS[part]
                    kind = "transfer" if part in ("cp_comm", "offload") else "collective"
                    for op in ops:
                        d = dur / len(ops)
                        rows.append({**base, "kind": kind, "op": op, "bytes": 0, "start": t, "end": t + d,
                                     "group": part.split("_")[0]})
                        t += d
                send = det["fsend"][vs] if which == "forward" else det["bsend"][vs]
                blocked = 0.0
                if det["blocking"] is not None:  # a blocking send: the op's last part
                    fb = det["blocking"]
                    blocked = send = float(fb[vs]) if which == "forward" and vs < pp * v - 1 else (
                        float(fb[vs]) if which == "backward" and vs > 0 else 0.0)
                last = (which == "forward" and vs == pp * v - 1) or (which == "backward" and vs == 0)
                if pp > 1 and not last and send > 0:
                    end = float((fend if which == "forward" else bend)[vs, mb]) - blocked
                    nbytes = (p.mbs or 1) * ctx.model.seq // cp * ctx.model.hidden * elem // (tp if p.sp else 1)
                    rows.append({**base, "kind": "transfer", "op": "send_recv", "bytes": nbytes, "start": end,
                                 "end": end + send, "group": "pp"})
    for s in range(pp):
        rank = s * tp * cp * dp
        dev = ctx.gpus[rank]
        dp_tail, emb, opt, gather = det["tails"][s]
        t_end = float(clock[s])
        base = {"rank": rank, "device": dev, "stage": s, "chunk": -1, "microbatch": -1, "links": ()}
        ne = sum(costs[c * pp + s].params for c in range(v))
        if dp * cp > 1 and (p.zero or 0) < 3:
            op = "all_reduce" if p.zero == 0 else "reduce_scatter"
            b0 = float(min(bstart[c * pp + s, m - 1] for c in range(v)))
            rows.append({**base, "kind": "collective", "op": op, "bytes": int(ne * 4), "start": b0,
                         "end": t_end + dp_tail, "group": "dp"})
        t = t_end + dp_tail
        if emb > 0:
            rows.append({**base, "kind": "collective", "op": "all_reduce", "bytes": 0, "start": t, "end": t + emb,
                         "group": "embedding"})
            t += emb
        rows.append({**base, "kind": "compute", "op": "optimizer", "bytes": 0, "start": t, "end": t + opt,
                     "group": ""})
        t += opt
        if gather > 0:
            rows.append({**base, "kind": "collective", "op": "all_gather", "bytes": int(ne * elem), "start": t,
                         "end": t + gather, "group": "dp"})
            t += gather
        wait = float(det["host_extra"][s]) if "host_extra" in det else 0.0
        if wait > 0:  # the GPU waiting for the host's dispatch, in all (spread over the step in reality)
            rows.append({**base, "kind": "idle", "op": "host_dispatch", "bytes": 0, "start": t, "end": t + wait,
                         "group": ""})
    return pd.DataFrame(rows)
