"""The MoE layer's routing (tokens grouped by expert with one read of the experts' counts) against the plain
per-expert loop (`torch.where(top_i == e)` for each chosen expert), on the CPU and on a GPU; no transformers needed
(`tests/test_serve_model.py` checks Mixtral against transformers' `generate` on the CPU)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from workbench.serve.model import Model, ModelConfig  # noqa: E402


def _reference(model: Model, p: str, x: torch.Tensor) -> torch.Tensor:
    c, w = model.cfg, model.w
    probs = torch.softmax(F.linear(x, w[p + "block_sparse_moe.gate.weight"]).float(), dim=-1)
    top_w, top_i = torch.topk(probs, c.experts_per_tok, dim=-1)
    top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in torch.unique(top_i).tolist():
        tok, slot = torch.where(top_i == e)
        q = f"{p}block_sparse_moe.experts.{e}."
        xe = x[tok]
        y = F.linear(F.silu(F.linear(xe, w[q + "w1.weight"])) * F.linear(xe, w[q + "w3.weight"]), w[q + "w2.weight"])
        out.index_add_(0, tok, y * top_w[tok, slot, None])
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_moe_routing_equals_the_per_expert_loop(device: str, tokens: int) -> None:
    """8 experts, 2 per token: with 1 and 3 tokens most experts get none (skipped), with 40 all do; the same
    output bit for bit (the same pairs, in the same order, through the same kernels)."""
    cfg = ModelConfig(arch="mixtral", vocab_size=16, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, rms_eps=1e-5, rope_theta=1e4, max_position=64, num_experts=8,
                      experts_per_tok=2)
    g = torch.Generator().manual_seed(tokens)
    p = "model.layers.0."
    w = {p + "block_sparse_moe.gate.weight": torch.randn(8, 32, generator=g)}
    for e in range(8):
        for name, shape in (("w1", (48, 32)), ("w3", (48, 32)), ("w2", (32, 48))):
            w[f"{p}block_sparse_moe.experts.{e}.{name}.weight"] = torch.randn(*shape, generator=g) * 0.2
    model = Model(cfg, w, device=device)
    x = torch.randn(tokens, 32, generator=g).to(device)
    assert torch.equal(model._moe(p, x), _reference(model, p, x))
