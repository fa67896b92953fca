"""The engine's decode-only steps through `DecodeGraphs` (padded to a captured shape; captured CUDA graphs on a GPU)
and its other steps through `PieceGraphs` (padded token counts, graphed pieces around an eager attention) against
the plain forward: the same logits, the same K/V in every real page, and the same generated tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from workbench.serve.checkpoints import random_llama  # noqa: E402
from workbench.serve.graphs import DecodeGraphs, PieceGraphs, sizes  # noqa: E402
from workbench.serve.kv import KVCache  # noqa: E402
from workbench.serve.model import Batch, Model  # noqa: E402


def test_sizes() -> None:
    assert sizes(1) == (1,)
    assert sizes(5) == (1, 2, 4, 8)
    assert sizes(64) == (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_graphs_equal_the_plain_forward(tmp_path: Path, device: str) -> None:
    """Decodes at contexts of 1..18 tokens (within a page, at its end, across boundaries, scattered pages), in
    batches that are padded (3 → 4 rows, 5 → 8) and not (4), over page tables padded to 2, 4 or 8 pages: logits and
    every real page's K/V as `Batch.build` + `Model.forward` give them; the scratch page is the only other page
    written. GQA (4 heads, 2 KV heads). On a GPU the graphs are captured and replayed, each shape twice."""
    ckpt = random_llama(tmp_path, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, dtype="float32")
    model = Model.load(ckpt, device=device)
    tol = 1e-5 if device == "cpu" else 2e-4
    g = torch.Generator().manual_seed(1)
    pages_total = 41
    base = torch.randn((3, pages_total, 2, 2, 4, 16), generator=g)
    graphs_kv = KVCache(model.cfg, num_pages=pages_total, page_size=4, device=device)
    graphs = DecodeGraphs(model, graphs_kv, scratch_page=40, max_seqs=8, max_pages=8)
    assert graphs.capture == (device == "cuda")
    order = torch.randperm(40, generator=g).tolist()
    starts = [0, 3, 4, 7, 12, 17, 9, 25]
    tables = []
    for s in starts:
        k = s // 4 + 1
        tables.append(order[:k])
        order = order[k:]
    for rows in ([0, 1, 2], [3, 4, 5, 6], [0, 2, 4, 6, 7], [7]):
        for _ in range(2):
            items = [([int(torch.randint(0, 256, (1,), generator=g))], starts[r], tables[r]) for r in rows]
            assert graphs.fits(items)
            ref_kv = KVCache(model.cfg, num_pages=pages_total, page_size=4, device=device)
            ref_kv.data.copy_(base)
            graphs_kv.data.copy_(base)
            want = model.forward(Batch.build(items, 4, device=device), ref_kv)
            got = graphs.run(items).clone()
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            torch.testing.assert_close(graphs_kv.data[:, :40], ref_kv.data[:, :40], atol=tol, rtol=tol)
    if device == "cuda":
        assert set(graphs.graphs) == {(4, 2), (4, 8), (8, 8), (1, 8)}
        assert all(x.graph is not None for x in graphs.graphs.values())
    # what it does not take: a prefill chunk, a context past the largest page count, more rows than captured
    assert not graphs.fits([([1, 2], 0, tables[0])])
    assert not graphs.fits([([1], 32, list(range(9)))])
    assert not graphs.fits([([1], 0, tables[0])] * 9)
    # a budget of gathered context: 8 rows of 8 pages (256 tokens) not held, 8 rows of 4 pages and one row of 8 are
    small = DecodeGraphs(model, graphs_kv, scratch_page=40, max_seqs=8, max_pages=8, capture=False,
                         max_context_tokens=128)
    assert (8, 8) not in small.shapes and {(8, 4), (1, 8), (4, 8)} <= small.shapes
    assert not small.fits([([1], 17, tables[5])] * 8) and small.fits([([1], 12, tables[4])] * 8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engine_with_graphs_generates_the_same_tokens(tmp_path: Path, device: str) -> None:
    """Greedy continuous batching of five prompts (decodes batched beside prefill chunks, sequences finishing at
    different steps): the same tokens with the decode-only steps through the graphs as without; those steps were
    taken by the graphs. On the CPU the graphs' padded forward runs eagerly (`use_cuda_graphs` captures only on a GPU)."""
    from workbench.serve.engine import Engine, EngineConfig, Seq
    from workbench.serve.sampling import SamplingParams

    ckpt = random_llama(tmp_path, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, dtype="float32")
    model = Model.load(ckpt, device=device)
    prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(5 + 9 * i)] for i in range(5)]

    def run(graphs: bool, pieces: bool = False) -> tuple[dict[str, list[int]], int, int]:
        eng = Engine(model, EngineConfig(num_pages=64, page_size=4, max_batched_tokens=24, max_seqs=8))
        if graphs:
            scratch = eng.alloc.allocate(1)
            assert scratch is not None
            eng.graphs = DecodeGraphs(model, eng.kv, scratch[0], 8, 16)
            if pieces:
                eng.pieces = PieceGraphs(model, eng.kv, scratch[0], 24)
        for i, p in enumerate(prompts):
            eng.add(Seq(str(i), p, SamplingParams(max_tokens=6 + 3 * i, temperature=0.0, ignore_eos=True)))
        out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        steps = piece_steps = 0
        while eng.has_work:
            for o in eng.step():
                out[o.id].extend(o.tokens)
            steps += int(eng.last_step.get("graph", 0.0))
            piece_steps += int(eng.last_step.get("pieces", 0.0))
        return out, steps, piece_steps

    plain, none, no_pieces = run(False)
    with_graphs, graph_steps, _ = run(True)
    assert none == 0 and no_pieces == 0 and graph_steps >= 5
    assert with_graphs == plain
    assert [len(plain[str(i)]) for i in range(5)] == [6, 9, 12, 15, 18]
    with_pieces, graph_steps2, piece_steps = run(True, pieces=True)
    assert with_pieces == plain and graph_steps2 == graph_steps and piece_steps >= 3


@pytest.mark.gpu
def test_engine_reads_results_through_pinned_memory(tmp_path: Path) -> None:
    """A step's results come to the host through the engine's pinned buffers (an event wait, not a blocking copy to
    pageable memory): the values `.cpu()` gives, for strided and growing inputs of two dtypes; sampling with a seed
    draws the same tokens from them as from `.cpu()`'s rows."""
    from workbench.serve.engine import Engine, EngineConfig
    from workbench.serve.sampling import SamplingParams, sample

    ckpt = random_llama(tmp_path, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, dtype="float32")
    eng = Engine(Model.load(ckpt, device="cuda"), EngineConfig(num_pages=8, page_size=4))
    g = torch.Generator(device="cuda").manual_seed(3)
    for rows in (3, 2000):
        logits = torch.randn((rows, 512), device="cuda", generator=g)[:, :258]   # strided, like a vocab slice
        host = eng._to_host(logits)
        assert host.device.type == "cpu" and host.is_pinned() and torch.equal(host, logits.cpu())
        ids = eng._to_host(logits.argmax(-1))
        assert ids.dtype == torch.long and ids.tolist() == logits.argmax(-1).tolist()
        params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
        assert [sample(host[i], params, 0) for i in range(3)] == [sample(r, params, 0) for r in logits.cpu()[:3]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_piece_graphs_equal_the_plain_forward(tmp_path: Path, device: str) -> None:
    """Steps with prefill chunks — alone, beside decodes, several of different lengths, a chunk that continues a
    prompt — padded to 16 or 32 tokens: the logits and every real page's K/V as `Model.forward` gives them; the
    padding rows write only into the scratch page. On a GPU the pieces are captured and replayed, each step
    twice (the second over the first's stale padding)."""
    ckpt = random_llama(tmp_path, hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128, dtype="float32")
    model = Model.load(ckpt, device=device)
    assert PieceGraphs.supports(model)
    tol = 1e-5 if device == "cpu" else 2e-4
    g = torch.Generator().manual_seed(2)
    pages_total = 41
    base = torch.randn((3, pages_total, 2, 2, 4, 16), generator=g)
    kv = KVCache(model.cfg, num_pages=pages_total, page_size=4, device=device)
    pieces = PieceGraphs(model, kv, scratch_page=40, max_tokens=32)
    assert pieces.sizes == (16, 32) and pieces.capture == (device == "cuda")
    order = torch.randperm(40, generator=g).tolist()
    tables = [order[5 * i:5 * i + 5] for i in range(8)]

    def tok(n: int) -> list[int]:
        return [int(x) for x in torch.randint(0, 256, (n,), generator=g)]

    steps = [
        [(tok(7), 0, tables[0])],                                               # one prompt alone: 7 → 16
        [(tok(1), 9, tables[1]), (tok(1), 4, tables[2]), (tok(12), 0, tables[3])],   # 2 decodes + 12: 14 → 16
        [(tok(5), 0, tables[4]), (tok(9), 3, tables[5]), (tok(1), 15, tables[6])],   # two chunks, one continuing
        [(tok(17), 0, tables[7]), (tok(1), 11, tables[0])],                      # 18 → 32
        [(tok(15), 0, tables[1]), (tok(1), 6, tables[2])],                       # 16 → 16, padding in row 16
    ]
    for items in steps:
        for merge in (0, 0, 1 << 30):    # twice apart (replayed graphs), then the decodes among the prefills
            ref = KVCache(model.cfg, num_pages=pages_total, page_size=4, device=device)
            ref.data.copy_(base)
            kv.data.copy_(base)
            batch = Batch.build(items, 4, device=device, merge_pairs=merge)
            assert (batch.decodes is None) == (merge > 0 or all(len(it[0]) > 1 for it in items))
            assert pieces.fits(batch)
            want = model.forward(Batch.build(items, 4, device=device), ref)
            got = pieces.run(batch).clone()
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
            torch.testing.assert_close(kv.data[:, :40], ref.data[:, :40], atol=tol, rtol=tol)
    assert not pieces.fits(Batch.build([(tok(33), 0, list(range(9)))], 4, device=device))
    if device == "cuda":
        assert set(pieces.pieces) == {16, 32}
        assert all(gr is not None for pc in pieces.pieces.values() for gr in pc.graphs)
