"""A Llama-family decoder built in torch from the simulator's `ModelSpec` (one definition of the shape).

RMSNorm, rotary position embeddings (the `rotate_half` convention of Hugging Face's Llama, so
weights export without permutation), grouped-query attention through `scaled_dot_product_attention`
(flash kernels on GPUs), SwiGLU feed-forward when `spec.gated` (a GELU MLP otherwise), and
optional token-choice top-k MoE layers (`spec.experts`, `top_k`, `expert_ffn`, `shared_experts`,
the first `dense_layers` dense). Module names follow torchtitan (`tok_embeddings`, `layers.<i>`,
`attention.wq/wk/wv/wo`, `feed_forward.w1/w2/w3`, `norm`, `output`) so its TP plan applies as is;
`layers` is a `ModuleDict` so a pipeline stage can delete the layers it does not hold.

FLOPs: the runner's MFU uses `workbench.models.costs.model_flops_per_token(spec)`, the same count
the simulator uses, and `Llama.num_params()` equals `parameter_count(spec).total` (checked by a
test), so a measured and a simulated MFU count the same work.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.spec import ModelSpec

ROPE_THETA = 500_000.0  # Llama 3's base; written into the exported config.json
NORM_EPS = 1e-5


def check_spec(spec: ModelSpec) -> None:
    """Raise naming the field when the spec is not a shape this module builds (MLA is not)."""
    if spec.is_mla:
        raise WorkbenchError(f"model: {spec.name} uses MLA attention; the native engine builds MHA/GQA "
                             "Llama-family models (simulate MLA models instead)")
    if spec.head_dim % 2:
        raise WorkbenchError(f"model.head_dim: rotary embeddings need an even head_dim, got {spec.head_dim}")


def rope_tables(spec: ModelSpec, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (seq, head_dim) in fp32."""
    d = spec.head_dim
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    t = torch.arange(spec.seq, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim)."""
    s = x.shape[2]
    c, n = cos[:s].to(x.dtype), sin[:s].to(x.dtype)
    return x * c + _rotate_half(x) * n


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        h, d = spec.hidden, spec.head_dim
        self.head_dim = d
        self.rep = spec.heads // spec.kv_heads
        self.wq = nn.Linear(h, spec.heads * d, bias=False)
        self.wk = nn.Linear(h, spec.kv_heads * d, bias=False)
        self.wv = nn.Linear(h, spec.kv_heads * d, bias=False)
        self.wo = nn.Linear(spec.heads * d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_dim
        # -1 heads: under tensor parallelism each rank holds heads/tp of them
        q = self.wq(x).view(b, s, -1, d).transpose(1, 2)
        k = self.wk(x).view(b, s, -1, d).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.rep > 1:
            k = k.repeat_interleave(self.rep, dim=1)
            v = v.repeat_interleave(self.rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU (w2(silu(w1 x) * w3 x)) when gated, else w2(gelu(w1 x))."""

    def __init__(self, hidden: int, ffn: int, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


class MoE(nn.Module):
    """Token-choice top-k routing over `experts` FFNs (softmax over the chosen logits), plus shared experts."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.top_k = spec.top_k
        self.router = nn.Linear(spec.hidden, spec.experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(spec.hidden, spec.expert_ffn, spec.gated)
                                     for _ in range(spec.experts))
        self.shared = (FeedForward(spec.hidden, spec.shared_experts * spec.expert_ffn, spec.gated)
                       if spec.shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat)
        weight, chosen = logits.topk(self.top_k, dim=-1)
        weight = weight.softmax(dim=-1).to(flat.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * weight[rows, slot, None])
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, moe: bool) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(spec.hidden, eps=NORM_EPS)
        self.attention = Attention(spec)
        self.ffn_norm = nn.RMSNorm(spec.hidden, eps=NORM_EPS)
        self.feed_forward: nn.Module = MoE(spec) if moe else FeedForward(spec.hidden, spec.ffn, spec.gated)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """The whole model, or one pipeline stage of it once `keep_stage` has dropped the other parts.

    forward(tokens (b, s) int64) → logits (b, s, vocab); a stage without `tok_embeddings` takes
    hidden states, a stage without `output` returns them.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        check_spec(spec)
        self.spec = spec
        self.tok_embeddings: nn.Module | None = nn.Embedding(spec.vocab, spec.hidden)
        moe_from = spec.dense_layers if spec.is_moe else spec.layers
        self.layers = nn.ModuleDict({str(i): Block(spec, i >= moe_from) for i in range(spec.layers)})
        self.norm: nn.Module | None = nn.RMSNorm(spec.hidden, eps=NORM_EPS)
        self.output: nn.Module | None = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tied:
            self.output.weight = self.tok_embeddings.weight  # type: ignore[union-attr]
        cos, sin = rope_tables(spec)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int = 0, untied: bool = False) -> None:
        """Deterministic weights for `seed` (normal 0.02; output projections scaled by 1/√(2·layers)).
        `untied`: the LM head is a copy of the embedding (a tied model split over pipeline stages)."""
        std_out = 0.02 / math.sqrt(2 * self.spec.layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                # one generator per parameter name: a pipeline stage draws the same weights as the whole model
                key = "tok_embeddings.weight" if untied and name == "output.weight" else name
                g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
                std = std_out if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
            cos, sin = rope_tables(self.spec, self.rope_cos.device)
            self.rope_cos.copy_(cos)  # type: ignore[operator]
            self.rope_sin.copy_(sin)  # type: ignore[operator]

    def keep_stage(self, layer_ids: list[int], first: bool, last: bool) -> None:
        """Drop everything a pipeline stage holding `layer_ids` (global indices) does not hold."""
        for i in list(self.layers.keys()):
            if int(i) not in layer_ids:
                del self.layers[i]
        if not first:
            self.tok_embeddings = None
        if not last:
            self.norm = None
            self.output = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)
        for block in self.layers.values():
            x = block(x, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            x = self.norm(x)
        if self.output is not None:
            x = self.output(x)
        return x

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build(spec: ModelSpec, seed: int = 0, device: Any = None, untied: bool = False) -> Llama:
    """The model on `device` with the deterministic weights of `seed` (the same on every rank);
    `untied`: `spec` is a tied model whose head keeps its own copy of the embedding (pipelines)."""
    with torch.device("meta"):
        m = Llama(spec)
    m.to_empty(device=device or "cpu")
    if spec.tied:  # to_empty gives every parameter its own storage: tie again
        m.output.weight = m.tok_embeddings.weight  # type: ignore[union-attr]
    m.init_weights(seed, untied)
    return m


# ---------------------------------------------------------------- Hugging Face layout
def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """config.json of the equivalent `LlamaForCausalLM` (dense SwiGLU models)."""
    if spec.is_moe or not spec.gated:
        raise WorkbenchError(f"model: only dense gated (SwiGLU) models export to the Llama layout; {spec.name} is "
                             f"{'MoE' if spec.is_moe else 'not gated'}")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": spec.hidden,
            "intermediate_size": spec.ffn, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab,
            "max_position_embeddings": spec.seq, "rms_norm_eps": NORM_EPS, "rope_theta": ROPE_THETA,
            "tie_word_embeddings": spec.tied, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "bfloat16", "bos_token_id": None, "eos_token_id": None}


_HF_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}


def hf_name(name: str) -> str:
    """Our parameter name → the `LlamaForCausalLM` state-dict name."""
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, i, rest = name.split(".", 2)
    part, _, leaf = rest.rpartition(".")
    return f"model.layers.{i}.{_HF_NAMES[part]}.{leaf}"


def hf_state_dict(full: dict[str, torch.Tensor], spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    out = {hf_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in full.items()}
    if spec.tied:
        out.pop("lm_head.weight", None)
    return out
