"""Block gather/scatter: the one data-movement primitive under MoE packing and paged KV.

A *block* is `width` contiguous elements of a flat array. Block `b` (b = i * heads + h) starts
at element `index[i] * stride + h * head_stride`: rows of a matrix are `heads=1`, the pages
of a heads-first KV cache are `heads=H`. `gather_blocks` packs blocks into the rows of a
contiguous buffer; `scatter_blocks` writes them back. The kernels compute each offset
themselves (no temporaries) and move raw bytes as the widest word that divides every size,
stride and address: numba on CPU (numpy arrays), CuPy on GPU (CuPy arrays).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels._arrays import cupy, is_gpu, word_size, xp_of
from kernels.errors import KernelInputError

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def data_ptr(a: Any) -> int:
    """Address of a's first element (numpy or CuPy)."""
    return int(a.data.ptr) if is_gpu(a) else int(a.__array_interface__["data"][0])


def flat_span(a: Any) -> Any:
    """A 1-D view of the memory from a's first element to its last (non-negative strides)."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    if any(s < 0 for s in a.strides):
        raise KernelInputError("array: negative strides are not supported; pass a copy (np.ascontiguousarray)")
    if any(s % a.itemsize for s in a.strides):
        raise KernelInputError("array: strides must be whole elements")
    span = 0 if a.size == 0 else 1 + sum((n - 1) * s // a.itemsize for n, s in zip(a.shape, a.strides))
    tricks = cupy().lib.stride_tricks if is_gpu(a) else np.lib.stride_tricks
    return tricks.as_strided(a, shape=(span,), strides=(a.itemsize,))


def gather_blocks(
    flat: Any, index: Any, width: int, out: Any, stride: int | None = None, heads: int = 1, head_stride: int = 0
) -> Any:
    """out.reshape(n * heads, width)[i * heads + h] = flat[index[i] * stride + h * head_stride :][:width]."""
    return _move(flat, index, width, out, stride, heads, head_stride, gather=True)


def scatter_blocks(
    src: Any, index: Any, width: int, flat: Any, stride: int | None = None, heads: int = 1, head_stride: int = 0
) -> Any:
    """flat[index[i] * stride + h * head_stride :][:width] = src.reshape(n * heads, width)[i * heads + h]."""
    return _move(flat, index, width, src, stride, heads, head_stride, gather=False)


def _move(
    flat: Any, index: Any, width: int, rows: Any, stride: int | None, heads: int, head_stride: int, gather: bool
) -> Any:
    if flat.dtype != rows.dtype:
        raise KernelInputError(f"out: dtype {rows.dtype} differs from the source's {flat.dtype}")
    if not rows.flags.c_contiguous:
        raise KernelInputError("out: the packed buffer must be contiguous")
    n = int(index.shape[0]) * heads
    if rows.size != n * width:
        raise KernelInputError(f"out: needs {n} x {width} elements, has {rows.size}")
    if n == 0 or width == 0:
        return rows
    stride = width if stride is None else stride
    item = flat.dtype.itemsize
    sizes = [width * item, stride * item, head_stride * item]
    xp = xp_of(flat)
    idx = index if index.dtype == xp.int64 and index.flags.c_contiguous else xp.ascontiguousarray(index, xp.int64)
    if is_gpu(flat):
        from kernels import _cuda

        word = word_size(*sizes, data_ptr(flat), data_ptr(rows), widest=16)
        args = (idx, heads, stride * item // word, head_stride * item // word, width * item // word)
        (_cuda.gather_blocks if gather else _cuda.scatter_blocks)(flat, rows, word, n, *args)
        return rows
    from numba import get_num_threads

    from kernels import _cpu

    word = word_size(*sizes, flat.nbytes, widest=8)
    flat_w = flat.view(_UINT[word])
    rows_w = rows.reshape(-1).view(_UINT[word]).reshape(n, width * item // word)
    kernel = _cpu.gather_blocks if gather else _cpu.scatter_blocks
    kernel(flat_w, idx, heads, stride * item // word, head_stride * item // word, rows_w, get_num_threads())
    return rows


def gather_rows(src: Any, index: Any, out: Any | None = None) -> Any:
    """out[i] = src[index[i]] for a contiguous `src` (rows along the first axis); index in range."""
    xp = xp_of(src)
    width = int(np.prod(src.shape[1:]))
    if out is None:
        out = xp.empty((int(index.shape[0]), *src.shape[1:]), dtype=src.dtype)
    return gather_blocks(src.reshape(-1), index, width, out)


def scatter_rows(src: Any, index: Any, dst: Any) -> Any:
    """dst[index[i]] = src[i] (index entries must be distinct)."""
    width = int(np.prod(dst.shape[1:]))
    scatter_blocks(src, index, width, dst.reshape(-1))
    return dst
