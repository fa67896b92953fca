"""The engine's batched decode attention against its per-sequence path, on the CPU and on a GPU (no `transformers`
needed: the checkpoint is made by `workbench.serve.checkpoints.random_llama`)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from workbench.serve.checkpoints import random_llama  # noqa: E402
from workbench.serve.model import Model  # noqa: E402


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("layers", [None, range(1, 3)])
def test_batched_decode_attention_equals_per_sequence(tmp_path: Path, layers: range | None, device: str) -> None:
    """A step of decodes at different context lengths (within a page, at its end, across page boundaries, with
    scattered pages) beside a prefill chunk gives the per-sequence path's logits and K/V (GQA: 4 heads, 2 KV heads);
    also for a pipeline stage holding layers 1..2 (the cache's layer index is relative). fp32, on the CPU and on a
    GPU (where the attention kernels differ: a looser tolerance)."""
    from workbench.serve.kv import KVCache
    from workbench.serve.model import Batch

    ckpt = random_llama(tmp_path, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, dtype="float32")
    model = Model.load(ckpt, layers=layers, device=device)
    assert model.num_heads // model.num_kv_heads == 2
    tol = 1e-5 if device == "cpu" else 2e-4
    g = torch.Generator().manual_seed(0)
    kv = KVCache(model.cfg, num_pages=40, page_size=4, layers=len(model.layers), device=device)
    kv.data.copy_(torch.randn(kv.data.shape, generator=g))     # earlier tokens' K/V: random
    order = torch.randperm(40, generator=g).tolist()
    starts = [0, 3, 4, 7, 12, 17]   # decodes' positions: contexts of 1, 4, 5, 8, 13, 18 tokens
    items: list[tuple[list[int], int, list[int]]] = []
    for s in starts:
        npages = s // 4 + 1
        pages, order = order[:npages], order[npages:]
        items.append(([int(torch.randint(0, 256, (1,), generator=g))], s, pages))
    items.insert(2, (torch.randint(0, 256, (6,), generator=g).tolist(), 5, order[:3]))   # a prefill chunk at 5..10
    batch = Batch.build(items, page_size=4, device=device)
    assert batch.decodes is not None and batch.decodes.chunks == [0, 1, 3, 4, 5, 6]
    assert batch.decodes.rows is not None and batch.decodes.rows.tolist() == [0, 1, 8, 9, 10, 11]
    h = torch.randn(int(batch.tokens.shape[0]), model.cfg.hidden_size, generator=g).to(device)
    outs = {}
    for batched in (True, False):
        model.batched_decode = batched
        cache = KVCache(model.cfg, num_pages=40, page_size=4, layers=len(model.layers), device=device)
        cache.data.copy_(kv.data)
        out = model.forward(batch, cache) if model.first else model.run_layers(h, batch, cache)
        outs[batched] = (out, cache.data)
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=tol, rtol=tol)
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=tol, rtol=tol)   # later layers: from h
    # only decodes (the batched call's output is the whole attention)
    only = Batch.build([it for it in items if len(it[0]) == 1], page_size=4, device=device)
    assert only.decodes is not None and only.decodes.rows is None
    res = []
    for batched in (True, False):
        model.batched_decode = batched
        cache = KVCache(model.cfg, num_pages=40, page_size=4, layers=len(model.layers), device=device)
        cache.data.copy_(kv.data)
        res.append(model.forward(only, cache) if model.first else model.run_layers(h[:6], only, cache))
    torch.testing.assert_close(res[0], res[1], atol=tol, rtol=tol)
