"""Array plumbing shared by the kernels: CPU/GPU detection, raw-word views, flat views."""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.errors import KernelInputError, require

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def is_gpu(a: Any) -> bool:
    """True for a CuPy array or a CUDA torch tensor."""
    mod = type(a).__module__
    if mod.startswith("cupy"):
        return True
    return mod.startswith("torch") and bool(getattr(a, "is_cuda", False))


def cupy() -> Any:
    """CuPy, or an ImportError naming the extra to install."""
    return require("cupy", "gpu-cu12")


def to_cupy(a: Any) -> Any:
    """A CuPy view of a CuPy array or a CUDA torch tensor (bfloat16 travels as uint16 bits)."""
    cp = cupy()
    if type(a).__module__.startswith("torch"):
        import torch

        if a.dtype == torch.bfloat16:
            a = a.view(torch.int16)
        return cp.asarray(a).view(cp.uint16) if a.dtype == torch.int16 else cp.asarray(a)
    return a


def xp_of(a: Any) -> Any:
    """numpy or cupy, whichever owns `a`."""
    return cupy() if is_gpu(a) else np


def word_size(*nbytes: int, widest: int = 8) -> int:
    """The widest power-of-two word (<= widest bytes) that divides every byte count given."""
    w = widest
    while w > 1 and any(b % w for b in nbytes):
        w //= 2
    return w


def words(a: Any, word: int) -> Any:
    """A view of contiguous `a` as unsigned words of `word` bytes (last axis rescaled)."""
    flat = a.reshape(-1)
    return flat.view(flat.dtype if word == flat.dtype.itemsize else _UNSIGNED[word])


def check_index(name: str, idx: Any, limit: int) -> Any:
    """An int64 index array with every entry in [0, limit), else a KernelInputError naming it."""
    xp = xp_of(idx)
    idx = xp.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise KernelInputError(f"{name}: must be an integer array, got dtype {idx.dtype}")
    idx = idx.astype(xp.int64, copy=False).reshape(-1)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        raise KernelInputError(
            f"{name}: entries must lie in [0, {limit}); got min {int(idx.min())}, max {int(idx.max())}"
        )
    return idx
