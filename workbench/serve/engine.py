"""Continuous batching over a paged KV cache, with chunked prefill (one worker's engine loop).

Every `step()` builds one batch under a token budget: first one token for each running
(decoding) sequence, then prefill chunks of waiting sequences with what is left of the budget
(Sarathi-style chunked prefill, as vLLM's V1 scheduler does). Pages are allocated as
sequences grow; when the cache runs out, the newest running sequence is preempted (pages
freed, recomputed later). Roles: `colocated` (prefill + decode), `prefill` (prompt only,
first token sampled, KV pages handed to a decode worker layer by layer through a hook),
`decode` (KV arrives from a prefill worker; the sequence joins the batch once the
immediate count says every layer landed). On a GPU, decode-only steps can replay captured CUDA graphs, and the
other steps captured pieces around an eager attention (`use_cuda_graphs`, `graphs.py`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.serve.host import HostReader
from workbench.serve.kv import KVCache, PageAllocator
from workbench.serve.model import Batch, Model
from workbench.serve.sampling import SamplingParams, sample


@dataclass
class Seq:
    id: str
    prompt: list[int]
    params: SamplingParams
    out: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    computed: int = 0             # tokens whose K/V is in the cache
    arrival: float = field(default_factory=time.monotonic)
    ready: Callable[[], bool] | None = None   # decode role: KV landed?
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


@dataclass(frozen=True)
class Output:
    """New tokens of one sequence after a step; `finish` is None while it goes on."""

    id: str
    tokens: tuple[int, ...]
    finish: str | None = None
    prompt_tokens: int = 0


@dataclass
class EngineConfig:
    num_pages: int = 512
    page_size: int = 16
    max_batched_tokens: int = 256
    max_seqs: int = 64
    role: str = "colocated"


class Engine:
    def __init__(self, model: Model, cfg: EngineConfig, kv: KVCache | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.kv = kv or KVCache(model.cfg, cfg.num_pages, cfg.page_size, dtype=model.dtype, device=model.device,
                                kv_heads=model.num_kv_heads)
        self.alloc = PageAllocator(self.kv.num_pages)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.pending_kv: list[Seq] = []       # decode role: waiting for the KV pages
        self.seqs: dict[str, Seq] = {}
        self.eos = set(model.cfg.eos_token_ids)
        self.preemptions = 0
        self.last_batch = (0, 0)             # (sequences, tokens) of the last step
        # the last step's composition and the seconds of each of its phases (`STEP_FIELDS`): what a step
        # microbenchmark must reproduce to price the steps a server runs
        self.last_step: dict[str, float] = {}
        self.last_admitted: list[tuple[str, float]] = []
        # prefill role: `on_layer(layer, seqs)` after each layer for the sequences that finish their prompt now
        self.on_layer: Callable[[int, list[Seq]], None] | None = None
        # tensor parallelism: `on_batch(items)` hands each step's batch to the other ranks before the forward
        self.on_batch: Callable[[list[Any]], None] | None = None
        self.graphs: Any = None              # DecodeGraphs once `use_cuda_graphs` captured them
        self.pieces: Any = None              # PieceGraphs (the other steps) once `use_cuda_graphs` captured them
        # a step's results come to the host through pinned buffers (`HostReader`: no blocking copy that would stall
        # other threads' kernel launches, e.g. a transport receiver's)
        self._to_host = HostReader()

    def use_cuda_graphs(self, max_context: int | None = None, pieces: bool = True) -> int:
        """Capture the decode-only steps as CUDA graphs (batches up to `max_seqs`, contexts up to `max_context`
        tokens: the model's, bounded by the cache) and, with `pieces` (a dense whole model), the other steps as
        per-layer pieces around an eager attention (up to `max_batched_tokens`), and replay them from now on; one
        page is kept as the padding rows' scratch. Returns the number of graphs captured."""
        from workbench.serve.graphs import DecodeGraphs, PieceGraphs

        if self.graphs is not None:
            return len(self.graphs.graphs) + (self.pieces.capture_all() if self.pieces is not None else 0)
        scratch = self.alloc.allocate(1)
        if scratch is None:
            raise WorkbenchError("kv cache: no free page for the CUDA graphs' scratch page")
        ctx = min(max_context or self.model.cfg.max_position, (self.kv.num_pages - 1) * self.cfg.page_size)
        self.graphs = DecodeGraphs(self.model, self.kv, scratch[0], self.cfg.max_seqs,
                                   -(-ctx // self.cfg.page_size))
        n = self.graphs.capture_all()
        if pieces and PieceGraphs.supports(self.model):
            self.pieces = PieceGraphs(self.model, self.kv, scratch[0], self.cfg.max_batched_tokens)
            n += self.pieces.capture_all()
        return n

    @property
    def capture_seconds(self) -> float:
        """Seconds spent capturing CUDA graphs."""
        return sum(g.capture_seconds for g in (self.graphs, self.pieces) if g is not None)

    # ----- requests -----
    def add(self, seq: Seq) -> None:
        self.seqs[seq.id] = seq
        if seq.ready is not None:
            self.pending_kv.append(seq)
        else:
            self.waiting.append(seq)

    def abort(self, sid: str) -> bool:
        seq = self.seqs.pop(sid, None)
        if seq is None:
            return False
        for q in (self.running, self.pending_kv):
            if seq in q:
                q.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.alloc.release(seq.pages)
        seq.pages = []
        return True

    def reserve(self, n_tokens: int) -> list[int] | None:
        """Decode role: pages for a prompt of `n_tokens` that a prefill worker will fill."""
        return self.alloc.allocate(-(-n_tokens // self.cfg.page_size))

    @property
    def capacity(self) -> int:
        """The longest sequence the cache can hold."""
        return self.kv.num_pages * self.cfg.page_size

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.pending_kv)

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.running), "waiting": len(self.waiting) + len(self.pending_kv),
                "kv_used_pages": self.alloc.used, "kv_pages": self.alloc.num_pages,
                "kv_bytes_used": self.alloc.used * self.kv.page_bytes * self.kv.num_layers,
                "preemptions": self.preemptions, "batch_seqs": self.last_batch[0], "batch_tokens": self.last_batch[1]}

    # ----- one step -----
    def _grow(self, seq: Seq, upto: int) -> bool:
        need = -(-upto // self.cfg.page_size) - len(seq.pages)
        if need <= 0:
            return True
        got = self.alloc.allocate(need)
        if got is None:
            return False
        seq.pages.extend(got)
        return True

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.alloc.release(seq.pages)
        seq.pages, seq.computed = [], 0
        seq.meta.setdefault("prompt_len", len(seq.prompt))
        seq.meta["base"] = seq.meta.get("base", 0) + len(seq.out)
        seq.prompt, seq.out = seq.prompt + seq.out, []  # recompute the whole context later
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> list[tuple[Seq, int]]:
        for seq in list(self.pending_kv):
            if seq.ready is not None and seq.ready():
                self.pending_kv.remove(seq)
                seq.ready = None
                self.running.append(seq)
        budget = self.cfg.max_batched_tokens
        plan: list[tuple[Seq, int]] = []
        for seq in list(self.running):
            if seq not in self.running or budget <= 0:
                continue
            n = min(seq.length - seq.computed, budget)
            while not self._grow(seq, seq.computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                plan.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_seqs:
            seq = self.waiting[0]
            n = min(seq.length - seq.computed, budget)
            if not self._grow(seq, seq.computed + n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
        return plan

    def step(self) -> list[Output]:
        t0 = time.perf_counter()
        plan = self.schedule()
        if not plan:
            self.last_batch = (0, 0)
            self.last_step, self.last_admitted = {}, []
            return []
        t1 = time.perf_counter()
        # requests whose first prompt chunk runs now, with the (monotonic) time they reached the engine
        self.last_admitted = [(seq.id, seq.arrival) for seq, n in plan if seq.computed == 0 and not seq.out]
        items = [(seq.tokens[seq.computed:seq.computed + n], seq.computed, list(seq.pages)) for seq, n in plan]
        if self.on_batch is not None:
            self.on_batch(items)
        finishing = [seq for seq, n in plan if seq.computed + n == seq.length]
        hook = None
        if self.on_layer is not None and finishing:
            on_layer = self.on_layer
            hook = lambda layer: on_layer(layer, finishing)  # noqa: E731
        graph = hook is None and self.graphs is not None and self.graphs.fits(items)
        batch = None if graph else Batch.build(items, self.cfg.page_size, device=self.model.device,
                                                  merge_pairs=self.model.merge_pairs)
        pieces = batch is not None and hook is None and self.pieces is not None and self.pieces.fits(batch)
        comp = composition(plan) | {"graph": float(graph), "pieces": float(pieces)}
        t2 = time.perf_counter()
        if batch is None:
            logits = self.graphs.run(items)
        elif pieces:
            logits = self.pieces.run(batch)
        else:
            logits = self.model.forward(batch, self.kv, after_layer=hook)
        t3 = time.perf_counter()
        self.last_batch = (len(plan), sum(len(ids) for ids, _, _ in items))
        outs: list[Output] = []
        greedy = self._to_host(logits.argmax(-1)).tolist()   # one device→host copy for every row (waits for the GPU)
        t4 = time.perf_counter()
        rows = None
        for i, (seq, n) in enumerate(plan):
            seq.computed += n
            if seq.computed < seq.length:
                continue  # a prefill chunk that did not reach the end of the prompt
            index = seq.meta.get("base", 0) + len(seq.out)
            if seq.params.greedy:
                tok = int(greedy[i])
            else:
                rows = self._to_host(logits) if rows is None else rows
                tok = sample(rows[i], seq.params, index)
            seq.out.append(tok)
            finish = self._finish_reason(seq, tok)
            if self.cfg.role == "prefill" and finish is None:
                finish = "prefilled"
            outs.append(Output(seq.id, (tok,), finish, seq.meta.get("prompt_len", len(seq.prompt))))
            if finish is not None:
                self.running.remove(seq)
                self.seqs.pop(seq.id, None)
                if self.cfg.role != "prefill":
                    self.alloc.release(seq.pages)
                    seq.pages = []
        t5 = time.perf_counter()
        self.last_step = comp | {"t_schedule": t1 - t0, "t_build": t2 - t1, "t_forward": t3 - t2, "t_sync": t4 - t3,
                                 "t_finish": t5 - t4, "sampled": float(len(outs))}
        return outs

    def _finish_reason(self, seq: Seq, tok: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and (tok in self.eos or tok in p.stop_token_ids):
            return "stop"
        if seq.meta.get("base", 0) + len(seq.out) >= p.max_tokens:
            return "length"
        if seq.length >= min(self.model.cfg.max_position, self.capacity):
            return "length"
        return None


def composition(plan: list[tuple[Seq, int]]) -> dict[str, float]:
    """What a step holds, in the terms the serving simulator prices: prefill chunks (`prefill_seqs`, their tokens,
    `prefill_work` = Σ chunk·(context before it + chunk/2)), decodes (`decode_seqs`: one new token of a sequence that
    has generated before, `decode_kv`: the KV tokens they read)."""
    pf_seqs = pf_tokens = dec_seqs = dec_kv = 0
    pf_work = 0.0
    for seq, n in plan:
        if n == 1 and seq.out and seq.computed == seq.length - 1:
            dec_seqs += 1
            dec_kv += seq.computed + 1
        else:
            pf_seqs += 1
            pf_tokens += n
            pf_work += n * (seq.computed + n / 2)
    return {"prefill_seqs": float(pf_seqs), "prefill_tokens": float(pf_tokens), "prefill_work": float(pf_work),
            "decode_seqs": float(dec_seqs), "decode_kv": float(dec_kv)}


#: the per-step fields `Engine.last_step` holds (the composition, then the seconds of each phase)
STEP_FIELDS = ("prefill_seqs", "prefill_tokens", "prefill_work", "decode_seqs", "decode_kv", "sampled",
               "t_schedule", "t_build", "t_forward", "t_sync", "t_finish")


def generate(model: Model, prompts: list[list[int]], params: SamplingParams, cfg: EngineConfig | None = None,
             ) -> list[list[int]]:
    """Offline: every prompt through one engine with continuous batching; the generated ids."""
    eng = Engine(model, cfg or EngineConfig())
    for i, p in enumerate(prompts):
        eng.add(Seq(str(i), list(p), params))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    with torch.inference_mode():
        while eng.has_work:
            for o in eng.step():
                out[o.id].extend(o.tokens)
    return [out[str(i)] for i in range(len(prompts))]
