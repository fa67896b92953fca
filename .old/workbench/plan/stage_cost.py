"""Per-layer serving costs of a model on one TP group: bytes held, decode and prefill seconds.

The mixed-GPU planner's inner cost model. For a GPU model, a TP degree, a weight format and a
KV format it gives, per layer (numpy arrays over the model's layers), the weight bytes each
device holds, the KV bytes per sequence, the seconds of one decode step at batch `b` and the
seconds of one request's prefill. Built on the project's measured models only:

- GEMMs: `workbench.sim.compute.DeviceModel` (measured H100 shape efficiency scaled to the GPU's
  catalogue peak, `datasets/gemm_efficiency.csv`); a GEMM costs max(compute, reading its
  weights) — decode at small batch is weight-bandwidth bound;
- memory traffic (weights, KV reads, elementwise ops): the measured elementwise bandwidth curve;
- attention prefill: the measured flash-attention curve; decode attention = reading the KV;
- TP all-reduces: `workbench.sim.collectives` on the group's real links;
- MoE: the expected number of distinct experts a batch touches, E·(1 − (1 − k/E)^b).

Formats (`datasets/precisions.csv`): bytes per element including block scales, and the
precision the GEMMs run at (fp8 weights → fp8 GEMMs where the GPU has them; int8/fp4 weights
are costed at the 16-bit rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from workbench.errors import WorkbenchError
from workbench.models.costs import (
    attention_core_flops,
    elementwise_bytes_per_token,
    layer_gemms,
    layer_kinds,
    parameter_count,
)
from workbench.models.spec import ModelSpec
from workbench.plan.placement import bytes_per_element, precision_table, supported_precisions
from workbench.sim.compute import DeviceModel, device_model
from workbench.topology.catalogue import GPUSpec
from workbench.topology.model import Cluster

ACT_BYTES = 2  # activations and collectives move 16-bit values


def compute_precision(spec: GPUSpec, weight_precision: str) -> str:
    """The GEMM precision a layer with these weights runs at on this GPU."""
    if spec.is_cpu:
        return "fp32"
    comp = str(precision_table()[weight_precision]["compute"])
    have = dict(spec.peak_tflops)
    if comp not in have:
        comp = "bf16" if "bf16" in have else "fp16"
    return comp


@dataclass(frozen=True)
class GroupKind:
    """What a TP group's cost depends on: GPU model (spec), TP degree, and the devices of one such
    group (for the all-reduce's links; every group of a node kind has the same shape)."""

    spec: GPUSpec
    tp: int
    devices: tuple[str, ...]
    gpus_on_node: int


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer arrays (length = model layers) on one device of a TP group, plus the ends."""

    weight_bytes: np.ndarray  # held per device
    kv_bytes_per_token: np.ndarray  # per device, per token of context
    decode_s: np.ndarray  # one decode step of `batch` sequences at mean context
    prefill_s: np.ndarray  # one request's prefill (chunked)
    embed_bytes: float  # first stage
    head_bytes: float  # last stage (the tied embedding again when tied)
    head_decode_s: float
    head_prefill_s: float
    batch: int

    @property
    def prefix(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Prefix sums (length layers + 1) of weight bytes, KV bytes per token, decode and prefill seconds:
        layers i..j-1 cost `p[j] - p[i]`."""
        cached = self.__dict__.get("_prefix")
        if cached is None:
            z = np.zeros(1)
            cached = tuple(np.concatenate((z, np.cumsum(a))) for a in (
                self.weight_bytes, self.kv_bytes_per_token, self.decode_s, self.prefill_s))
            object.__setattr__(self, "_prefix", cached)
        return cached  # type: ignore[return-value]

    @property
    def prefix_lists(self) -> tuple[list[float], list[float], list[float], list[float], float]:
        """`prefix` as Python lists (fast scalar access) and the largest layer's weight bytes."""
        cached = self.__dict__.get("_prefix_lists")
        if cached is None:
            cached = (*(a.tolist() for a in self.prefix), float(self.weight_bytes.max()))
            object.__setattr__(self, "_prefix_lists", cached)
        return cached  # type: ignore[no-any-return]


def kv_bytes_per_token_layer(m: ModelSpec, tp: int, kv_precision: str) -> float:
    """KV bytes one device keeps per token per layer (MLA latents are replicated over TP)."""
    b = bytes_per_element(kv_precision)
    if m.is_mla:
        return (m.kv_lora_rank + m.qk_rope_dim) * b
    return 2.0 * m.head_dim * math.ceil(m.kv_heads / tp) * b


def _gemm_time(dm: DeviceModel, gemms: tuple, weight_bytes: float) -> float:  # type: ignore[type-arg]
    """Sum of GEMM compute times vs the time to read the weights: whichever is longer."""
    t = 0.0
    for g in gemms:
        t += dm.gemm_seconds(g.m, g.n, g.k, g.count)
    return max(t, dm.memory_seconds(weight_bytes))


@lru_cache(maxsize=4096)
def layer_costs(cluster: Cluster, m: ModelSpec, kind: GroupKind, precision: str, kv_precision: str,
                batch: int, isl: int, osl: int, chunk: int) -> LayerCosts:
    """Per-layer costs of `m` on one device of a TP group of `kind` (cached)."""
    from workbench.sim.collectives import collective

    spec, t = kind.spec, kind.tp
    if not spec.is_cpu and precision not in supported_precisions(spec.model):
        raise WorkbenchError(f"precision: {spec.model} has no {precision} support "
                             f"(supported: {', '.join(supported_precisions(spec.model))})")
    pc = parameter_count(m)
    wb = bytes_per_element(precision)
    dm = device_model(spec, compute_precision(spec, precision))
    h = m.hidden
    ctx = isl + osl / 2.0
    kvb = kv_bytes_per_token_layer(m, t, kv_precision)

    def allreduce(nbytes: float) -> float:
        if t <= 1:
            return 0.0
        return collective(cluster, "all_reduce", int(nbytes), kind.devices).seconds

    per_kind: dict[str, tuple[float, float, float]] = {}
    for lk in ("dense", "moe"):
        if lk == "moe" and not m.is_moe:
            continue
        if lk == "dense":
            params = pc.dense_layer
            touched = float(params)
        else:
            params = pc.moe_layer
            e, k = m.experts, m.top_k
            distinct = e * (1.0 - (1.0 - k / e) ** batch)
            touched = pc.moe_layer_nonexpert + distinct * pc.expert
        wbytes = params * wb / t
        # decode: `batch` new tokens, each reading `ctx` tokens of KV
        dec = _gemm_time(dm, layer_gemms(m, lk, batch, t), touched * wb / t)
        dec += dm.memory_seconds(batch * ctx * kvb, size_hint=batch * ctx * kvb)
        dec += dm.memory_seconds(batch * elementwise_bytes_per_token(m, lk, t, elem=ACT_BYTES))
        dec += 2 * allreduce(batch * h * ACT_BYTES)
        # prefill of one request of `isl` tokens in chunks of `chunk`
        c = min(isl, chunk)
        n_chunks = isl / c
        pre = n_chunks * _gemm_time(dm, layer_gemms(m, lk, c, t), wbytes)
        heads = max(m.heads // t, 1)
        pre += dm.attention_seconds(attention_core_flops(m, isl, isl, heads) / 2, isl, m.qk_head_dim)
        pre += dm.memory_seconds(isl * elementwise_bytes_per_token(m, lk, t, elem=ACT_BYTES))
        pre += n_chunks * 2 * allreduce(c * h * ACT_BYTES)
        per_kind[lk] = (wbytes, dec, pre)
    kinds = layer_kinds(m)
    w = np.array([per_kind[k][0] for k in kinds])
    dec_a = np.array([per_kind[k][1] for k in kinds])
    pre_a = np.array([per_kind[k][2] for k in kinds])
    kv = np.full(m.layers, kvb)
    end_b = 4 if precision == "fp32" else 2  # embeddings and head stay 16-bit (fp32 for fp32 models)
    embed = pc.embedding * end_b / t
    head = (pc.head or pc.embedding) * end_b / t
    from workbench.models.costs import Gemm

    head_g = (Gemm("lm_head", batch, max(m.vocab // t, 1), h),)
    head_dec = _gemm_time(dm, head_g, head)
    head_pre = _gemm_time(dm, (Gemm("lm_head", 1, max(m.vocab // t, 1), h),), head)
    return LayerCosts(w, kv, dec_a, pre_a, embed, head, head_dec, head_pre, batch)


@lru_cache(maxsize=1024)
def activation_bytes(m: ModelSpec, tp: int, chunk: int, max_seqs: int, last: bool) -> float:
    """Transient bytes of one forward on one device: a prefill chunk's widest intermediates (the
    residual stream, the FFN's up projection) and, on the last stage, fp32 logits of the batch."""
    width = m.ffn if not m.is_moe else max(m.ffn if m.dense_layers else 0,
                                           m.top_k * m.expert_ffn + m.shared_experts * m.expert_ffn)
    mats = 2 if m.gated else 1
    act = chunk * (4 * m.hidden + (mats + 1) * width / tp) * ACT_BYTES
    if last:
        act += max_seqs * m.vocab / tp * 4
    return float(act)
