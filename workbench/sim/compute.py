"""Compute cost model: GEMM, attention and memory-bound op times as functions of shape and device.

Efficiencies come from microbenchmarks only: `datasets/gemm_h100_measured.csv` (bf16 and fp8
GEMMs over m, n, k in 256..16384, flash attention forward/backward over sequence length,
elementwise bandwidth over size, measured on the H100) and `datasets/gemm_efficiency.csv`
(which curve applies to which GPU; other GPUs get the H100 curve scaled to their catalogue
peak — an assumption stated per row). Lookups interpolate log-linearly on the measured grid and
clamp outside it. CPU ranks (`GPUSpec.is_cpu`) run at their measured `fp32_tflops` and
`memory_GBps` with efficiency 1.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from workbench.data import read_csv
from workbench.errors import WorkbenchError
from workbench.topology.catalogue import GPUSpec, gpu

REFERENCE_GPU = "H100-SXM"
MEASURED = "gemm_h100_measured.csv"
GRID = tuple(float(2**i) for i in range(8, 15))  # 256 .. 16384: the full cube measured by gemm_sweep.py


@dataclass(frozen=True)
class Grid3:
    axes: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # log2 of m, n, k
    values: tuple[float, ...]  # log efficiency, C order

    def at(self, m: float, n: float, k: float) -> float:
        """Trilinear interpolation of log-efficiency in log2 space, clamped to the grid."""
        idx, wts = [], []
        for ax, x in zip(self.axes, (m, n, k)):
            lx = min(max(math.log2(max(x, 1.0)), ax[0]), ax[-1])
            i = min(max(bisect_right(ax, lx) - 1, 0), len(ax) - 2)
            idx.append(i)
            wts.append((lx - ax[i]) / (ax[i + 1] - ax[i]))
        nn, nk = len(self.axes[1]), len(self.axes[2])
        acc = 0.0
        for di in (0, 1):
            wi = wts[0] if di else 1 - wts[0]
            if wi == 0:
                continue
            for dj in (0, 1):
                wj = wts[1] if dj else 1 - wts[1]
                if wj == 0:
                    continue
                for dk in (0, 1):
                    wk = wts[2] if dk else 1 - wts[2]
                    if wk == 0:
                        continue
                    acc += wi * wj * wk * self.values[((idx[0] + di) * nn + idx[1] + dj) * nk + idx[2] + dk]
        return math.exp(acc)


@cache
def _gemm_grid(curve: str) -> Grid3:
    df = read_csv(MEASURED)
    d = df[df["op"] == curve]
    if d.empty:
        raise WorkbenchError(f"compute: no {curve!r} rows in datasets/{MEASURED}")
    prec = "fp8" if curve == "gemm_fp8" else "bf16"
    peak = gpu(REFERENCE_GPU).peak(prec)
    pow2 = [GRID] * 3
    d = d[d["m"].isin(pow2[0]) & d["n"].isin(pow2[1]) & d["k"].isin(pow2[2])]
    # shapes measured twice (the grid and the transformer list) are averaged
    mean = d.groupby(["m", "n", "k"], as_index=False)["tflops"].mean()
    eff = {(r.m, r.n, r.k): float(r.tflops) / peak for r in mean.itertuples()}
    vals = []
    for m in pow2[0]:
        for n in pow2[1]:
            for k in pow2[2]:
                e = eff.get((m, n, k))
                if e is None or e <= 0:
                    raise WorkbenchError(f"compute: the {curve} grid lacks ({m}, {n}, {k}) in datasets/{MEASURED}")
                vals.append(math.log(e))
    return Grid3(tuple(tuple(math.log2(v) for v in ax) for ax in pow2), tuple(vals))  # type: ignore[arg-type]


@cache
def _attention_curves() -> dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]]:
    """(op, head_dim, causal) → (log2 seq, efficiency vs the reference bf16 peak)."""
    df = read_csv(MEASURED)
    peak = gpu(REFERENCE_GPU).peak("bf16")
    out = {}
    for key, g in df[df["op"].isin(["attn_fwd", "attn_bwd"])].groupby(["op", "head_dim", "causal"]):
        op, hd, causal = key  # type: ignore[misc]
        g = g.sort_values("seq")
        out[(str(op), int(float(str(hd))), int(float(str(causal))))] = (np.log2(g["seq"].to_numpy(float)), g["tflops"].to_numpy(float) / peak)
    return out


@cache
def _elementwise_curve() -> tuple[np.ndarray, np.ndarray]:
    df = read_csv(MEASURED)
    g = df[df["op"] == "elementwise"].sort_values("bytes")
    return np.log2(g["bytes"].to_numpy(float)), g["GBps"].to_numpy(float) / gpu(REFERENCE_GPU).memory_GBps


@cache
def _curve_table() -> dict[tuple[str, str], tuple[str, str, str]]:
    df = read_csv("gemm_efficiency.csv")
    return {(str(r.gpu), str(r.precision)): (str(r.curve), str(r.basis), str(r.source)) for r in df.itertuples()}


class DeviceModel:
    """Times of GEMMs, attention and memory-bound ops on one device at one compute precision."""

    def __init__(self, spec: GPUSpec, precision: str) -> None:
        self.spec = spec
        self.precision = precision
        if spec.is_cpu:
            self.peak_flops = spec.peak("fp32") * 1e12
            self.curve, self.basis = "", "measured CPU rate (efficiency 1)"
        else:
            hit = _curve_table().get((spec.model, precision))
            if hit is None:
                have = sorted(p for (g, p) in _curve_table() if g == spec.model)
                raise WorkbenchError(f"precision: no {precision} GEMM curve for {spec.model} in "
                                     f"datasets/gemm_efficiency.csv (have: {', '.join(have) or 'none'})")
            self.curve, self.basis = hit[0], hit[1]
            self.peak_flops = spec.peak(precision) * 1e12
        # attention runs in bf16/fp16 (fp32 for fp32 training) whatever the GEMM precision
        attn_prec = "fp32" if precision == "fp32" else "bf16"
        self.attn_peak = (spec.peak("fp32") if spec.is_cpu else spec.peak(attn_prec if attn_prec in dict(
            spec.peak_tflops) else "fp16")) * 1e12
        self.mem_Bps = spec.memory_GBps * 1e9

    @lru_cache(maxsize=8192)  # noqa: B019 - a few models live per process; the cache is the point
    def gemm_seconds(self, m: int, n: int, k: int, count: int = 1) -> float:
        flops = 2.0 * m * n * k * count
        if self.spec.is_cpu:
            return flops / self.peak_flops
        eff = _gemm_grid(self.curve).at(m, n, k)
        return flops / (self.peak_flops * eff)

    def attention_seconds(self, flops: float, seq: int, head_dim: int, causal: bool = True,
                          backward: bool = False) -> float:
        """Seconds for flash attention doing `flops` useful FLOPs (backward: pass the forward's FLOPs × 2.5)."""
        if flops <= 0:
            return 0.0
        if self.spec.is_cpu:
            return flops / self.attn_peak
        curves = _attention_curves()
        hd = 128 if head_dim > 96 else 64
        key = ("attn_bwd" if backward else "attn_fwd", hd, int(causal))
        xs, ys = curves[key]
        eff = float(np.interp(math.log2(max(seq, 1)), xs, ys))
        return flops / (self.attn_peak * eff)

    def memory_seconds(self, nbytes: float, size_hint: float | None = None) -> float:
        """Seconds for a memory-bound op moving `nbytes` (efficiency from the elementwise curve at `size_hint`)."""
        if nbytes <= 0:
            return 0.0
        if self.spec.is_cpu:
            return nbytes / self.mem_Bps
        xs, ys = _elementwise_curve()
        eff = float(np.interp(math.log2(max(size_hint or nbytes, 1.0)), xs, ys))
        return nbytes / (self.mem_Bps * eff)


@lru_cache(maxsize=64)
def device_model(spec: GPUSpec, precision: str) -> DeviceModel:
    return DeviceModel(spec, precision)


def gemm_table(gpu_model: str = REFERENCE_GPU, precision: str = "bf16") -> object:
    """The measured points with the model's prediction beside them (a pandas DataFrame), for checking."""
    import pandas as pd

    dm = device_model(gpu(gpu_model), precision)
    df = read_csv(MEASURED)
    d = df[df["op"] == ("gemm_fp8" if precision == "fp8" else "gemm")].copy()
    d["predicted_s"] = [dm.gemm_seconds(int(m), int(n), int(k)) for m, n, k in zip(d["m"], d["n"], d["k"])]
    d["error"] = d["predicted_s"] / d["seconds"] - 1
    return pd.DataFrame(d)
