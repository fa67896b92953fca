"""Parameter counts of a `ModelSpec` by part (the value object's own arithmetic: `ModelSpec.summary`
uses it, and `workbench.models.costs` builds FLOPs and bytes on it)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.models.spec import ModelSpec


@dataclass(frozen=True)
class ParamCount:
    """Parameters by part; `active` counts only `top_k` routed experts per MoE layer."""

    embedding: int
    head: int  # 0 when tied
    attention: int  # per layer
    dense_ffn: int  # per dense layer
    moe_router: int
    expert: int  # one routed expert
    shared: int  # all shared experts of one MoE layer
    norms: int  # per layer
    final_norm: int
    dense_layers: int
    moe_layers: int
    top_k: int
    experts: int

    @property
    def dense_layer(self) -> int:
        return self.attention + self.dense_ffn + self.norms

    @property
    def moe_layer_nonexpert(self) -> int:
        """Attention, norms, router and shared experts of a MoE layer (everything but routed experts)."""
        return self.attention + self.norms + self.moe_router + self.shared

    @property
    def moe_layer(self) -> int:
        return self.moe_layer_nonexpert + self.experts * self.expert

    @property
    def total(self) -> int:
        return (self.embedding + self.head + self.final_norm + self.dense_layers * self.dense_layer
                + self.moe_layers * self.moe_layer)

    @property
    def active(self) -> int:
        return (self.embedding + self.head + self.final_norm + self.dense_layers * self.dense_layer
                + self.moe_layers * (self.moe_layer_nonexpert + self.top_k * self.expert))

    @property
    def experts_total(self) -> int:
        return self.moe_layers * self.experts * self.expert


def _attention_params(m: ModelSpec) -> int:
    h = m.hidden
    if m.is_mla:
        qk = m.qk_nope_dim + m.qk_rope_dim
        q = (h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * m.heads * qk) if m.q_lora_rank else h * m.heads * qk
        kv = h * (m.kv_lora_rank + m.qk_rope_dim) + m.kv_lora_rank + m.kv_lora_rank * m.heads * (m.qk_nope_dim + m.v_head_dim)
        return q + kv + m.heads * m.v_head_dim * h
    return h * m.heads * m.head_dim + 2 * h * m.kv_dim + m.heads * m.head_dim * h


@lru_cache(maxsize=256)
def parameter_count(m: ModelSpec) -> ParamCount:
    mats = 3 if m.gated else 2
    h = m.hidden
    return ParamCount(
        embedding=m.vocab * h, head=0 if m.tied else m.vocab * h, attention=_attention_params(m),
        dense_ffn=mats * h * m.ffn, moe_router=h * m.experts if m.is_moe else 0,
        expert=mats * h * m.expert_ffn if m.is_moe else 0,
        shared=m.shared_experts * mats * h * m.expert_ffn if m.is_moe else 0,
        norms=2 * h + (m.q_lora_rank + m.kv_lora_rank if m.is_mla else 0), final_norm=h,
        dense_layers=m.dense_layers if m.is_moe else m.layers, moe_layers=m.moe_layers, top_k=m.top_k,
        experts=m.experts,
    )
