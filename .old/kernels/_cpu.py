"""numba CPU kernels: block gather/scatter, weighted combine, blockwise FP8/INT8.

The row kernels split their work into `nt` contiguous chunks (`prange` over chunks; pass
`numba.get_num_threads()`), so each thread streams through its own part of the output.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, nogil=True)
def gather_blocks(src, index, heads, stride, head_stride, dst, nt):  # type: ignore[no-untyped-def]
    """dst[b] = src[o : o + width], o = index[b // heads] * stride + (b % heads) * head_stride."""
    n, width = dst.shape
    for c in prange(nt):
        for b in range(n * c // nt, n * (c + 1) // nt):
            o = index[b // heads] * stride + (b % heads) * head_stride
            dst[b, :] = src[o : o + width]


@njit(parallel=True, cache=True, nogil=True)
def scatter_blocks(dst, index, heads, stride, head_stride, src, nt):  # type: ignore[no-untyped-def]
    """dst[o : o + width] = src[b], o = index[b // heads] * stride + (b % heads) * head_stride."""
    n, width = src.shape
    for c in prange(nt):
        for b in range(n * c // nt, n * (c + 1) // nt):
            o = index[b // heads] * stride + (b % heads) * head_stride
            dst[o : o + width] = src[b, :]


@njit(parallel=True, cache=True, nogil=True)
def combine_f32(y, index, weights, out, nt):  # type: ignore[no-untyped-def]
    """out[t] = sum_k weights[t, k] * y[index[t, k]] (index < 0 skipped), fp32 accumulate."""
    n, k_top = index.shape
    width = y.shape[1]
    for c in prange(nt):
        for t in range(n * c // nt, n * (c + 1) // nt):
            o = out[t]
            o[:] = 0.0
            for k in range(k_top):
                r = index[t, k]
                if r < 0:
                    continue
                w = weights[t, k]
                row = y[r]
                for h in range(width):
                    o[h] += w * row[h]


@njit(parallel=True, cache=True, nogil=True)
def combine_bf16(y, index, weights, out, nt):  # type: ignore[no-untyped-def]
    """As `combine_f32` with y holding bfloat16 bit patterns (uint16)."""
    n, k_top = index.shape
    width = y.shape[1]
    for c in prange(nt):
        bits = np.empty(width, dtype=np.uint32)
        vals = bits.view(np.float32)
        for t in range(n * c // nt, n * (c + 1) // nt):
            o = out[t]
            o[:] = 0.0
            for k in range(k_top):
                r = index[t, k]
                if r < 0:
                    continue
                w = weights[t, k]
                row = y[r]
                for h in range(width):
                    bits[h] = np.uint32(row[h]) << np.uint32(16)
                for h in range(width):
                    o[h] += w * vals[h]


@njit(inline="always")
def _e4m3_code(v):  # type: ignore[no-untyped-def]
    """Round a float32 with |v| <= 448 to e4m3fn (round to nearest even); returns the byte."""
    a = abs(np.float64(v))
    sign = 0x80 if math.copysign(1.0, v) < 0 else 0  # -0.0 keeps its sign, as in torch
    if a < 0.015625:  # below 2^-6: subnormal steps of 2^-9
        return sign | int(np.rint(a * 512.0))
    m, e = math.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    e2 = e - 1
    q = int(np.rint((m * 2.0 - 1.0) * 8.0))
    if q == 8:
        q = 0
        e2 += 1
    return sign | ((e2 + 7) << 3) | q


@njit(parallel=True, cache=True, nogil=True)
def quantize_blocks(x, bm, bn, fp8, q, scales):  # type: ignore[no-untyped-def]
    """One scale per (bm, bn) block: scale = amax / qmax (1 where amax is 0)."""
    m, n = x.shape
    mb, nb = scales.shape
    qmax = np.float32(448.0) if fp8 else np.float32(127.0)
    for blk in prange(mb * nb):
        i0 = (blk // nb) * bm
        j0 = (blk % nb) * bn
        i1 = min(i0 + bm, m)
        j1 = min(j0 + bn, n)
        amax = np.float32(0.0)
        for i in range(i0, i1):
            for j in range(j0, j1):
                a = abs(x[i, j])
                if a > amax:
                    amax = a
        s = amax / qmax if amax > 0 else np.float32(1.0)
        scales[blk // nb, blk % nb] = s
        for i in range(i0, i1):
            for j in range(j0, j1):
                v = x[i, j] / s
                v = min(max(v, -qmax), qmax)
                if fp8:
                    q[i, j] = _e4m3_code(v)
                else:
                    q[i, j] = np.int8(np.rint(v))


@njit(parallel=True, cache=True, nogil=True)
def dequantize_blocks(q, scales, bm, bn, lut, out):  # type: ignore[no-untyped-def]
    """out = lut[q] * scale of the block (lut maps each byte to its value)."""
    m, n = q.shape
    mb, nb = scales.shape
    for blk in prange(mb * nb):
        i0 = (blk // nb) * bm
        j0 = (blk % nb) * bn
        s = scales[blk // nb, blk % nb]
        for i in range(i0, min(i0 + bm, m)):
            for j in range(j0, min(j0 + bn, n)):
                out[i, j] = lut[q[i, j]] * s
