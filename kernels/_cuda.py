"""CuPy RawKernels: block gather/scatter, weighted combine, blockwise FP8/INT8.

Compiled once per process with NVRTC on first use. Pointers are raw device addresses of
CuPy arrays; sizes and offsets are passed in the kernel's word units.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from kernels._arrays import cupy

_SRC = r"""
typedef unsigned long long u64;

template <typename T>
__device__ __forceinline__ void gather_t(const T* __restrict__ src, const long long* __restrict__ off,
                                         T* __restrict__ dst, long long n, long long width) {
  for (long long b = blockIdx.x; b < n; b += gridDim.x) {
    const T* s = src + off[b];
    T* d = dst + b * width;
    for (long long j = threadIdx.x; j < width; j += blockDim.x) d[j] = s[j];
  }
}

template <typename T>
__device__ __forceinline__ void scatter_t(const T* __restrict__ src, const long long* __restrict__ off,
                                          T* __restrict__ dst, long long n, long long width) {
  for (long long b = blockIdx.x; b < n; b += gridDim.x) {
    const T* s = src + b * width;
    T* d = dst + off[b];
    for (long long j = threadIdx.x; j < width; j += blockDim.x) d[j] = s[j];
  }
}

#define MOVE(W, T) \
  extern "C" __global__ void gather_##W(const T* s, const long long* o, T* d, long long n, long long w) { gather_t<T>(s, o, d, n, w); } \
  extern "C" __global__ void scatter_##W(const T* s, const long long* o, T* d, long long n, long long w) { scatter_t<T>(s, o, d, n, w); }
MOVE(16, uint4)
MOVE(8, u64)
MOVE(4, unsigned int)
MOVE(2, unsigned short)
MOVE(1, unsigned char)

__device__ __forceinline__ float bf16f(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }

// out[t, :] = sum_k w[t, k] * y[idx[t, k], :]  (idx < 0 skipped), fp32 accumulation.
extern "C" __global__ void combine_f32(const float* __restrict__ y, const long long* __restrict__ idx,
                                       const float* __restrict__ w, float* __restrict__ out,
                                       long long T, int K, long long H) {
  for (long long t = blockIdx.x; t < T; t += gridDim.x) {
    for (long long j = threadIdx.x; j < H; j += blockDim.x) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) {
        long long r = idx[t * K + k];
        if (r >= 0) acc += w[t * K + k] * y[r * H + j];
      }
      out[t * H + j] = acc;
    }
  }
}

extern "C" __global__ void combine_f32x4(const float4* __restrict__ y, const long long* __restrict__ idx,
                                         const float* __restrict__ w, float4* __restrict__ out,
                                         long long T, int K, long long H4) {
  for (long long t = blockIdx.x; t < T; t += gridDim.x) {
    for (long long j = threadIdx.x; j < H4; j += blockDim.x) {
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int k = 0; k < K; ++k) {
        long long r = idx[t * K + k];
        if (r < 0) continue;
        float s = w[t * K + k];
        float4 v = y[r * H4 + j];
        a.x += s * v.x; a.y += s * v.y; a.z += s * v.z; a.w += s * v.w;
      }
      out[t * H4 + j] = a;
    }
  }
}

extern "C" __global__ void combine_bf16(const unsigned short* __restrict__ y, const long long* __restrict__ idx,
                                        const float* __restrict__ w, float* __restrict__ out,
                                        long long T, int K, long long H) {
  for (long long t = blockIdx.x; t < T; t += gridDim.x) {
    for (long long j = threadIdx.x; j < H; j += blockDim.x) {
      float acc = 0.f;
      for (int k = 0; k < K; ++k) {
        long long r = idx[t * K + k];
        if (r >= 0) acc += w[t * K + k] * bf16f(y[r * H + j]);
      }
      out[t * H + j] = acc;
    }
  }
}

// bf16 rows read 8 at a time (16 bytes), written as two float4.
extern "C" __global__ void combine_bf16x8(const uint4* __restrict__ y, const long long* __restrict__ idx,
                                          const float* __restrict__ w, float4* __restrict__ out,
                                          long long T, int K, long long H8) {
  for (long long t = blockIdx.x; t < T; t += gridDim.x) {
    for (long long j = threadIdx.x; j < H8; j += blockDim.x) {
      float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k = 0; k < K; ++k) {
        long long r = idx[t * K + k];
        if (r < 0) continue;
        float s = w[t * K + k];
        uint4 v = y[r * H8 + j];
        unsigned int u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          a[2 * q] += s * __uint_as_float(u[q] << 16);
          a[2 * q + 1] += s * __uint_as_float(u[q] & 0xFFFF0000u);
        }
      }
      out[(t * H8 + j) * 2] = make_float4(a[0], a[1], a[2], a[3]);
      out[(t * H8 + j) * 2 + 1] = make_float4(a[4], a[5], a[6], a[7]);
    }
  }
}

// float32 -> e4m3fn byte, round to nearest even (c10's algorithm); |f| <= 448.
__device__ __forceinline__ unsigned char e4m3_code(float f) {
  unsigned int bits = __float_as_uint(f);
  unsigned int sign = bits & 0x80000000u;
  bits ^= sign;
  unsigned char r;
  if (bits < (121u << 23)) {
    float t = __fadd_rn(__uint_as_float(bits), __uint_as_float(141u << 23));
    r = (unsigned char)(__float_as_uint(t) - (141u << 23));
  } else {
    unsigned int odd = (bits >> 20) & 1u;
    bits += ((unsigned int)(7 - 127) << 23) + 0x7FFFFu;
    bits += odd;
    r = (unsigned char)(bits >> 20);
  }
  return r | (unsigned char)(sign >> 24);
}

__device__ __forceinline__ float e4m3_value(unsigned char b) {
  int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = __int_as_float(0x7fc00000);
  else if (e == 0) v = m * 0.001953125f;
  else v = ldexpf(1.f + m * 0.125f, e - 7);
  return (b & 0x80) ? -v : v;
}

// One CUDA block per (bm, bn) quantisation block; scale = amax / qmax (1 where amax is 0).
extern "C" __global__ void quant_blocks(const float* __restrict__ x, long long m, long long n, int bm, int bn,
                                        int fp8, unsigned char* __restrict__ q, float* __restrict__ scales) {
  __shared__ float red[32];
  const long long i0 = (long long)blockIdx.y * bm, j0 = (long long)blockIdx.x * bn;
  const int rows = (int)min((long long)bm, m - i0), cols = (int)min((long long)bn, n - j0);
  const int count = rows * cols;
  float amax = 0.f;
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    int r = e / cols, c = e - r * cols;
    amax = fmaxf(amax, fabsf(x[(i0 + r) * n + j0 + c]));
  }
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    amax = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (threadIdx.x == 0) red[0] = amax;
  }
  __syncthreads();
  amax = red[0];
  const float qmax = fp8 ? 448.f : 127.f;
  const float s = amax > 0.f ? __fdiv_rn(amax, qmax) : 1.f;
  if (threadIdx.x == 0) scales[(long long)blockIdx.y * gridDim.x + blockIdx.x] = s;
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    int r = e / cols, c = e - r * cols;
    long long at = (i0 + r) * n + j0 + c;
    float v = fminf(fmaxf(__fdiv_rn(x[at], s), -qmax), qmax);
    q[at] = fp8 ? e4m3_code(v) : (unsigned char)(signed char)__float2int_rn(v);
  }
}

extern "C" __global__ void dequant_blocks(const unsigned char* __restrict__ q, const float* __restrict__ scales,
                                          long long m, long long n, int bm, int bn, long long nb, int fp8,
                                          float* __restrict__ out) {
  for (long long i = blockIdx.x; i < m; i += gridDim.x) {
    const float* srow = scales + (i / bm) * nb;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
      unsigned char b = q[i * n + j];
      float v = fp8 ? e4m3_value(b) : (float)(signed char)b;
      out[i * n + j] = __fmul_rn(v, srow[j / bn]);
    }
  }
}
"""

_MAX_GRID = 1 << 20


@functools.cache
def _module() -> Any:
    cp = cupy()
    return cp.RawModule(code=_SRC, options=("--std=c++17",))


def _kernel(name: str) -> Any:
    return _module().get_function(name)


def _threads(width: int) -> int:
    return int(min(256, max(32, (width + 31) // 32 * 32)))


def gather_blocks(flat: Any, offsets: Any, rows: Any, word: int, n: int, width: int) -> None:
    """rows (n blocks of `width` words) <- flat at word offsets."""
    cp = cupy()
    offs = cp.ascontiguousarray(offsets, dtype=cp.int64)
    grid = (min(n, _MAX_GRID),)
    _kernel(f"gather_{word}")(grid, (_threads(width),), (flat, offs, rows, np.int64(n), np.int64(width)))


def scatter_blocks(flat: Any, offsets: Any, rows: Any, word: int, n: int, width: int) -> None:
    """flat at word offsets <- rows (n blocks of `width` words)."""
    cp = cupy()
    offs = cp.ascontiguousarray(offsets, dtype=cp.int64)
    grid = (min(n, _MAX_GRID),)
    _kernel(f"scatter_{word}")(grid, (_threads(width),), (rows, offs, flat, np.int64(n), np.int64(width)))


def combine(y: Any, index: Any, weights: Any, out: Any, bf16: bool) -> None:
    """out[t] = sum_k weights[t, k] * y[index[t, k]] on the GPU (fp32 out)."""
    cp = cupy()
    t, k = index.shape
    h = int(y.shape[1])
    if t == 0 or h == 0:
        return
    idx = cp.ascontiguousarray(index, dtype=cp.int64)
    w = cp.ascontiguousarray(weights, dtype=cp.float32)
    aligned = y.data.ptr % 16 == 0 and out.data.ptr % 16 == 0
    if bf16 and h % 8 == 0 and aligned:
        name, units = "combine_bf16x8", h // 8
    elif not bf16 and h % 4 == 0 and aligned:
        name, units = "combine_f32x4", h // 4
    else:
        name, units = ("combine_bf16" if bf16 else "combine_f32"), h
    grid = (min(t, _MAX_GRID),)
    _kernel(name)(grid, (_threads(units),), (y, idx, w, out, np.int64(t), np.int32(k), np.int64(units)))


def quantize(x: Any, bm: int, bn: int, fp8: bool, q: Any, scales: Any) -> None:
    """Blockwise quantisation of a contiguous float32 matrix on the GPU."""
    m, n = x.shape
    mb, nb = scales.shape
    if m == 0 or n == 0:
        return
    args = (x, np.int64(m), np.int64(n), np.int32(bm), np.int32(bn), np.int32(fp8), q, scales)
    _kernel("quant_blocks")((nb, mb), (256,), args)


def dequantize(q: Any, scales: Any, bm: int, bn: int, fp8: bool, out: Any) -> None:
    """Blockwise dequantisation to float32 on the GPU."""
    m, n = q.shape
    if m == 0 or n == 0:
        return
    nb = scales.shape[1]
    args = (q, scales, np.int64(m), np.int64(n), np.int32(bm), np.int32(bn), np.int64(nb), np.int32(fp8), out)
    _kernel("dequant_blocks")((min(m, _MAX_GRID),), (_threads(n),), args)
