"""Parameter counts, FLOPs, activation bytes and GEMM shapes of a `ModelSpec`, per layer and per token.

Conventions (Narayanan et al. SC21): a multiply-add is 2 FLOPs; attention scores are counted
over the full `seq × seq` square (as Megatron-LM reports it, even for causal masks); backward
is twice the forward. Norm and bias parameters are counted, biases of GPT-style models are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from workbench.models.params import ParamCount, _attention_params, parameter_count  # noqa: F401 - re-exported
from workbench.models.spec import ModelSpec

LAYER_KINDS = ("dense", "moe")


@dataclass(frozen=True)
class Gemm:
    """One matrix multiply C[m,n] = A[m,k] @ B[k,n], repeated `count` times (e.g. per local expert)."""

    name: str
    m: int
    n: int
    k: int
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


def _div(x: int, t: int) -> int:
    return max(x // t, 1)


@lru_cache(maxsize=4096)
def layer_gemms(m: ModelSpec, kind: str, tokens: int, tp: int = 1, ep: int = 1) -> tuple[Gemm, ...]:
    """Forward GEMMs of one layer on one rank for `tokens` tokens (b·s/cp), Megatron-style TP sharding.

    MoE experts: `ep` ranks share the experts (experts/ep each) and tokens are balanced, so each local
    expert multiplies tokens·top_k·ep/experts rows; expert FFNs are TP-sharded like dense FFNs.
    """
    h = m.hidden
    out: list[Gemm] = []
    if m.is_mla:
        qk = m.qk_nope_dim + m.qk_rope_dim
        if m.q_lora_rank:
            out += [Gemm("q_down", tokens, m.q_lora_rank, h), Gemm("q_up", tokens, _div(m.heads * qk, tp), m.q_lora_rank)]
        else:
            out.append(Gemm("q", tokens, _div(m.heads * qk, tp), h))
        out += [Gemm("kv_down", tokens, m.kv_lora_rank + m.qk_rope_dim, h),
                Gemm("kv_up", tokens, _div(m.heads * (m.qk_nope_dim + m.v_head_dim), tp), m.kv_lora_rank),
                Gemm("attn_out", tokens, h, _div(m.heads * m.v_head_dim, tp))]
    else:
        out += [Gemm("qkv", tokens, _div(m.heads * m.head_dim + 2 * m.kv_dim, tp), h),
                Gemm("attn_out", tokens, h, _div(m.heads * m.head_dim, tp))]
    mats = 2 if m.gated else 1
    if kind == "dense":
        out += [Gemm("ffn_up", tokens, _div(mats * m.ffn, tp), h), Gemm("ffn_down", tokens, h, _div(m.ffn, tp))]
    else:
        out.append(Gemm("router", tokens, m.experts, h))
        if m.shared_experts:
            w = m.shared_experts * m.expert_ffn
            out += [Gemm("shared_up", tokens, _div(mats * w, tp), h), Gemm("shared_down", tokens, h, _div(w, tp))]
        local = max(m.experts // ep, 1)
        rows = max(round(tokens * m.top_k * ep / m.experts), 1)
        out += [Gemm("expert_up", rows, _div(mats * m.expert_ffn, tp), h, local),
                Gemm("expert_down", rows, h, _div(m.expert_ffn, tp), local)]
    return tuple(out)


def backward_gemms(g: Gemm) -> tuple[Gemm, Gemm]:
    """The data-gradient and weight-gradient GEMMs of a forward GEMM."""
    return Gemm(g.name + ".dgrad", g.m, g.k, g.n, g.count), Gemm(g.name + ".wgrad", g.k, g.n, g.m, g.count)


def attention_core_flops(m: ModelSpec, q_tokens: int, kv_len: int, heads: int) -> float:
    """Forward FLOPs of QKᵀ and AV for `q_tokens` queries against `kv_len` keys, full square."""
    return 2.0 * q_tokens * kv_len * heads * (m.qk_head_dim + (m.v_head_dim if m.is_mla else m.head_dim))


@lru_cache(maxsize=256)
def forward_flops_per_token(m: ModelSpec, kind: str) -> float:
    """Model forward FLOPs of one layer for one token (weights + attention over `seq`)."""
    pc = parameter_count(m)
    mat = pc.attention + (pc.dense_ffn if kind == "dense" else pc.moe_router + pc.shared + m.top_k * pc.expert)
    return 2.0 * mat + attention_core_flops(m, 1, m.seq, m.heads)


def model_flops_per_token(m: ModelSpec) -> float:
    """Model FLOPs of forward + backward per token (3× forward), LM head included (MFU numerator)."""
    pc = parameter_count(m)
    fwd = (pc.dense_layers * forward_flops_per_token(m, "dense") + pc.moe_layers * forward_flops_per_token(m, "moe")
           + 2.0 * m.vocab * m.hidden)
    return 3.0 * fwd


def activation_bytes_per_token(m: ModelSpec, kind: str, tp: int = 1, sp: bool = True,
                               recompute: str = "none", elem: int = 2) -> float:
    """Bytes one layer stores for backward per token on one TP rank, without the s² attention terms
    (flash attention, or selective recomputation; add `attention_score_bytes_per_token` for unfused
    attention without it).

    `recompute`: none and selective store the same here (Megatron's selective recomputation
    recomputes the attention core — QKᵀ, softmax, dropout, AV — so it saves only the s² terms);
    full keeps only the layer input. Without sequence parallelism the hidden-size tensors (norm
    inputs, masks) are replicated.
    """
    h = m.hidden
    rep = tp if sp else 1  # divisor of the hidden-size tensors
    if recompute == "full":
        return elem * h / rep
    mask = h / rep if m.dropout else 0.0
    if m.is_mla:
        qk = m.qk_nope_dim + m.qk_rope_dim
        attn_shard = elem * (m.heads * qk * 2 + m.heads * m.v_head_dim * 2) / tp
        attn_rep = float(elem * (m.q_lora_rank + m.kv_lora_rank + m.qk_rope_dim))
    else:
        attn_shard = elem * (m.heads * m.head_dim * 2 + 2 * m.kv_dim) / tp  # q, k, v, output
        attn_rep = 0.0
    hid = elem * h / rep
    attn = 2 * hid + attn_shard + attn_rep + mask  # norm input, qkv input, q/k/v/o
    mats = 2 if m.gated else 1
    if kind == "dense":
        ffn = 2 * hid + elem * m.ffn * (mats + 1) / tp + mask
    else:
        per = elem * m.expert_ffn * (mats + 1) / tp
        routed = m.top_k * (elem * h / rep + per)
        shared = m.shared_experts * per
        ffn = 2 * hid + routed + shared + 4 * m.experts / rep + mask
    return attn + ffn


def attention_score_bytes_per_token(m: ModelSpec, tp: int = 1, kv_len: int | None = None, elem: int = 2) -> float:
    """Bytes of the s² tensors unfused attention stores per query token on one TP rank: softmax output
    and, with dropout, its mask (1 byte) and output — Korthikanti et al.'s 5·a·s/t for 2-byte types."""
    s = m.seq if kv_len is None else kv_len
    per = elem + ((elem + 1) if m.dropout else 0)
    return float(per * (m.heads / tp) * s)


def elementwise_bytes_per_token(m: ModelSpec, kind: str, tp: int = 1, sp: bool = True, elem: int = 2,
                                style: str = "fused") -> float:
    """HBM bytes moved by the memory-bound forward ops of one layer per token (norms, residuals, activation, RoPE).

    `style`: fused — one pass per norm, residual add and activation (dropout, if any, folded into the
    residual add); megatron-2021 — the kernels of 2021 Megatron-LM: LayerNorm, fused bias+GeLU and
    fused bias+dropout+add, each reading and writing HBM, dropout masks written as bytes.
    """
    h = m.hidden
    rep = tp if sp else 1
    norms_resid = elem * h * (2 * 2 + 2 * 3) / rep
    width = m.ffn if kind == "dense" else m.top_k * m.expert_ffn + m.shared_experts * m.expert_ffn
    act = elem * width * (3 if m.gated else 2) / tp
    rope = 2 * elem * (m.heads * m.qk_head_dim + m.kv_dim) / tp
    if style == "megatron-2021":
        bias = elem * (h + width) / tp  # bias reads of the row/column-parallel linears' epilogues
        masks = 2.0 * h / rep if m.dropout else 0.0  # two residual dropout masks (1 byte each)
        return norms_resid + act + rope + bias + masks
    return norms_resid + act + rope


def layer_kinds(m: ModelSpec) -> tuple[str, ...]:
    """Kind of each layer in order ('dense' or 'moe')."""
    if not m.is_moe:
        return ("dense",) * m.layers
    return ("dense",) * m.dense_layers + ("moe",) * m.moe_layers
