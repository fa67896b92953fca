"""Block gather/scatter: the one data-movement primitive under MoE packing and paged KV.

A *block* is `width` contiguous elements starting at an element offset into a flat source.
`gather_blocks` packs blocks into the rows of a contiguous buffer, `scatter_blocks` writes
them back. Both move raw bytes, as the widest word that divides every size and offset, with
numba on CPU (numpy in, numpy out) and CuPy on GPU (CuPy arrays or CUDA torch tensors).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels._arrays import cupy, is_gpu, word_size, xp_of
from workbench.errors import WorkbenchError


def data_ptr(a: Any) -> int:
    """Address of a's first element (numpy or CuPy)."""
    return int(a.data.ptr) if is_gpu(a) else int(a.__array_interface__["data"][0])


def flat_span(a: Any) -> Any:
    """A 1-D view of the memory from a's first element to its last (non-negative strides)."""
    if any(s < 0 for s in a.strides):
        raise WorkbenchError("array: negative strides are not supported; pass a copy (np.ascontiguousarray)")
    if any(s % a.itemsize for s in a.strides):
        raise WorkbenchError("array: strides must be whole elements")
    span = 1 + sum((n - 1) * s // a.itemsize for n, s in zip(a.shape, a.strides) if n > 0)
    if a.size == 0:
        span = 0
    if a.flags.c_contiguous:
        return a.reshape(-1)
    tricks = cupy().lib.stride_tricks if is_gpu(a) else np.lib.stride_tricks
    return tricks.as_strided(a, shape=(span,), strides=(a.itemsize,))


def _word(src_flat: Any, out: Any, strides_bytes: list[int], width_bytes: int) -> int:
    sizes = [width_bytes, *strides_bytes, src_flat.nbytes, out.nbytes]
    if is_gpu(src_flat):  # vector loads on a GPU need aligned addresses too
        return word_size(*sizes, data_ptr(src_flat), data_ptr(out), widest=16)
    return word_size(*sizes, widest=8)


def gather_blocks(
    src_flat: Any, offsets: Any, width: int, out: Any, strides: list[int] | None = None
) -> Any:
    """out.reshape(n, width)[b] = src_flat[offsets[b] : offsets[b] + width] for every block b.

    `offsets` are element offsets (int64); `strides` lists the element strides the offsets are
    built from (their multiples decide the word size; default: `width`).
    """
    return _move(src_flat, offsets, width, out, strides, gather=True)


def scatter_blocks(
    src: Any, offsets: Any, width: int, dst_flat: Any, strides: list[int] | None = None
) -> Any:
    """dst_flat[offsets[b] : offsets[b] + width] = src.reshape(n, width)[b] for every block b."""
    return _move(dst_flat, offsets, width, src, strides, gather=False)


def _move(flat: Any, offsets: Any, width: int, rows: Any, strides: list[int] | None, gather: bool) -> Any:
    if flat.dtype != rows.dtype:
        raise WorkbenchError(f"out: dtype {rows.dtype} differs from the source's {flat.dtype}")
    if not rows.flags.c_contiguous:
        raise WorkbenchError("out: the packed buffer must be contiguous")
    n = int(offsets.shape[0])
    if rows.size != n * width:
        raise WorkbenchError(f"out: needs {n} x {width} elements, has {rows.size}")
    if n == 0 or width == 0:
        return rows
    item = flat.dtype.itemsize
    word = _word(flat, rows, [s * item for s in (strides or [width])], width * item)
    offs = offsets * item // word if word != item else offsets
    if is_gpu(flat):
        from kernels import _cuda

        move = _cuda.gather_blocks if gather else _cuda.scatter_blocks
        move(flat, offs, rows, word, n, width * item // word)
        return rows
    from numba import get_num_threads

    from kernels import _cpu

    flat_w = flat.view(_UINT[word])
    rows_w = rows.reshape(-1).view(_UINT[word]).reshape(n, width * item // word)
    if gather:
        _cpu.gather_blocks(flat_w, offs, rows_w, get_num_threads())
    else:
        _cpu.scatter_blocks(rows_w, offs, flat_w, get_num_threads())
    return rows


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def gather_rows(src: Any, index: Any, out: Any | None = None) -> Any:
    """out[i] = src[index[i]] for a contiguous 2-D (or more) `src`; index int64 in range."""
    xp = xp_of(src)
    width = int(np.prod(src.shape[1:]))
    if out is None:
        out = xp.empty((int(index.shape[0]), *src.shape[1:]), dtype=src.dtype)
    offsets = index.astype(xp.int64, copy=False) * width
    return gather_blocks(src.reshape(-1), offsets, width, out)


def scatter_rows(src: Any, index: Any, dst: Any) -> Any:
    """dst[index[i]] = src[i] (index entries must be distinct)."""
    xp = xp_of(dst)
    width = int(np.prod(dst.shape[1:]))
    offsets = index.astype(xp.int64, copy=False) * width
    scatter_blocks(src, offsets, width, dst.reshape(-1))
    return dst
