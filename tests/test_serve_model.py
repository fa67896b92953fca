"""The serving runtime against Hugging Face `transformers` (CPU, fp32, greedy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from serve_models import hf_greedy, make_llama, make_mixtral  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.serve.engine import EngineConfig, generate  # noqa: E402
from workbench.serve.model import Model, load_config  # noqa: E402
from workbench.serve.sampling import SamplingParams, sample  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    return (make_llama if request.param == "llama" else make_mixtral)(path)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 60, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (ln,), generator=g).tolist() for ln in lengths]


def test_continuous_batching_equals_transformers_generate(checkpoint: Path) -> None:
    """Chunked prefill, mixed prefill/decode batches and preemption (a small cache) keep greedy tokens exact."""
    model = Model.load(checkpoint)
    prompts = _prompts(5)
    cfg = EngineConfig(num_pages=24, page_size=4, max_batched_tokens=16, max_seqs=4)
    ours = generate(model, prompts, SamplingParams(max_tokens=24, temperature=0), cfg)
    for p, o in zip(prompts, ours):
        assert o == hf_greedy(checkpoint, p, 24)


def test_sampling_seeded_and_bounded() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.8, top_k=5, seed=7)
    draws = [sample(logits, p, i) for i in range(50)]
    assert draws == [sample(logits, p, i) for i in range(50)]   # same seed, same tokens
    assert set(draws) <= set(torch.topk(logits, 5).indices.tolist())
    nucleus = SamplingParams(temperature=1.0, top_p=0.05, seed=3)
    assert {sample(logits, nucleus, i) for i in range(20)} == {int(torch.argmax(logits))}
    with pytest.raises(WorkbenchError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_bad_checkpoint_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(WorkbenchError, match="not served"):
        load_config(tmp_path)


def test_a_converter_package_serves_the_same_tokens(tmp_path: Path) -> None:
    """A checkpoint converted into a two-stage package (fp32) loads through the converter's loader."""
    pytest.importorskip("workbench.convert.package")
    from workbench.convert.package import convert
    from workbench.plan.placement import Placement, Replica, Stage

    ckpt = make_llama(tmp_path / "ckpt")
    pl = Placement("t", 3, (Replica((Stage(("n0.g0",), (0, 1), "fp32", "bf16"), Stage(("n0.g1",), (2, 2), "fp32", "bf16"))),))
    convert(ckpt, pl, tmp_path / "pkg", progress=False)
    prompts = _prompts(2, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0)
    assert generate(Model.load(tmp_path / "pkg"), prompts, params) == generate(Model.load(ckpt), prompts, params)


@pytest.mark.parametrize("layers", [None, range(1, 3)])
def test_batched_decode_attention_equals_per_sequence(tmp_path: Path, layers: range | None) -> None:
    """A step of decodes at different context lengths (within a page, at its end, across page boundaries, with
    scattered pages) beside a prefill chunk gives the per-sequence path's logits and K/V (GQA: 4 heads, 2 KV heads);
    also for a pipeline stage holding layers 1..2 (the cache's layer index is relative)."""
    from workbench.serve.kv import KVCache
    from workbench.serve.model import Batch

    model = Model.load(make_llama(tmp_path), layers=layers)
    assert model.num_heads // model.num_kv_heads == 2
    g = torch.Generator().manual_seed(0)
    kv = KVCache(model.cfg, num_pages=40, page_size=4, layers=len(model.layers))
    kv.data.copy_(torch.randn(kv.data.shape, generator=g))     # earlier tokens' K/V: random
    order = torch.randperm(40, generator=g).tolist()
    starts = [0, 3, 4, 7, 12, 17]   # decodes' positions: contexts of 1, 4, 5, 8, 13, 18 tokens
    items: list[tuple[list[int], int, list[int]]] = []
    for s in starts:
        npages = s // 4 + 1
        pages, order = order[:npages], order[npages:]
        items.append(([int(torch.randint(0, 256, (1,), generator=g))], s, pages))
    items.insert(2, (torch.randint(0, 256, (6,), generator=g).tolist(), 5, order[:3]))   # a prefill chunk at 5..10
    batch = Batch.build(items, page_size=4)
    assert batch.decodes is not None and batch.decodes.chunks == [0, 1, 3, 4, 5, 6]
    assert batch.decodes.rows is not None and batch.decodes.rows.tolist() == [0, 1, 8, 9, 10, 11]
    h = torch.randn(int(batch.tokens.shape[0]), model.cfg.hidden_size, generator=g)
    outs = {}
    for batched in (True, False):
        model.batched_decode = batched
        cache = KVCache(model.cfg, num_pages=40, page_size=4, layers=len(model.layers))
        cache.data.copy_(kv.data)
        out = model.forward(batch, cache) if model.first else model.run_layers(h, batch, cache)
        outs[batched] = (out, cache.data)
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=1e-5, rtol=1e-5)   # later layers: from h
    # only decodes (the batched call's output is the whole attention)
    only = Batch.build([it for it in items if len(it[0]) == 1], page_size=4)
    assert only.decodes is not None and only.decodes.rows is None
    res = []
    for batched in (True, False):
        model.batched_decode = batched
        cache = KVCache(model.cfg, num_pages=40, page_size=4, layers=len(model.layers))
        cache.data.copy_(kv.data)
        res.append(model.forward(only, cache) if model.first else model.run_layers(h[:6], only, cache))
    torch.testing.assert_close(res[0], res[1], atol=1e-5, rtol=1e-5)
