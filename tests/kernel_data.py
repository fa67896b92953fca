"""Random MoE routing shared by the CPU and GPU kernel tests."""

from __future__ import annotations

import numpy as np


def routing(rng: np.random.Generator, tokens: int, k: int, experts: int, used: int | None = None) -> np.ndarray:
    """top-k distinct experts per token, drawn from the first `used` experts (others stay empty)."""
    pool = experts if used is None else used
    if tokens == 0:
        return np.zeros((0, k), np.int64)
    return np.stack([rng.choice(pool, k, replace=False) for _ in range(tokens)]).astype(np.int64)
