"""Step time and memory of one serving worker, from the model's shapes and microbenchmark curves.

A worker is `tp` GPUs (× `pp` stages) running one engine. A step (one scheduler iteration) is priced
from four aggregates of its batch — tokens `m`, prefill attention work, decode KV tokens read, and
sequences sampled — as

    stage(m) = Σ_layers [ GEMMs(m) + attention + memory-bound ops + TP all-reduce + EP all-to-all ]
             + LM head and sampling (last stage),
    step     = pp · stage(m / pp) + (pp − 1) · send(m / pp) + launch/scheduler overhead

(pp micro-batches in flight, as vLLM's pipeline engines run them). The parts come from:
- GEMMs: `workbench.sim.compute` (the measured GEMM grid), floored by the bytes of the weights read
  at the measured small-row GEMM bandwidth (`datasets/serving/attention_h200_measured.csv`,
  `gemm_small_m`): decode GEMMs are weight-bandwidth-bound. MoE: only the experts the step's tokens
  touch are read (expected distinct experts under uniform routing).
- attention: prefill/chunk rows of the same file (TFLOP/s vs work, SDPA flash on an H200);
  `decode_default` rows (bytes of KV read vs time, SDPA with PyTorch's default backend choice); both rescaled to another GPU by its bf16 peak or memory bandwidth
  (a stated assumption for GPUs other than the H200/H100).
- memory-bound ops: `workbench.models.costs.elementwise_bytes_per_token` at the elementwise curve.
- TP all-reduce, EP all-to-all: `workbench.sim.collectives` on the worker's GPUs; PP sends:
  `workbench.sim.p2p`.
- kernel launches: the counted kernels per layer (`datasets/serving/overheads.csv`) each add the
  per-kernel gap measured in a CUDA-graph replay; a decode-only step replays a graph, any other step
  is launched eagerly and takes at least the kernels × the measured eager launch time.
Every table is built once per worker on a log grid of `m` and interpolated (`np.interp`), so a step
costs a few microseconds and many steps can be priced at once (arrays in, arrays out).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd

from workbench.data import read_csv
from workbench.errors import WorkbenchError
from workbench.models.costs import (
    activation_bytes_per_token,
    elementwise_bytes_per_token,
    layer_kinds,
    parameter_count,
)
from workbench.models.spec import ModelSpec
from workbench.serving.plan import ServingPlan
from workbench.topology.catalogue import GPUSpec
from workbench.topology.model import Cluster

ATTN_FILE = "serving/attention_h200_measured.csv"
ATTN_GPU = "H200"
GRID_M = np.unique(np.round(np.geomspace(1, 1 << 17, 48)).astype(np.int64))
GiB = float(1 << 30)


@cache
def _attn_table() -> pd.DataFrame:
    return read_csv(ATTN_FILE)


@cache
def overheads() -> dict[str, float]:
    df = read_csv("serving/overheads.csv")
    return {str(r.parameter): float(r.value) for r in df.itertuples()}


@cache
def launch_seconds() -> tuple[float, float]:
    """(eager, CUDA-graph) seconds per small kernel launch, measured."""
    df = _attn_table()
    eager = float(df[df["op"] == "launch"]["seconds"].median())  # type: ignore[index]
    graph = float(df[df["op"] == "launch_graph"]["seconds"].median())  # type: ignore[index]
    return eager, graph


@cache
def _prefill_curve(head_dim: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(log FLOPs per call, log TFLOP/s) of flash attention on the measuring GPU, for the nearest
    measured head configuration (query heads per GPU 8 or 64; head_dim 64 or 128)."""
    df = _attn_table()
    d = df[df["op"].isin(["prefill", "prefill_chunk"])]  # type: ignore[index]
    hd = 64 if head_dim <= 96 and (d["head_dim"] == 64).any() else 128
    d = d[d["head_dim"] == hd]
    qh = sorted(set(d["q_heads"]), key=lambda h: abs(math.log(h / max(heads, 1))))[0]
    d = d[d["q_heads"] == qh]
    flops = np.where(d["causal"] == 1, 2.0, 4.0) * d["batch"] * d["q_heads"] * d["q_len"] * d["kv_len"] * d["head_dim"]
    order = np.argsort(flops.to_numpy())
    x = np.log(flops.to_numpy()[order])
    y = np.log(d["tflops"].to_numpy()[order])
    return x, np.maximum.accumulate(y)  # more work never runs at a lower rate (smooths the two shapes)


@cache
def _decode_curve(kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(log bytes of KV read per call, log GB/s) of decode attention on the measuring GPU, from rows whose
    time is not bound by the eager call's launch floor (> 3 × the fastest call), for the nearest measured
    KV-head count per GPU. Below the smallest such size the rate is held (the kernel's launch gap is
    counted with the layer's other kernels)."""
    df = _attn_table()
    op = "decode_default" if (df["op"] == "decode_default").any() else "decode"
    d = df[df["op"] == op]
    kh = sorted(set(d["kv_heads"]), key=lambda h: abs(math.log(h / max(kv_heads, 1))))[0]
    d = d[(d["kv_heads"] == kh) & (d["seconds"] > 3 * d["seconds"].min())]  # the eager floor < 1/3 of the time
    nbytes = 4.0 * d["batch"] * d["kv_heads"] * d["kv_len"] * d["head_dim"]
    g = d.assign(nbytes=nbytes).groupby("nbytes")["GBps"].median()
    return np.log(g.index.to_numpy(float)), np.log(g.to_numpy(float))


@cache
def _small_gemm_curve() -> tuple[np.ndarray, np.ndarray]:
    """(log weight bytes, fraction of the measuring GPU's memory bandwidth) of bf16 GEMMs with ≤ 16 rows."""
    from workbench.topology.catalogue import gpu

    df = _attn_table()
    d = df[(df["op"] == "gemm_small_m") & (df["batch"] <= 16)]  # type: ignore[index]
    w = 2.0 * d["q_len"] * d["kv_len"]
    g = d.assign(w=w).groupby("w")["GBps"].median()
    return np.log(g.index.to_numpy(float)), g.to_numpy(float) / gpu(ATTN_GPU).memory_GBps


@cache
def precision_bytes(fmt: str) -> tuple[float, str]:
    """(bytes per element, compute precision) of a number format (`datasets/precisions.csv`)."""
    df = read_csv("precisions.csv")
    row = df[df["precision"] == fmt]
    if row.empty:
        raise WorkbenchError(f"plan.precision: unknown number format {fmt!r}")
    return float(row["bytes"].iloc[0]), str(row["compute"].iloc[0])


def _check_format(spec: GPUSpec, fmt: str, field: str) -> None:
    problem = _format_problem(spec, fmt)
    if problem:
        raise WorkbenchError(f"{field}: {problem}")


@cache
def _format_problem(spec: GPUSpec, fmt: str) -> str:
    df = read_csv("precisions.csv")
    archs = str(df[df["precision"] == fmt]["archs"].iloc[0]).split("|")
    gdf = read_csv("gpus.csv")
    arch = gdf[gdf["model"] == spec.model]["arch"]
    if not spec.is_cpu and not arch.empty and str(arch.iloc[0]) not in archs:
        return (f"{spec.model} ({arch.iloc[0]}) has no {fmt} support (architectures with it: {', '.join(archs)}); "
                "choose another format")
    return ""


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one worker and what is left for the KV cache."""

    capacity: float
    weights: float
    activations: float
    reserve: float
    kv_pool: float
    kv_bytes_per_token: float  # per GPU, all layers of its stage
    kv_tokens: int  # tokens the worker's KV pool holds (all its attention-DP groups)
    blocks: int

    @property
    def fits(self) -> bool:
        return self.kv_pool > 0 and self.blocks > 0


class WorkerCost:
    """Prices steps of one worker role (`colocated`, `prefill`, `decode`) of a serving plan."""

    def __init__(self, cluster: Cluster, model: ModelSpec, plan: ServingPlan, role: str = "colocated",
                 devices: list[str] | None = None) -> None:
        from workbench.sim.compute import device_model

        self.model, self.plan, self.role = model, plan, role
        tp, ep = plan.worker(role)
        pp = plan.pp if role == "colocated" else 1
        self.tp, self.ep, self.pp, self.dp = tp, ep, pp, plan.dp
        self._check_shapes()
        gpus = devices or cluster.gpus[: tp * pp]
        if len(gpus) < tp * pp:
            raise WorkbenchError(f"plan.tp: a {role} worker needs {tp * pp} GPUs; the cluster has {cluster.num_gpus}")
        self.devices = gpus
        self.cluster = cluster
        self.spec = cluster.gpu_spec(gpus[0])
        _check_format(self.spec, plan.precision, "plan.precision")
        _check_format(self.spec, plan.kv_format(), "plan.kv_precision")
        self.wbytes, compute = precision_bytes(plan.precision)
        self.kvbytes, _ = precision_bytes(plan.kv_format())
        if self.spec.is_cpu:
            compute = "fp32"
        try:
            self.dev = device_model(self.spec, compute)
        except WorkbenchError as exc:
            raise WorkbenchError(f"plan.precision: {exc}") from None
        self.act_bytes = 4.0 if compute == "fp32" else 2.0
        self.kinds = layer_kinds(model)
        self.layers_per_stage = math.ceil(model.layers / pp)
        self.n_dense = sum(1 for k in self.kinds if k == "dense") / pp
        self.n_moe = sum(1 for k in self.kinds if k == "moe") / pp
        ov = overheads()
        self.kernels = ov["kernels_per_dense_layer"] * self.n_dense + ov["kernels_per_moe_layer"] * self.n_moe
        self.memory = self._memory(ov["reserve_GiB"] * GiB)
        self._tables()

    # ------------------------------------------------------------ checks and memory
    def _check_shapes(self) -> None:
        m, tp, ep, dp = self.model, self.tp, self.ep, self.dp
        att_tp = tp // dp if tp % dp == 0 else 0
        if att_tp == 0:
            raise WorkbenchError(f"plan.dp: attention data parallelism dp={dp} must divide tp={tp}")
        if m.heads % att_tp:
            raise WorkbenchError(f"plan.tp: {att_tp}-way attention tensor parallelism does not divide the model's "
                                 f"{m.heads} heads; choose tp (or tp/dp) among the divisors of {m.heads}")
        if ep > 1 and not m.is_moe:
            raise WorkbenchError(f"plan.ep: {m.name} has no experts; set ep=1")
        if m.is_moe and (m.experts % ep or tp % ep):
            raise WorkbenchError(f"plan.ep: ep={ep} must divide the {m.experts} experts and the worker's tp={tp} GPUs")
        if self.pp > m.layers:
            raise WorkbenchError(f"plan.pp: {self.pp} stages for {m.layers} layers; choose pp <= {m.layers}")

    def kv_bytes_per_token_layer(self) -> float:
        """KV bytes one token adds to one layer on one GPU (MLA: the latent, replicated on attention-TP ranks)."""
        m = self.model
        if m.is_mla:
            return (m.kv_lora_rank + m.qk_rope_dim) * self.kvbytes
        att_tp = self.tp // self.dp
        return 2.0 * max(m.kv_heads / att_tp, 1.0) * m.head_dim * self.kvbytes

    def kv_bytes_per_token_model(self) -> float:
        """KV bytes of one token over all layers of the model (what a disaggregated transfer moves)."""
        m = self.model
        per = (m.kv_lora_rank + m.qk_rope_dim) if m.is_mla else 2.0 * m.kv_heads * m.head_dim
        return per * self.kvbytes * m.layers

    def _memory(self, reserve: float) -> Memory:
        m, pc = self.model, parameter_count(self.model)
        tp, pp, dp = self.tp, self.pp, self.dp
        att_tp = tp // dp
        per_layer_dense = pc.attention / att_tp + pc.dense_ffn / tp + pc.norms
        per_layer_moe = pc.attention / att_tp + pc.norms + (pc.moe_router + pc.shared) / tp + pc.experts * pc.expert / tp
        weights = (self.n_dense * per_layer_dense + self.n_moe * per_layer_moe) * self.wbytes
        parts = getattr(self, "embed_parts", None)  # (holds the embedding, holds the LM head) of a placed stage
        if parts is not None:
            emb = pc.embedding * parts[0] + (pc.head or pc.embedding) * parts[1]
        else:
            emb = (pc.embedding + pc.head) if pp == 1 else max(pc.embedding, pc.head)  # first/last stage
        weights += emb / tp * 2.0  # embeddings and LM head stay in bf16
        kind = "moe" if m.is_moe else "dense"
        acts = self.plan.max_tokens * activation_bytes_per_token(m, kind, tp, sp=False, elem=int(self.act_bytes))
        acts += self.plan.max_seqs * m.vocab / tp * 4.0  # fp32 logits of the sampled rows
        cap = self.spec.memory_GB * 1e9
        pool = cap * self.plan.mem_util - weights - acts - reserve
        per_tok = self.kv_bytes_per_token_layer() * self.layers_per_stage
        tokens = int(max(pool, 0.0) // per_tok) * dp if per_tok > 0 else 0
        blocks = tokens // self.plan.block
        return Memory(cap, weights, acts, reserve, pool, per_tok, blocks * self.plan.block, blocks)

    def require_fit(self) -> None:
        mem = self.memory
        if not mem.fits:
            need = (mem.weights + mem.activations + mem.reserve) / GiB
            raise WorkbenchError(
                f"plan: {self.model.name} does not fit a {self.role} worker of {self.tp * self.pp} x {self.spec.model}: "
                f"weights {mem.weights / GiB:.1f} GiB + activations {mem.activations / GiB:.1f} GiB + reserve "
                f"{mem.reserve / GiB:.1f} GiB = {need:.1f} GiB per GPU of {mem.capacity * self.plan.mem_util / GiB:.1f} "
                "GiB usable, leaving no KV cache; raise tp/pp, use precision=fp8, or lower max_tokens/max_seqs")

    # ------------------------------------------------------------ price tables over m
    def _gemm(self, m: int, n: int, k: int, count: int = 1, weights: float | None = None) -> float:
        if m <= 0:
            return 0.0
        t = self.dev.gemm_seconds(max(int(m), 1), max(int(n), 1), max(int(k), 1), int(count))
        wb = (n * k * count * self.wbytes) if weights is None else weights
        nbytes = wb + (m * k + m * n) * self.act_bytes * count
        if self.spec.is_cpu:
            return max(t, nbytes / (self.spec.memory_GBps * 1e9))
        xs, ys = _small_gemm_curve()
        eff = float(np.interp(math.log(max(wb, 1.0)), xs, ys))
        return max(t, nbytes / (self.spec.memory_GBps * 1e9 * eff))

    def _layer_gemm_seconds(self, kind: str, m: int) -> float:
        mod, tp, ep, dp = self.model, self.tp, self.ep, self.dp
        att_tp = tp // dp
        h = mod.hidden
        ma = max(m // dp, 1)  # attention GEMMs: each attention-DP group runs its own tokens
        t = 0.0
        if mod.is_mla:
            qk = mod.qk_nope_dim + mod.qk_rope_dim
            if mod.q_lora_rank:
                t += self._gemm(ma, mod.q_lora_rank, h) + self._gemm(ma, mod.heads * qk // att_tp, mod.q_lora_rank)
            else:
                t += self._gemm(ma, mod.heads * qk // att_tp, h)
            t += self._gemm(ma, mod.kv_lora_rank + mod.qk_rope_dim, h)
            t += self._gemm(ma, mod.heads * (mod.qk_nope_dim + mod.v_head_dim) // att_tp, mod.kv_lora_rank)
            t += self._gemm(ma, h, mod.heads * mod.v_head_dim // att_tp)
        else:
            t += self._gemm(ma, (mod.heads * mod.head_dim + 2 * mod.kv_dim) // att_tp, h)
            t += self._gemm(ma, h, mod.heads * mod.head_dim // att_tp)
        mats = 2 if mod.gated else 1
        if kind == "dense":
            t += self._gemm(m, mats * mod.ffn // tp, h) + self._gemm(m, h, mod.ffn // tp)
            return t
        t += self._gemm(m, mod.experts, h)
        if mod.shared_experts:
            w = mod.shared_experts * mod.expert_ffn
            t += self._gemm(m, mats * w // tp, h) + self._gemm(m, h, w // tp)
        # routed experts: E/ep local experts, each TP-split over tp/ep GPUs; tokens of the whole worker
        local = mod.experts // ep
        inner = tp // ep
        touched = local * (1.0 - (1.0 - mod.top_k / mod.experts) ** m)  # expected distinct local experts hit
        rows = max(m * mod.top_k / mod.experts, 1.0)
        up_n, down_k = mats * mod.expert_ffn // inner, mod.expert_ffn // inner
        cnt = max(int(round(touched)), 1)
        t += self._gemm(int(math.ceil(rows)), up_n, h, cnt, weights=touched * up_n * h * self.wbytes)
        t += self._gemm(int(math.ceil(rows)), h, down_k, cnt, weights=touched * h * down_k * self.wbytes)
        return t

    def _coll(self, op: str, nbytes: float, group: list[str]) -> float:
        if len(group) <= 1 or nbytes <= 0:
            return 0.0
        from workbench.sim.collectives import collective

        return collective(self.cluster, op, int(nbytes), group).seconds

    def _tables(self) -> None:
        mod = self.model
        g = GRID_M.astype(float)
        self.grid = np.log(g)
        dense = np.array([self._layer_gemm_seconds("dense", int(x)) for x in GRID_M]) if self.n_dense else 0 * g
        moe = np.array([self._layer_gemm_seconds("moe", int(x)) for x in GRID_M]) if self.n_moe else 0 * g
        elt = np.array([
            self.n_dense * self.dev.memory_seconds(elementwise_bytes_per_token(mod, "dense", self.tp, sp=False) * x)
            + self.n_moe * self.dev.memory_seconds(elementwise_bytes_per_token(mod, "moe", self.tp, sp=False) * x)
            for x in g])
        tp_group = self.devices[: self.tp]
        att_group = self.devices[: self.tp // self.dp]
        ar_tp = np.array([self._coll("all_reduce", x * mod.hidden * self.act_bytes, tp_group) for x in g])
        ar_att = np.array([self._coll("all_reduce", x / self.dp * mod.hidden * self.act_bytes, att_group) for x in g])
        if self.ep > 1:
            ep_group = self.devices[: self.ep]
            a2a = np.array([2 * self._coll("all_to_all", x * mod.top_k * mod.hidden * self.act_bytes / self.ep,
                                           ep_group) for x in g])
        else:
            a2a = 0 * g
        comm_dense = ar_att + ar_tp  # attention out + FFN out
        comm_moe = ar_att + (a2a if self.ep > 1 else ar_tp)
        if self.ep > 1 and self.ep < self.tp:
            comm_moe = comm_moe + ar_tp
        self.t_layers = (self.n_dense * (dense + comm_dense) + self.n_moe * (moe + comm_moe) + elt)
        self.t_comm = self.n_dense * comm_dense + self.n_moe * comm_moe
        # LM head + sampling for s sampled rows
        self.t_head = np.array([self._gemm(int(x), mod.vocab // self.tp, mod.hidden)
                                + self.dev.memory_seconds(x * mod.vocab / self.tp * 4.0 * 3) for x in g])
        if self.pp > 1:
            from workbench.sim.p2p import transfer_seconds

            a, b = self.devices[0], self.devices[self.tp]
            self.t_send = np.array([transfer_seconds(self.cluster, a, b, int(x * mod.hidden * self.act_bytes))
                                    for x in g])
        else:
            self.t_send = 0 * g
        # attention curves
        heads = mod.heads // (self.tp // self.dp)
        self._pf = _prefill_curve(mod.head_dim if not mod.is_mla else mod.qk_head_dim, heads)
        self._pf_scale = 1.0 if self.spec.is_cpu else self.dev.attn_peak / (self._attn_peak_ref() * 1e12)
        kvh = 1 if mod.is_mla else max(int(mod.kv_heads // (self.tp // self.dp)), 1)
        self._dc = _decode_curve(kvh)
        from workbench.topology.catalogue import gpu

        self._dc_scale = self.spec.memory_GBps / gpu(ATTN_GPU).memory_GBps
        self.attn_heads = heads
        qk = mod.qk_head_dim + (mod.v_head_dim if mod.is_mla else mod.head_dim)
        self.attn_flop_per = 2.0 * heads * qk  # × q_tokens × kv_len, per layer per GPU
        self.launch_eager, self.launch_graph = launch_seconds()
        self._scalar_tables()

    @staticmethod
    def _attn_peak_ref() -> float:
        from workbench.topology.catalogue import gpu

        return gpu(ATTN_GPU).peak("bf16")

    # ------------------------------------------------------------ pricing
    def prefill_attention(self, work: np.ndarray | float) -> np.ndarray:
        """Seconds of flash attention for Σ q_tokens·kv_len = `work` (per attention-DP group) over the stage's layers."""
        w = np.asarray(work, float) / self.dp
        flops = w * self.attn_flop_per
        if self.spec.is_cpu:
            return np.where(flops > 0, flops / self.dev.attn_peak, 0.0) * self.layers_per_stage
        lf = np.log(np.maximum(flops, 1.0))
        rate = np.exp(np.interp(lf, *self._pf)) * 1e12 * self._pf_scale
        return np.where(flops > 0, flops / rate, 0.0) * self.layers_per_stage

    def decode_attention(self, kv_tokens: np.ndarray | float) -> np.ndarray:
        """Seconds of decode attention reading `kv_tokens` cached tokens (per worker) over the stage's layers."""
        b = np.asarray(kv_tokens, float) / self.dp * self.kv_bytes_per_token_layer()
        if self.spec.is_cpu:
            return b / (self.spec.memory_GBps * 1e9) * self.layers_per_stage
        bw = np.exp(np.interp(np.log(np.maximum(b, 1.0)), *self._dc)) * 1e9 * self._dc_scale
        return np.where(b > 0, b / bw, 0.0) * self.layers_per_stage

    def step_seconds(self, tokens: np.ndarray | float, prefill_work: np.ndarray | float,
                     decode_kv: np.ndarray | float, sampled: np.ndarray | float,
                     decode_only: np.ndarray | bool, chunks: np.ndarray | float = 0.0) -> np.ndarray:
        """Seconds of steps (arrays or scalars): `tokens` scheduled, Σ chunk·(context + chunk/2) of prefill
        chunks, KV tokens read by decodes, rows sampled, whether the step is decode-only (CUDA graph), and its
        prefill chunks (the plan's `chunk_us` each, and `prefill_step_us` once where there is one); a step that is not a graph takes at least its kernels' launches plus
        the plan's `eager_us` of host time (overlapping the GPU's work)."""
        m = np.maximum(np.asarray(tokens, float), 1.0)
        pp = self.pp
        lm = np.log(m / pp)
        stage = np.interp(lm, self.grid, self.t_layers)
        stage = stage + self.prefill_attention(np.asarray(prefill_work, float) / pp)
        stage = stage + self.decode_attention(np.asarray(decode_kv, float) / pp)
        head = np.interp(np.log(np.maximum(np.asarray(sampled, float), 1.0) / pp), self.grid, self.t_head)
        gpu = pp * stage + head
        if pp > 1:
            gpu = gpu + (pp - 1) * np.interp(lm, self.grid, self.t_send)
        graph = np.asarray(decode_only, bool) & self.plan.cuda_graph
        n_k = self.kernels * pp
        t = gpu + n_k * self.launch_graph  # back-to-back kernels: the per-kernel gap measured in a graph
        # eager: the host launches each kernel (and spends the plan's `eager_us` beyond the counted ones) while
        # the GPU runs them: the step is the longer of the two
        t = np.where(graph, t, np.maximum(t, n_k * self.launch_eager + self.plan.eager_us * 1e-6))
        sched, seq = self.plan.host(self.role)
        ch = np.asarray(chunks, float)
        return (t + sched * 1e-6 + seq * 1e-6 * np.asarray(sampled, float) + self.plan.chunk_us * 1e-6 * ch
                + self.plan.prefill_step_us * 1e-6 * (ch > 0))

    def comm_seconds(self, tokens: np.ndarray) -> np.ndarray:
        """TP/EP collective seconds in steps of `tokens` (for the events table)."""
        lm = np.log(np.maximum(np.asarray(tokens, float), 1.0) / self.pp)
        return self.pp * np.interp(lm, self.grid, self.t_comm)

    # ------------------------------------------------------------ the scalar path (one step at a time)
    def _scalar_tables(self) -> None:
        self._g = self.grid.tolist()
        self._tl = self.t_layers.tolist()
        self._th = self.t_head.tolist()
        self._ts = (self.t_send if isinstance(self.t_send, np.ndarray) else 0 * self.grid).tolist()
        self._pfx, self._pfy = self._pf[0].tolist(), self._pf[1].tolist()
        self._dcx, self._dcy = self._dc[0].tolist(), self._dc[1].tolist()
        self._kvb = self.kv_bytes_per_token_layer()

    def kernel_params(self) -> np.ndarray:
        """The scalars of the price, as the compiled scheduler loop takes them (`serve_kernel.F_*`)."""
        from workbench.sim import serve_kernel as K

        fp = np.zeros(K.N_F)
        fp[K.F_PP], fp[K.F_DP], fp[K.F_LAYERS] = self.pp, self.dp, self.layers_per_stage
        fp[K.F_FLOP_PER], fp[K.F_PF_SCALE], fp[K.F_KVB] = self.attn_flop_per, self._pf_scale, self._kvb
        fp[K.F_DC_SCALE], fp[K.F_CPU] = self._dc_scale, float(self.spec.is_cpu)
        fp[K.F_ATTN_PEAK], fp[K.F_MEM_BPS] = self.dev.attn_peak, self.spec.memory_GBps * 1e9
        fp[K.F_LAUNCH_GRAPH], fp[K.F_LAUNCH_EAGER], fp[K.F_KERNELS] = self.launch_graph, self.launch_eager, self.kernels
        sched, seq = self.plan.host(self.role)
        fp[K.F_GRAPH], fp[K.F_SCHED] = float(self.plan.cuda_graph), sched * 1e-6
        fp[K.F_SEQ], fp[K.F_REQ] = seq * 1e-6, self.plan.request_us * 1e-6
        fp[K.F_CHUNK] = self.plan.chunk_us * 1e-6
        fp[K.F_EAGER] = self.plan.eager_us * 1e-6
        fp[K.F_PREFILL_STEP] = self.plan.prefill_step_us * 1e-6
        fe = self.role == "colocated"  # the front end is modelled beside a colocated engine
        fp[K.F_FE_REQ] = self.plan.fe_request_us * 1e-6 * fe
        fp[K.F_FE_FIN] = self.plan.fe_finish_us * 1e-6 * fe
        fp[K.F_FE_ASYNC] = self.plan.fe_async_us * 1e-6 * fe
        fp[K.F_FE_TOK] = self.plan.fe_token_us * 1e-6 * fe
        fp[K.F_FE_STEP] = self.plan.fe_step_us * 1e-6 * fe
        fp[K.F_FE_SLOW] = self.plan.fe_slowdown * fe
        return fp

    def kernel_tables(self) -> tuple[np.ndarray, ...]:
        ts = self.t_send if isinstance(self.t_send, np.ndarray) else 0 * self.grid
        return tuple(np.ascontiguousarray(a, dtype=np.float64) for a in (
            self.grid, self.t_layers, self.t_head, ts, self._pf[0], self._pf[1], self._dc[0], self._dc[1]))

    def step(self, tokens: float, prefill_work: float, decode_kv: float, sampled: float, decode_only: bool,
             chunks: float = 0.0) -> float:
        """`step_seconds` for one step, in plain floats (the scheduler loop's hot path; same numbers)."""
        pp = self.pp
        stage = _interp(math.log(max(tokens, 1.0) / pp), self._g, self._tl)
        L = self.layers_per_stage
        if prefill_work > 0:
            flops = prefill_work / pp / self.dp * self.attn_flop_per
            if self.spec.is_cpu:
                stage += flops / self.dev.attn_peak * L
            else:
                rate = math.exp(_interp(math.log(max(flops, 1.0)), self._pfx, self._pfy)) * 1e12 * self._pf_scale
                stage += flops / rate * L
        if decode_kv > 0:
            b = decode_kv / pp / self.dp * self._kvb
            if self.spec.is_cpu:
                stage += b / (self.spec.memory_GBps * 1e9) * L
            else:
                bw = math.exp(_interp(math.log(max(b, 1.0)), self._dcx, self._dcy)) * 1e9 * self._dc_scale
                stage += b / bw * L
        gpu = pp * stage + _interp(math.log(max(sampled, 1.0) / pp), self._g, self._th)
        if pp > 1:
            gpu += (pp - 1) * _interp(math.log(max(tokens, 1.0) / pp), self._g, self._ts)
        n_k = self.kernels * pp
        t = gpu + n_k * self.launch_graph
        if not (decode_only and self.plan.cuda_graph):
            t = max(t, n_k * self.launch_eager + self.plan.eager_us * 1e-6)
        sched, seq = self.plan.host(self.role)
        return (t + sched * 1e-6 + seq * 1e-6 * sampled + self.plan.chunk_us * 1e-6 * chunks
                + (self.plan.prefill_step_us * 1e-6 if chunks > 0 else 0.0))


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """np.interp for one float (clamped at the ends)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect_right(xs, x) - 1
    x0, x1 = xs[i], xs[i + 1]
    return ys[i] + (ys[i + 1] - ys[i]) * (x - x0) / (x1 - x0)
