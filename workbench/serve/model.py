"""Llama-family and Mixtral (MoE) decoder forward in torch, over a paged KV cache.

Loads a Hugging Face checkpoint directory (`config.json` + `*.safetensors`) into plain
tensors and runs a batch of sequence chunks at once: the linear layers see every token of
the batch; the chunks of one token (decodes) attend together in one batched call per layer
over a padded page table, and so do the longer chunks (prefill: a second call over their padded pages and queries,
causally masked). The maths follows the
`transformers` implementations (RMSNorm in fp32, rotate-half RoPE incl. `llama3`/`linear`
scaling, GQA, SiLU-gated MLP, Mixtral's softmax → top-k → renormalise router), so greedy
tokens match `generate` on the same checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.serve.host import HostReader

# Model.merge_pairs on a GPU: a chosen bound, not a fitted one (the H200 step profile's mixed steps added up to
# ~117 k pairs and each ran faster merged; 60 decodes at 1024 beside a 128-token chunk would add ~8 M)
MERGE_PAIRS = 1 << 18

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "mixtral"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder, read once from a Hugging Face `config.json`."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool = False
    num_experts: int = 0
    experts_per_tok: int = 0
    attention_bias: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    name: str = "model"

    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str = "model") -> ModelConfig:
        archs = d.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            mt = d.get("model_type")
            arch = {"llama": "llama", "mistral": "llama", "mixtral": "mixtral"}.get(str(mt))
        if arch is None:
            raise WorkbenchError(
                f"config.json architectures: {archs or d.get('model_type')!r} is not served here "
                f"(supported: {', '.join(ARCHITECTURES)})")
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        if scaling:
            rope.update(scaling)
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "llama3", "linear"):
            raise WorkbenchError(f"config.json rope type: {rtype!r} is not supported (default, llama3, linear)")
        extra = tuple(sorted((k, v) for k, v in rope.items() if k not in ("rope_theta", "type")))
        heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            arch=arch, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            max_position=int(d.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            num_experts=int(d.get("num_local_experts", 0)), experts_per_tok=int(d.get("num_experts_per_tok", 0)),
            attention_bias=bool(d.get("attention_bias", False)), rope_scaling=extra,
            eos_token_ids=eos_ids, bos_token_id=d.get("bos_token_id"), name=name)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token at fp32 (scale by the element size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


@dataclass
class SeqChunk:
    """One sequence's part of a batch: `n` new tokens at positions `start .. start+n`."""

    n: int
    start: int
    pages: Sequence[int]
    page_idx: torch.Tensor | None = None   # the pages holding positions 0 .. start+n, on the device


@dataclass
class Decodes:
    """The one-token chunks of a batch, attended together: `pages` [B, P] each one's page table padded to the
    longest with its own first page, `mask` [B, 1, P * page_size] True on the keys it sees (positions
    0 .. start), `rows` [B] their rows among the batch's tokens (None when every chunk is one of them, in order)."""

    chunks: list[int]             # their indices in `Batch.chunks`
    pages: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None


@dataclass
class Prefills:
    """The chunks of more than one token (and, in a merged step, the decodes too: `Batch.build`'s `merge_pairs`),
    attended together over N = the longest one's token count: `pages` [B, P] each one's page table padded with its
    own first page; `queries` [B, N] the rows of the batch's tokens that hold each chunk's queries (padding: the
    chunk's first row); `rows` [B, N] where their outputs go in an output buffer of T + `pad` rows (every padding
    query's output lands in row T, `pad` = 1, and is dropped; `pad` = 0 where no chunk is padded); `mask`
    [B, N, P * page_size] True on the keys a query sees: positions up to its own (so within its chunk's
    context); a padding query sees key 0 only, so that no row is fully masked."""

    chunks: list[int]             # their indices in `Batch.chunks`
    pages: torch.Tensor
    queries: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor
    pad: int
    #: the mask for GQA-grouped queries as an additive bias, per (query heads per KV head, dtype): made by the
    #: first layer of the step that needs it, reused by the others
    grouped: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def bias(self, rep: int, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as [B, N * rep, P * page_size] of 0 / -inf in `dtype` (broadcast over the KV heads): query row
        n * rep + r is query n (the queries of the `rep` heads that share a KV head follow each other). On the CPU
        with a leading dim of 1 (a 3-dim mask sends the CPU to the unfused kernel); on a GPU 3-dim: with 4 dims one
        H200's served steps of several prefill chunks took 80-110 ms where a shape was new (the same compositions
        swept, 13 ms; with 3 dims, 10-20 ms in the served runs). The last dim's storage is padded to a multiple of
        16 so that the fused GPU kernels take it without a copy per call."""
        got = self.grouped.get((rep, dtype))
        if got is None:
            B, N, L = self.mask.shape
            m = self.mask[:, :, None, :].expand(B, N, rep, L).reshape(B, N * rep, L)
            full = torch.full((B, N * rep, -(-L // 16) * 16), float("-inf"), dtype=dtype, device=m.device)
            got = full[..., :L].masked_fill_(m, 0.0)
            if m.device.type == "cpu":
                got = got[None]
            self.grouped[(rep, dtype)] = got
        return got


def _merge_cost(chunks: Sequence[SeqChunk], need: Sequence[int], dec: Sequence[int], pre: Sequence[int],
                page_size: int) -> int:
    """The query-key pairs per head that attending the decodes `dec` among the prefills `pre` adds: every chunk
    padded to the longest chunk's queries and the widest page table, against the two calls apart."""
    N, P = max(chunks[j].n for j in pre), max(need)
    apart = (len(dec) * max(need[j] for j in dec) + len(pre) * N * max(need[j] for j in pre)) * page_size
    return len(chunks) * N * P * page_size - apart


def padded_table(tables: Sequence[Sequence[int]], need: Sequence[int], width: int) -> list[int]:
    """Page tables cut to `need` pages each and padded to `width` with their own first page, flattened: the
    batched attention's [B, width] table (the padding's keys are masked)."""
    return [p for pages, k in zip(tables, need) for p in list(pages[:k]) + [pages[0]] * (width - k)]


@dataclass
class Batch:
    tokens: torch.Tensor          # [T] token ids, chunks concatenated
    positions: torch.Tensor       # [T]
    slot_pages: torch.Tensor      # [T] the page each new token's K/V goes to
    slot_offsets: torch.Tensor    # [T] its slot inside that page
    chunks: list[SeqChunk] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)   # what it was built from (pipeline stages rebuild it)
    decodes: Decodes | None = None                    # the chunks of one token (None if there are none)
    prefills: Prefills | None = None                  # the chunks of more than one token (None if there are none)
    #: [4, T] tokens, positions, slot pages and slot offsets as one view of the step's copy (None if built apart)
    token_rows: torch.Tensor | None = None

    @classmethod
    def build(cls, items: Sequence[tuple[Sequence[int], int, Sequence[int]]], page_size: int,
              device: torch.device | str = "cpu", merge_pairs: int = 0) -> Batch:
        """`items`: (new token ids, start position, page table) per sequence. A step of decodes and prefill chunks
        puts its decodes among the prefills (one attention call per layer instead of two, each decode a chunk of
        one query padded to N) where that adds at most `merge_pairs` query-key pairs per head to the attention
        (`Model.merge_pairs`; 0: never)."""
        toks: list[int] = []
        pos: list[int] = []
        spage: list[int] = []
        soff: list[int] = []
        chunks = []
        for ids, start, pages in items:
            n = len(ids)
            toks.extend(ids)
            for p in range(start, start + n):
                pos.append(p)
                spage.append(pages[p // page_size])
                soff.append(p % page_size)
            chunks.append(SeqChunk(n, start, list(pages)))
        need = [-(-(c.start + c.n) // page_size) for c in chunks]
        flat = [p for c, k in zip(chunks, need) for p in c.pages[:k]]
        # the decodes' padded page table [B, P], context lengths and rows, in the same copy
        dec = [j for j, c in enumerate(chunks) if c.n == 1]
        pre = [j for j, c in enumerate(chunks) if c.n > 1]
        if dec and pre and merge_pairs > 0 and _merge_cost(chunks, need, dec, pre, page_size) <= merge_pairs:
            dec, pre = [], list(range(len(chunks)))
        P = max((need[j] for j in dec), default=0)
        table = padded_table([chunks[j].pages for j in dec], [need[j] for j in dec], P)
        lens = [chunks[j].start + 1 for j in dec]
        first = [0]
        for c in chunks:
            first.append(first[-1] + c.n)
        rows = [first[j] for j in dec]
        # the prefill chunks' padded page table [Bp, Pp], query rows, output rows and query positions [Bp, N]
        T = len(toks)
        Pp = max((need[j] for j in pre), default=0)
        N = max((chunks[j].n for j in pre), default=0)
        ptable = padded_table([chunks[j].pages for j in pre], [need[j] for j in pre], Pp)
        pq: list[int] = []
        prow: list[int] = []
        ppos: list[int] = []
        for j in pre:    # a padding query reads its chunk's first row; its output goes to row T, dropped
            c, pad = chunks[j], N - chunks[j].n
            pq += list(range(first[j], first[j] + c.n)) + [first[j]] * pad
            prow += list(range(first[j], first[j] + c.n)) + [T] * pad
            ppos += list(range(c.start, c.start + c.n)) + [0] * pad
        # one host→device copy for all index vectors of the step
        allv = torch.tensor(toks + pos + spage + soff + flat + table + lens + rows + ptable + pq + prow + ppos,
                            dtype=torch.long).to(device, non_blocking=True)
        a = 4 * T
        for c, k in zip(chunks, need):
            c.page_idx = allv[a:a + k]
            a += k
        decodes = None
        if dec:
            B = len(dec)
            ctx = allv[a + B * P:a + B * P + B]
            mask = torch.arange(P * page_size, device=allv.device)[None, :] < ctx[:, None]
            decodes = Decodes(dec, allv[a:a + B * P].view(B, P), mask.view(B, 1, P * page_size),
                              None if B == len(chunks) else allv[a + B * P + B:a + B * P + 2 * B])
        a += len(table) + len(lens) + len(rows)
        prefills = None
        if pre:
            Bp, L = len(pre), Pp * page_size
            at = [a + Bp * Pp + x * Bp * N for x in range(4)]
            qpos = allv[at[2]:at[3]].view(Bp, N, 1)
            prefills = Prefills(pre, allv[a:at[0]].view(Bp, Pp), allv[at[0]:at[1]].view(Bp, N),
                                allv[at[1]:at[2]].view(Bp, N), torch.arange(L, device=allv.device) <= qpos,
                                int(any(chunks[j].n < N for j in pre)))
        return cls(allv[:T], allv[T:2 * T], allv[2 * T:3 * T], allv[3 * T:4 * T], chunks, list(items), decodes,
                   prefills, allv[:4 * T].view(4, T))


class Model:
    """A decoder's weights (plain tensors) and its forward over a paged KV cache.

    `layers` (a range) lets a pipeline stage hold only its own layers; the first stage holds
    the embedding, the last the final norm and the LM head.
    """

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], layers: range | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None) -> None:
        self.cfg = cfg
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        if tp_size > 1:
            weights = shard_weights(weights, cfg, tp_rank, tp_size)
        self.num_heads = cfg.num_heads // tp_size
        self.num_kv_heads = cfg.num_kv_heads // tp_size
        self.layers = layers if layers is not None else range(cfg.num_layers)
        self.first = self.layers.start == 0
        self.last = self.layers.stop == cfg.num_layers
        self.device = torch.device(device)
        self.dtype = dtype
        self.w = fuse_projections({k: v.to(device=self.device, dtype=dtype if v.is_floating_point() else v.dtype)
                                   for k, v in weights.items()})
        self.inv_freq = _inv_freq(cfg).to(self.device)
        #: decodes attend in one batched call per layer (False: every chunk, decode or prefill, per sequence)
        self.batched_decode = True
        #: with `batched_decode`, prefill chunks attend in one batched call per layer too (False: per sequence)
        self.batched_prefill = True
        #: a step of decodes and prefill chunks attends in one call where that adds at most this many query-key
        #: pairs per head (`Batch.build`): on a GPU the step is bound by the host's launches, and one call saves
        #: ~5 of them per layer; on a CPU the padded queries cost real compute (0: two calls)
        self.merge_pairs = MERGE_PAIRS if self.device.type == "cuda" else 0
        self._host = HostReader()   # the forward's few device→host reads (MoE routing counts)

    # ----- loading -----
    @classmethod
    def load(cls, path: str | Path, layers: range | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None) -> Model:
        cfg = load_config(path)
        return cls(cfg, load_weights(path, cfg, layers), layers, device, dtype, tp_rank, tp_size, tp_group)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the partial results of the tensor-parallel ranks (row-parallel o_proj / down_proj)."""
        if self.tp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.tp_group)
        return x

    # ----- forward -----
    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.w["model.embed_tokens.weight"])

    @torch.inference_mode()
    def run_layers(self, h: torch.Tensor, batch: Batch, kv: Any,
                   after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run this model's layers over `h` [T, hidden], writing the new K/V into `kv`."""
        cos, sin = self.rope(batch.positions)
        for i in self.layers:
            h = self._layer(i, h, batch, kv, cos, sin)
            if after_layer is not None:
                after_layer(i)
        return h

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Logits [B, vocab] of each chunk's last token (every row of `h` where every chunk is one token: no
        host→device copy, so that a CUDA graph can hold this)."""
        if batch.decodes is not None and batch.decodes.rows is None:
            last = h
        else:
            last = h[torch.cumsum(torch.tensor([c.n for c in batch.chunks], device=h.device), 0) - 1]
        x = _rms(last, self.w["model.norm.weight"], self.cfg.rms_eps)
        head = self.w.get("lm_head.weight", self.w.get("model.embed_tokens.weight"))
        assert head is not None
        return (x @ head.T).float()

    def forward(self, batch: Batch, kv: Any, after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        h = self.embed(batch.tokens)
        h = self.run_layers(h, batch, kv, after_layer)
        return self.logits(h, batch)

    # ----- pieces -----
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _layer(self, i: int, h: torch.Tensor, batch: Batch, kv: Any, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        q = self.pre_attention(i, h, batch.slot_pages, batch.slot_offsets, kv, cos, sin)
        return self.post_attention(i, h, self.attention(i, q, batch, kv))

    # The three parts of a layer: what comes before the attention and what comes after it depend on the step's
    # token count alone (`graphs.PieceGraphs` captures them per padded count); the attention on the step's
    # sequences, pages and contexts.
    def pre_attention(self, i: int, h: torch.Tensor, slot_pages: torch.Tensor, slot_offsets: torch.Tensor, kv: Any,
                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Layer `i`'s queries [T, heads, head_dim] from `h` [T, hidden]; its new K/V written into their slots."""
        c, w, p = self.cfg, self.w, f"model.layers.{i}."
        T = h.shape[0]
        x = _rms(h, w[p + "input_layernorm.weight"], c.rms_eps)
        H, Hkv = self.num_heads, self.num_kv_heads
        qkv = F.linear(x, w[p + "self_attn.qkv_proj.weight"], w.get(p + "self_attn.qkv_proj.bias"))
        qkv = qkv.view(T, H + 2 * Hkv, c.head_dim)
        qk = qkv[:, :H + Hkv]                        # RoPE on the queries and keys together: one set of kernels
        qk = qk * cos[:, None] + _rotate_half(qk) * sin[:, None]
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        kv.write(i - self.layers.start, slot_pages, slot_offsets, k, v)
        return q

    def attention(self, i: int, q: torch.Tensor, batch: Batch, kv: Any, out: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """Layer `i`'s attention output [T, heads, head_dim] of the queries `q` of `batch`'s chunks; written into
        `out`'s first T rows where given (at least T + 1 rows: the prefills' padding queries write row T)."""
        T, d = q.shape[0], self.cfg.head_dim
        rep = self.num_heads // self.num_kv_heads
        dec = batch.decodes if self.batched_decode else None
        pre = batch.prefills if self.batched_decode and self.batched_prefill else None
        if dec is not None and dec.rows is None:    # only decodes: their output is the whole of `att`
            att = self._decode_attention(i, q, dec, kv)
            if out is not None:
                att = out[:T].copy_(att)
        else:
            # the prefills' padding queries write their (dropped) outputs to row T
            buf = out if out is not None else q.new_empty((T + (pre.pad if pre is not None else 0), self.num_heads, d))
            if dec is not None:
                buf[dec.rows] = self._decode_attention(i, q[dec.rows], dec, kv)
            if pre is not None:
                self._prefill_attention(i, q, pre, kv, buf)
            att = buf[:T]
        batched = set(dec.chunks if dec is not None else []) | set(pre.chunks if pre is not None else [])
        a = 0
        for j, ch in enumerate(batch.chunks):
            if j in batched:
                a += ch.n
                continue
            ks, vs = kv.read(i - self.layers.start, ch.page_idx if ch.page_idx is not None else ch.pages,
                             ch.start + ch.n)
            if rep > 1:
                ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
            qs = q[a:a + ch.n].transpose(0, 1)
            mask = None
            if ch.n > 1:
                ctx = ch.start + ch.n
                mask = (torch.arange(ctx, device=q.device)[None, :]
                        <= torch.arange(ch.start, ctx, device=q.device)[:, None])
            att[a:a + ch.n] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1)
            a += ch.n
        return att

    def post_attention(self, i: int, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """`h` after layer `i`'s output projection of `att` and its MLP (both with their residuals)."""
        c, w, p = self.cfg, self.w, f"model.layers.{i}."
        T = h.shape[0]
        o = self._reduce(F.linear(att.reshape(T, -1), w[p + "self_attn.o_proj.weight"]))
        if p + "self_attn.o_proj.bias" in w:
            o = o + w[p + "self_attn.o_proj.bias"]
        h = h + o
        x = _rms(h, w[p + "post_attention_layernorm.weight"], c.rms_eps)
        return h + self._reduce(self._moe(p, x) if c.num_experts else self._mlp(p + "mlp.", x))

    def _decode_attention(self, i: int, q: torch.Tensor, dec: Decodes, kv: Any) -> torch.Tensor:
        """Attention of the decodes' queries `q` [B, heads, head_dim] over their pages, in one call: the query
        heads that share a KV head are that head's queries (GQA without repeating K/V)."""
        k, v = kv.gather(i - self.layers.start, dec.pages)      # [kv_heads, B, P * page_size, head_dim]
        B, d = q.shape[0], q.shape[-1]
        qg = q.reshape(B, self.num_kv_heads, self.num_heads // self.num_kv_heads, d).transpose(0, 1)
        mask = dec.mask[None] if q.device.type == "cpu" else dec.mask   # 4 dims: the CPU's fused kernel takes it
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)   # [kv_heads, B, heads per KV head, d]
        return o.transpose(0, 1).reshape(B, self.num_heads, d)

    def _prefill_attention(self, i: int, q: torch.Tensor, pre: Prefills, kv: Any, out: torch.Tensor) -> None:
        """Attention of every prefill chunk's queries (rows of `q` [T, heads, head_dim]) over its pages, in one call,
        written to their rows of `out` [T + pre.pad, heads, head_dim]. One index op takes the queries into
        [kv_heads, B, N, heads per KV head, head_dim] (the query heads that share a KV head are that head's queries,
        GQA without repeating K/V), one index op puts the result back."""
        k, v = kv.gather(i - self.layers.start, pre.pages)     # [kv_heads, B, P * page_size, head_dim]
        rep, d = self.num_heads // self.num_kv_heads, q.shape[-1]
        B, N = pre.queries.shape
        qg = q.view(-1, self.num_kv_heads, rep, d).transpose(0, 1)[:, pre.queries]   # [kv_heads, B, N, rep, d]
        o = F.scaled_dot_product_attention(qg.reshape(self.num_kv_heads, B, N * rep, d), k, v,
                                           attn_mask=pre.bias(rep, q.dtype))
        out.view(-1, self.num_kv_heads, rep, d).transpose(0, 1)[:, pre.rows] = o.view(self.num_kv_heads, B, N, rep, d)

    def _mlp(self, p: str, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        gate, up = F.linear(x, w[p + "gate_up_proj.weight"]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w[p + "down_proj.weight"])

    def _moe(self, p: str, x: torch.Tensor) -> torch.Tensor:
        c, w = self.cfg, self.w
        probs = torch.softmax(F.linear(x, w[p + "block_sparse_moe.gate.weight"]).float(), dim=-1)
        top_w, top_i = torch.topk(probs, c.experts_per_tok, dim=-1)
        top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        # the (token, slot) pairs grouped by expert, in token order within each (as `torch.where(top_i == e)` gives
        # them), with one read of the experts' counts instead of a blocking copy per expert
        flat = top_i.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = self._host(torch.bincount(flat, minlength=c.num_experts)).tolist()
        toks, slots = order // c.experts_per_tok, order % c.experts_per_tok
        a = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            tok, slot = toks[a:a + n], slots[a:a + n]
            a += n
            q = f"{p}block_sparse_moe.experts.{e}."
            xe = x[tok]
            y = F.linear(F.silu(F.linear(xe, w[q + "w1.weight"])) * F.linear(xe, w[q + "w3.weight"]), w[q + "w2.weight"])
            out.index_add_(0, tok, y * top_w[tok, slot, None])
        return out


def fuse_projections(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's q/k/v projections (and biases, where the checkpoint has any: a missing one is zeros) as one
    `self_attn.qkv_proj` and its gate/up projections as one `mlp.gate_up_proj`, as vLLM loads them: one GEMM
    instead of three and of two, the outputs the same rows. Done after tensor-parallel sharding, so a rank's
    stack is its own q, k and v heads. Other tensors pass as they are."""
    out = dict(w)
    for name in [n for n in w if n.endswith("self_attn.q_proj.weight")]:
        p = name[:-len("q_proj.weight")]
        ws = [out.pop(p + f"{x}_proj.weight") for x in "qkv"]
        out[p + "qkv_proj.weight"] = torch.cat(ws)
        bs = [out.pop(p + f"{x}_proj.bias", None) for x in "qkv"]
        if any(b is not None for b in bs):
            out[p + "qkv_proj.bias"] = torch.cat([b if b is not None else ws[j].new_zeros(ws[j].shape[0])
                                                  for j, b in enumerate(bs)])
    for name in [n for n in w if n.endswith("mlp.gate_proj.weight")]:
        p = name[:-len("gate_proj.weight")]
        out[p + "gate_up_proj.weight"] = torch.cat([out.pop(p + "gate_proj.weight"), out.pop(p + "up_proj.weight")])
    return out


def shard_weights(w: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, size: int) -> dict[str, torch.Tensor]:
    """This rank's slice for tensor parallelism (Megatron): q/k/v and gate/up by output rows (whole
    heads), o_proj and down by input columns; norms, router, embedding and LM head replicated."""
    if cfg.num_kv_heads % size or cfg.num_heads % size or cfg.intermediate_size % size:
        raise WorkbenchError(f"plan.tp: {size} must divide the heads ({cfg.num_heads}), KV heads "
                             f"({cfg.num_kv_heads}) and intermediate size ({cfg.intermediate_size})")
    hd = cfg.head_dim
    q, kv, inter = cfg.num_heads // size * hd, cfg.num_kv_heads // size * hd, cfg.intermediate_size // size
    out = {}
    for name, t in w.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            t = t[rank * q:(rank + 1) * q]
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            t = t[rank * kv:(rank + 1) * kv]
        elif name.endswith("o_proj.weight"):
            t = t[:, rank * q:(rank + 1) * q]
        elif name.endswith(("gate_proj.weight", "up_proj.weight", "w1.weight", "w3.weight")):
            t = t[rank * inter:(rank + 1) * inter]
        elif name.endswith(("down_proj.weight", "w2.weight")):
            t = t[:, rank * inter:(rank + 1) * inter]
        out[name] = t.contiguous()
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm. In fp32 (the CPU) PyTorch's `rms_norm` is bit-identical to Hugging Face's formula; in
    16 bits it normalises in fp32 and rounds once (one fused kernel on a GPU, against eight for the formula)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = dict(cfg.rope_scaling)
    rtype = rs.get("rope_type", "default")
    if rtype == "linear":
        inv = inv / float(rs["factor"])
    elif rtype == "llama3":
        factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        raise WorkbenchError(f"model: {str(path)!r} has no config.json (give a Hugging Face checkpoint directory or 'demo')")
    return ModelConfig.from_hf(json.loads(f.read_text()), name=path.name)


def load_weights(path: str | Path, cfg: ModelConfig, layers: range | None = None) -> dict[str, torch.Tensor]:
    """The tensors of `*.safetensors` under `path` that the given layers (and ends) need (or of a
    converter package: a folder with `manifest.json`, loaded through `workbench.convert.loader`)."""
    from safetensors import safe_open

    path = Path(path)
    if (path / "manifest.json").is_file():  # a model package from `workbench convert`: its loader checks and dequantises
        from workbench.convert.loader import load_package

        layers_ = layers if layers is not None else range(cfg.num_layers)
        keep = {k: v for k, v in load_package(path).items()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) in layers_}
        if cfg.tie_embeddings and "lm_head.weight" not in keep and "model.embed_tokens.weight" in keep:
            keep["lm_head.weight"] = keep["model.embed_tokens.weight"]
        return keep
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WorkbenchError(f"model: no *.safetensors under {str(path)!r} (save the model with save_pretrained)")
    layers = layers if layers is not None else range(cfg.num_layers)
    first, last = layers.start == 0, layers.stop == cfg.num_layers

    def wanted(name: str) -> bool:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in layers
        if name == "model.embed_tokens.weight":
            return first or (last and cfg.tie_embeddings)
        return last and name in ("model.norm.weight", "lm_head.weight")

    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if wanted(name):
                    out[name] = st.get_tensor(name)
    if first and "model.embed_tokens.weight" not in out:
        raise WorkbenchError(f"model: {str(path)!r} lacks model.embed_tokens.weight")
    return out
