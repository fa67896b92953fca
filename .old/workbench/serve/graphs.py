"""CUDA graphs of the serving engine's steps: decode-only steps whole (`DecodeGraphs`), the others in pieces
around an eager attention (`PieceGraphs`, below).

A decode step of a small model on a fast GPU is bound by the host launching its kernels: on one H200 behind a
virtual machine's host, a 1.2 B Llama's decode step issues ~745 launches at ~9 µs each while the GPU's own work is
4 ms of the step's 14 (`benchmarks/serve_step_profile.py`). As vLLM does, a decode-only batch is padded to a
captured shape — B sequences whose page tables have P pages, B and P powers of two — and the whole forward
(embedding, every layer's KV write and batched attention, the LM head) replays as one graph. The step's index
vectors (tokens, positions, KV slots, page tables, context lengths) are one host→device copy into the graph's
static input; the mask is computed inside the graph. Padding rows write their K/V into a scratch page the engine
reserves and attend to it alone; their logits are dropped.

Shapes are captured up to a budget of gathered context (B·P·page_size tokens, `max_context_tokens`): the batched
attention gathers every row's pages, so a graph's memory grows with B·P; larger steps run eagerly.

Where the model is not on a GPU (or `capture=False`) the same padded forward runs eagerly: the test of the padding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench.serve.model import Batch, Decodes, Model, SeqChunk, padded_table

Item = tuple[Sequence[int], int, Sequence[int]]   # (new token ids, start position, page table), as `Batch.build`


def sizes(limit: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first one ≥ `limit` (the captured batch sizes and page counts)."""
    out = [1]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return tuple(out)


def _bucket(n: int, options: tuple[int, ...]) -> int:
    return next(x for x in options if x >= n)


@dataclass
class _Graph:
    """One captured shape: B rows of P pages; `vec` the static device input, `host` its pinned staging copy."""

    B: int
    P: int
    vec: torch.Tensor
    host: torch.Tensor
    graph: Any = None                 # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None

    def views(self) -> tuple[torch.Tensor, ...]:
        """tokens, positions, slot pages, slot offsets [B]; page table [B, P]; context lengths [B]."""
        B, P, v = self.B, self.P, self.vec
        return v[:B], v[B:2 * B], v[2 * B:3 * B], v[3 * B:4 * B], v[4 * B:4 * B + B * P].view(B, P), v[4 * B + B * P:]


class DecodeGraphs:
    """The decode-only steps of one engine as captured CUDA graphs (`run` pads, copies, replays)."""

    def __init__(self, model: Model, kv: Any, scratch_page: int, max_seqs: int, max_pages: int,
                 capture: bool | None = None, max_context_tokens: int = 1 << 18) -> None:
        self.model, self.kv = model, kv
        self.scratch = scratch_page
        self.page_size = int(kv.page_size)
        self.batch_sizes = sizes(max(1, max_seqs))
        self.page_counts = sizes(max(1, max_pages))
        # the shapes held: every (B, P) whose gathered context fits the budget (B = 1 always, at every P)
        self.shapes = {(b, p) for b in self.batch_sizes for p in self.page_counts
                       if b == 1 or b * p * self.page_size <= max_context_tokens}
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.pool: Any = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._arange = torch.arange(self.page_counts[-1] * self.page_size, device=model.device)
        self._warm = False
        self.capture_seconds = 0.0

    # ----- which steps -----
    def fits(self, items: Sequence[Item]) -> bool:
        """A step this can run: every chunk one token, its padded shape among the shapes held."""
        if not self.model.batched_decode or not items or len(items) > self.batch_sizes[-1]:
            return False
        ps, most = self.page_size, self.page_counts[-1]
        if not all(len(ids) == 1 and start // ps < most for ids, start, _ in items):
            return False
        need = max(start // ps + 1 for _, start, _ in items)
        return (_bucket(len(items), self.batch_sizes), _bucket(need, self.page_counts)) in self.shapes

    # ----- one step -----
    def run(self, items: Sequence[Item]) -> torch.Tensor:
        """Logits [len(items), vocab] of a decode-only step (a view into the graph's output: read it before the
        next step)."""
        ps = self.page_size
        need = [start // ps + 1 for _, start, _ in items]
        B = len(items)
        g = self._graph(_bucket(B, self.batch_sizes), _bucket(max(need), self.page_counts))
        pad = g.B - B
        toks = [ids[0] for ids, _, _ in items] + [0] * pad
        pos = [start for _, start, _ in items] + [0] * pad
        spage = [pages[start // ps] for _, start, pages in items] + [self.scratch] * pad
        soff = [start % ps for _, start, _ in items] + [0] * pad
        table = padded_table([pages for _, _, pages in items], need, g.P) + [self.scratch] * (g.P * pad)
        ctx = [start + 1 for _, start, _ in items] + [1] * pad
        g.host.copy_(torch.tensor(toks + pos + spage + soff + table + ctx, dtype=torch.long))
        g.vec.copy_(g.host, non_blocking=True)
        if g.graph is not None:
            g.graph.replay()
            assert g.logits is not None
            return g.logits[:B]
        return self._forward(g)[:B]

    # ----- capture -----
    def capture_all(self) -> int:
        """Capture every shape now (largest first, so that the smaller ones reuse its memory), before serving:
        a capture in the middle of a run would stall that step. Returns the number of shapes."""
        for B, P in sorted(self.shapes, key=lambda s: (-s[0] * s[1], -s[0])):
            self._graph(B, P)
        return len(self.graphs)

    def _graph(self, B: int, P: int) -> _Graph:
        g = self.graphs.get((B, P))
        if g is not None:
            return g
        dev = self.model.device
        n = 4 * B + B * P + B
        g = _Graph(B, P, torch.zeros(n, dtype=torch.long, device=dev),
                   torch.zeros(n, dtype=torch.long, pin_memory=dev.type == "cuda"))
        # harmless inputs while capturing: every row the scratch page, one token of context
        _, _, spage, _, table, ctx = g.views()
        spage.fill_(self.scratch)
        table.fill_(self.scratch)
        ctx.fill_(1)
        if self.capture:
            t0 = time.perf_counter()
            self._capture(g)
            self.capture_seconds += time.perf_counter() - t0
        self.graphs[(B, P)] = g
        return g

    def _capture(self, g: _Graph) -> None:
        if not self._warm:   # libraries' lazy set-up (cuBLAS handles, workspaces) outside any capture
            side = torch.cuda.Stream(self.model.device)
            side.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(g)
            torch.cuda.current_stream(self.model.device).wait_stream(side)
            self._warm = True
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            g.logits = self._forward(g)
        g.graph = graph

    def _forward(self, g: _Graph) -> torch.Tensor:
        """The padded step through the model's own forward (what a graph holds)."""
        tokens, positions, spage, soff, table, ctx = g.views()
        width = g.P * self.page_size
        mask = (self._arange[:width][None, :] < ctx[:, None]).view(g.B, 1, width)
        chunks = [SeqChunk(1, 0, ()) for _ in range(g.B)]
        batch = Batch(tokens, positions, spage, soff, chunks, [], Decodes(list(range(g.B)), table, mask, None))
        return self.model.forward(batch, self.kv)


# ====================================================================== steps with prefill chunks: piecewise
MIN_TOKENS = 16   # the smallest padded token count of a piecewise step


@dataclass
class _Pieces:
    """One padded token count T: the static inputs (`vec`: tokens, positions, slot pages, slot offsets), the
    attention's output as the next piece reads it (`att`), each piece's graph and its outputs: the hidden state
    after it (`h[k]`) and the queries of the layer it ends before (`q[k]`)."""

    T: int
    vec: torch.Tensor
    att: torch.Tensor          # [T + 1, heads, head_dim]: the pieces read rows 0..T-1; row T takes padding queries
    graphs: list[Any]
    h: list[torch.Tensor]
    q: list[torch.Tensor | None]
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


class PieceGraphs:
    """The steps that hold a prefill chunk (or a decode batch too large for `DecodeGraphs`) as CUDA graphs in
    pieces, as vLLM's piecewise graphs: everything between two attentions — a layer's output projection and MLP,
    the next layer's norm, QKV projection, RoPE and KV write — depends on the step's token count alone, so it is
    captured once per padded count T (powers of two from `MIN_TOKENS` to `max_tokens`), and each layer's attention,
    which depends on the step's sequences, pages and contexts, runs eagerly between the pieces. A step of L layers
    replays L + 1 pieces and runs L attentions: on one H200 a step of one 32-token chunk launched 77 times instead
    of 373 and took 2.58 ms instead of 7.33 (`benchmarks/serve_step_profile.py --graphs`).

    Padding rows (T past the step's tokens) write their K/V into the scratch page; their outputs are never read.
    Dense models on one device only (a mixture of experts routes on the host; TP all-reduces are not captured).
    Where the model is not on a GPU (or `capture=False`) the same pieces run eagerly: the test of the padding."""

    def __init__(self, model: Model, kv: Any, scratch_page: int, max_tokens: int, capture: bool | None = None) -> None:
        self.model, self.kv = model, kv
        self.scratch = scratch_page
        self.layers = list(model.layers)
        self.sizes = tuple(x for x in sizes(max(MIN_TOKENS, max_tokens)) if x >= MIN_TOKENS)
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.pool: Any = torch.cuda.graph_pool_handle() if self.capture else None
        self.pieces: dict[int, _Pieces] = {}
        self._warm = False
        self.capture_seconds = 0.0

    @staticmethod
    def supports(model: Model) -> bool:
        """A model whose every piece can be captured: dense, whole (first and last stage), one TP rank."""
        return not model.cfg.num_experts and model.first and model.last and model.tp_size == 1

    def fits(self, batch: Batch) -> bool:
        return batch.token_rows is not None and int(batch.token_rows.shape[1]) <= self.sizes[-1]

    # ----- one step -----
    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Logits [chunks, vocab] of `batch` (built by `Batch.build`)."""
        assert batch.token_rows is not None
        T = int(batch.token_rows.shape[1])
        pc = self._pieces(_bucket(T, self.sizes))
        rows = pc.vec.view(4, pc.T)
        rows[:, :T].copy_(batch.token_rows)
        rows[2, T:].fill_(self.scratch)      # padding rows: K/V into the scratch page (offsets stay valid ones)
        m, L = self.model, len(self.layers)
        for k in range(L + 1):
            self._replay(pc, k)
            if k < L:
                q = pc.q[k]
                assert q is not None
                m.attention(self.layers[k], q[:T], batch, self.kv, out=pc.att)
        return m.logits(pc.h[L][:T], batch)

    # ----- capture -----
    def capture_all(self) -> int:
        """Capture every padded count now, largest first (the smaller ones reuse its memory). Returns their number
        of graphs."""
        for T in sorted(self.sizes, reverse=True):
            self._pieces(T)
        return sum(len(pc.graphs) for pc in self.pieces.values())

    @torch.inference_mode()
    def _pieces(self, T: int) -> _Pieces:
        pc = self.pieces.get(T)
        if pc is not None:
            return pc
        m, L, dev = self.model, len(self.layers), self.model.device
        vec = torch.zeros(4 * T, dtype=torch.long, device=dev)
        vec.view(4, T)[2].fill_(self.scratch)
        pc = _Pieces(T, vec, torch.zeros((T + 1, m.num_heads, m.cfg.head_dim), dtype=m.dtype, device=dev),
                     [None] * (L + 1), [vec] * (L + 1), [None] * (L + 1))
        if self.capture:
            t0 = time.perf_counter()
            if not self._warm:   # libraries' lazy set-up outside any capture
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for k in range(L + 1):
                        self._piece(pc, k)
                torch.cuda.current_stream(dev).wait_stream(side)
                self._warm = True
            for k in range(L + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._piece(pc, k)
                pc.graphs[k] = graph
            self.capture_seconds += time.perf_counter() - t0
        self.pieces[T] = pc
        return pc

    def _replay(self, pc: _Pieces, k: int) -> None:
        g = pc.graphs[k]
        if g is not None:
            g.replay()
        else:
            self._piece(pc, k)

    def _piece(self, pc: _Pieces, k: int) -> None:
        """Piece k: the embedding and RoPE tables (k = 0) or layer k-1's output projection and MLP, then layer k's
        queries and KV write (k < L); its outputs into `pc.h[k]`, `pc.q[k]` (a graph's static outputs)."""
        m, L = self.model, len(self.layers)
        tokens, positions, spage, soff = pc.vec.view(4, pc.T)
        if k == 0:
            h = m.embed(tokens)
            pc.cos, pc.sin = m.rope(positions)
        else:
            h = m.post_attention(self.layers[k - 1], pc.h[k - 1], pc.att[:pc.T])
        assert pc.cos is not None and pc.sin is not None
        pc.h[k] = h
        pc.q[k] = m.pre_attention(self.layers[k], h, spage, soff, self.kv, pc.cos, pc.sin) if k < L else None
