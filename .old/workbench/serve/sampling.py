"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, with a seed.

Each token draws from its own generator seeded by (request seed, token index), so a seeded
request gives the same tokens whichever worker samples which token (colocated, or the
prefill worker the first and the decode worker the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0               # 0 or -1: no top-k
    seed: int = 0
    stop: tuple[str, ...] = ()   # stop strings (applied by the front end, on text)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise WorkbenchError(f"max_tokens: must be ≥ 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise WorkbenchError(f"temperature: must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise WorkbenchError(f"top_p: must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """One token from `logits` [vocab] (fp32) for the `index`-th generated token of a request."""
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.float() / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        cum = torch.cumsum(probs, -1)
        drop = cum - probs > params.top_p       # keep the smallest prefix whose mass reaches top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    probs = torch.softmax(x, -1).cpu()
    g = torch.Generator().manual_seed((params.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
    return int(torch.multinomial(probs, 1, generator=g))
