"""Blockwise FP8 (e4m3fn) and INT8 quantisation for weight transfer: one fp32 scale per block.

`scale = amax(|block|) / qmax` (qmax 448 for e4m3fn, 127 for int8; 1 for an all-zero block);
`q = round(clamp(x / scale, -qmax, qmax))`, round-to-nearest-even in both formats. Blocks are
`(bm, bn)` tiles of a 2-D float32 matrix (default 128 x 128; `(1, 128)` for per-row groups);
edge blocks may be partial. FP8 codes are returned as uint8 bit patterns
(`torch.from_numpy(q).view(torch.float8_e4m3fn)` reads them), INT8 as int8.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from kernels._arrays import is_gpu, xp_of
from kernels.errors import KernelInputError

FORMATS = ("fp8", "int8")
QMAX = {"fp8": 448.0, "int8": 127.0}


def _check(x: Any, fmt: str, block: tuple[int, int]) -> tuple[int, int]:
    if fmt not in FORMATS:
        raise KernelInputError(f"fmt: must be one of {FORMATS}, got {fmt!r}")
    bm, bn = (int(v) for v in block)
    if bm < 1 or bn < 1:
        raise KernelInputError(f"block: both sides must be >= 1, got {block}")
    if x.ndim != 2:
        raise KernelInputError(f"x: must be 2-D (reshape weights to (rows, cols)), got shape {tuple(x.shape)}")
    return bm, bn


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Number of blocks along each axis."""
    return (-(-int(shape[0]) // block[0]), -(-int(shape[1]) // block[1]))


@functools.cache
def _lut(fmt: str) -> np.ndarray:
    """float32 value of every byte: e4m3fn codes or int8 two's complement."""
    b = np.arange(256, dtype=np.int64)
    if fmt == "int8":
        return b.astype(np.uint8).view(np.int8).astype(np.float32)
    e, m = (b >> 3) & 15, b & 7
    v = np.where(e == 0, m * 2.0**-9, (1 + m / 8.0) * 2.0 ** (e - 7))
    v = np.where((e == 15) & (m == 7), np.nan, v)
    return np.where(b & 0x80, -v, v).astype(np.float32)


def quantize(x: Any, fmt: str = "fp8", block: tuple[int, int] = (128, 128)) -> tuple[Any, Any]:
    """(codes, scales): codes uint8 (fp8) or int8, scales float32 of `scale_shape`."""
    bm, bn = _check(x, fmt, block)
    xp = xp_of(x)
    if x.dtype != xp.float32:
        raise KernelInputError(f"x: dtype must be float32, got {x.dtype}")
    x = xp.ascontiguousarray(x)
    q = xp.empty(x.shape, dtype=xp.uint8 if fmt == "fp8" else xp.int8)
    scales = xp.empty(scale_shape(x.shape, (bm, bn)), dtype=xp.float32)
    if is_gpu(x):
        from kernels import _cuda

        _cuda.quantize(x, bm, bn, fmt == "fp8", q, scales)
    elif x.size:
        from kernels import _cpu

        _cpu.quantize_blocks(x, bm, bn, fmt == "fp8", q, scales)
    return q, scales


def dequantize(q: Any, scales: Any, fmt: str = "fp8", block: tuple[int, int] = (128, 128)) -> Any:
    """float32 matrix: value of each code times the scale of its block."""
    bm, bn = _check(q, fmt, block)
    xp = xp_of(q)
    if tuple(scales.shape) != scale_shape(q.shape, (bm, bn)):
        raise KernelInputError(f"scales: shape must be {scale_shape(q.shape, (bm, bn))}, got {tuple(scales.shape)}")
    q = xp.ascontiguousarray(q).view(xp.uint8)
    scales = xp.ascontiguousarray(scales, dtype=xp.float32)
    out = xp.empty(q.shape, dtype=xp.float32)
    if is_gpu(q):
        from kernels import _cuda

        _cuda.dequantize(q, scales, bm, bn, fmt == "fp8", out)
    elif q.size:
        from kernels import _cpu

        _cpu.dequantize_blocks(q, scales, bm, bn, _lut(fmt), out)
    return out


# ---- references: torch (CPU or CUDA); FP8 rounding is torch.float8_e4m3fn's ----


def _blocks(x: Any, bm: int, bn: int) -> Any:
    import torch

    m, n = x.shape
    mb, nb = scale_shape(x.shape, (bm, bn))
    pad = torch.zeros((mb * bm, nb * bn), dtype=x.dtype, device=x.device)
    pad[:m, :n] = x
    return pad.view(mb, bm, nb, bn)


def quantize_reference(x: Any, fmt: str = "fp8", block: tuple[int, int] = (128, 128)) -> tuple[Any, Any]:
    """torch reference of `quantize` (numpy or torch float32 in; numpy out for numpy in)."""
    import torch

    bm, bn = _check(x, fmt, block)
    as_numpy = isinstance(x, np.ndarray)
    xt = torch.from_numpy(x) if as_numpy else x
    m, n = xt.shape
    xb = _blocks(xt, bm, bn)
    amax = xb.abs().amax(dim=(1, 3))
    qmax = torch.tensor(QMAX[fmt], dtype=torch.float32, device=xt.device)
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    v = (xb / scales[:, None, :, None]).clamp(-QMAX[fmt], QMAX[fmt])
    if fmt == "fp8":
        q = v.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        q = torch.round(v).to(torch.int8)
    q = q.reshape(xb.shape[0] * bm, xb.shape[2] * bn)[:m, :n].contiguous()
    return (q.numpy(), scales.numpy()) if as_numpy else (q, scales)


def dequantize_reference(q: Any, scales: Any, fmt: str = "fp8", block: tuple[int, int] = (128, 128)) -> Any:
    """torch reference of `dequantize`."""
    import torch

    bm, bn = _check(q, fmt, block)
    as_numpy = isinstance(q, np.ndarray)
    qt = torch.from_numpy(q) if as_numpy else q
    st = torch.from_numpy(scales) if as_numpy else scales
    v = qt.view(torch.float8_e4m3fn).float() if fmt == "fp8" else qt.float()
    m, n = v.shape
    s = st.repeat_interleave(bm, dim=0).repeat_interleave(bn, dim=1)[:m, :n]
    out = v * s
    return out.numpy() if as_numpy else out
