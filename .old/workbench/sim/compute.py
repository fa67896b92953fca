"""Compute cost model: GEMM, attention and memory-bound op times as functions of shape and device.

Efficiencies come from microbenchmarks only: `datasets/gemm_h100_measured.csv` and
`datasets/gemm_h200_measured.csv` (bf16 and fp8 GEMMs over m, n, k in 256..16384, flash attention
forward/backward over sequence length — to 128K on the H200 —, elementwise bandwidth over size)
and `datasets/gemm_efficiency.csv` (which measured file and curve applies to which GPU and
precision, optionally rescaled to a GPU's publicly measured best GEMM efficiency, e.g. the A100's;
the basis of each row is stated). Lookups interpolate log-linearly on the measured grid and clamp
outside it. `datasets/interference_measured.csv` holds the GEMM slowdown beside an NCCL collective
in flight (two H200s), used where communication overlaps compute, and the collective's own stretch
beside the GEMM (its bus bandwidth alone / beside). CPU ranks (`GPUSpec.is_cpu`)
run at their measured `fp32_tflops` and `memory_GBps` with efficiency 1.
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
def _gemm_grid(curve: str, file: str = MEASURED, reference: str = REFERENCE_GPU) -> Grid3:
    df = read_csv(file)
    d = df[df["op"] == curve]
    if d.empty:
        raise WorkbenchError(f"compute: no {curve!r} rows in datasets/{file}")
    prec = "fp8" if curve == "gemm_fp8" else "bf16"
    peak = gpu(reference).peak(prec)
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
                    raise WorkbenchError(f"compute: the {curve} grid lacks ({m}, {n}, {k}) in datasets/{file}")
                vals.append(math.log(e))
    return Grid3(tuple(tuple(math.log2(v) for v in ax) for ax in pow2), tuple(vals))  # type: ignore[arg-type]


@cache
def _attention_curves(files: tuple[tuple[str, str], ...] = ((MEASURED, REFERENCE_GPU),)
                      ) -> dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]]:
    """(op, head_dim, causal) → (log2 seq, efficiency vs the measuring GPU's bf16 peak).

    `files`: (dataset, GPU it was measured on) in priority order; a sequence length measured in an
    earlier file is taken from it, longer ones from the next (e.g. the H100's curve to 32K, the
    H200's beyond: same SMs and clocks).
    """
    pts: dict[tuple[str, int, int], dict[float, float]] = {}
    for file, ref in files:
        try:
            df = read_csv(file)
        except FileNotFoundError:
            continue
        peak = gpu(ref).peak("bf16")
        d = df[df["op"].isin(["attn_fwd", "attn_bwd"])]
        for key, g in d.groupby(["op", "head_dim", "causal"]):
            op, hd, causal = key  # type: ignore[misc]
            k = (str(op), int(float(str(hd))), int(float(str(causal))))
            have = pts.setdefault(k, {})
            top = max(have) if have else 0.0
            mean = g.groupby("seq")["tflops"].mean()
            for seq, tf in mean.items():
                if float(seq) > top:  # type: ignore[arg-type]
                    have[float(seq)] = float(tf) / peak  # type: ignore[arg-type]
    out = {}
    for k, d2 in pts.items():
        xs = np.array(sorted(d2))
        out[k] = (np.log2(xs), np.array([d2[x] for x in sorted(d2)]))
    return out


@cache
def _elementwise_curve(file: str = MEASURED, reference: str = REFERENCE_GPU) -> tuple[np.ndarray, np.ndarray]:
    df = read_csv(file)
    g = df[df["op"] == "elementwise"].sort_values("bytes")
    if g.empty:
        return _elementwise_curve()
    g = g.groupby("bytes", as_index=False)["GBps"].mean()
    return np.log2(g["bytes"].to_numpy(float)), g["GBps"].to_numpy(float) / gpu(reference).memory_GBps


@dataclass(frozen=True)
class CurveRow:
    """Which measured curve a (GPU, precision) uses: file, op, the GPU it was measured on, rescaling, basis."""

    curve: str
    file: str
    reference: str
    max_efficiency: float | None
    basis: str
    source: str
    attention_files: tuple[tuple[str, str], ...]


@cache
def _curve_table() -> dict[tuple[str, str], CurveRow]:
    df = read_csv("gemm_efficiency.csv")
    out = {}
    for r in df.itertuples():
        file = str(getattr(r, "file", "") or MEASURED)
        file = MEASURED if file == "nan" else file
        ref = str(getattr(r, "reference", "") or REFERENCE_GPU)
        ref = REFERENCE_GPU if ref == "nan" else ref
        mx = getattr(r, "max_efficiency", None)
        mx = None if mx is None or (isinstance(mx, float) and math.isnan(mx)) else float(mx)
        att = tuple(tuple(x.split("@")) for x in str(getattr(r, "attention", "") or "").split(";") if "@" in x)
        out[(str(r.gpu), str(r.precision))] = CurveRow(str(r.curve), file, ref, mx, str(r.basis), str(r.source),
                                                       att or ((file, ref),))  # type: ignore[arg-type]
    return out


@cache
def _grid_max(curve: str, file: str, reference: str) -> float:
    return max(math.exp(v) for v in _gemm_grid(curve, file, reference).values)


@cache
def sustained_ratio(gpu_model: str) -> tuple[float, str]:
    """(sustained / burst GEMM throughput, basis) from `datasets/gemm_sustained.csv`: the measured curves
    are short bursts at boost clocks; a training step runs the GPU at its power limit for minutes.
    1.0 for a GPU without a row (basis says so)."""
    try:
        df = read_csv("gemm_sustained.csv")
    except FileNotFoundError:
        return 1.0, "not measured"
    d = df[df["gpu"] == gpu_model]
    if d.empty:
        return 1.0, "not measured"
    return float(d["ratio"].iloc[0]), str(d["basis"].iloc[0])


@cache
def interference_slowdown(gpu_model: str) -> tuple[float, str]:
    """(fractional GEMM slowdown while an NCCL collective runs beside it, basis).

    From `datasets/interference_measured.csv` (median over shapes, ops and sizes of GEMM time beside
    / alone); a GPU without rows uses the measured one's figure (basis says so); 0 if none is measured.
    """
    try:
        df = read_csv("interference_measured.csv")
    except FileNotFoundError:
        return 0.0, "not measured"
    mine = df[df["gpu"] == gpu_model]
    basis = "measured"
    if mine.empty:
        mine, basis = df, f"assumption: measured on {', '.join(sorted(set(df['gpu'])))}"
    return max(float(mine["gemm_slowdown"].median()) - 1.0, 0.0), basis


@cache
def interference_comm_stretch(gpu_model: str) -> tuple[float, str]:
    """(factor by which an NCCL collective lasts longer while a GEMM runs beside it, basis).

    From `datasets/interference_measured.csv`: median over rows of busbw alone / busbw beside the GEMM
    (two GPUs of one host over NVLink); a GPU without rows uses the measured one's figure (basis says so);
    1 if none is measured.
    """
    try:
        df = read_csv("interference_measured.csv")
    except FileNotFoundError:
        return 1.0, "not measured"
    mine = df[df["gpu"] == gpu_model]
    basis = "measured"
    if mine.empty:
        mine, basis = df, f"assumption: measured on {', '.join(sorted(set(df['gpu'])))}"
    ratio = mine["busbw_alone_GBps"].astype(float) / mine["busbw_beside_GBps"].astype(float)
    return max(float(ratio.median()), 1.0), basis


class DeviceModel:
    """Times of GEMMs, attention and memory-bound ops on one device at one compute precision."""

    def __init__(self, spec: GPUSpec, precision: str) -> None:
        self.spec = spec
        self.precision = precision
        if spec.is_cpu:
            self.peak_flops = spec.peak("fp32") * 1e12
            self.curve, self.basis = "", "measured CPU rate (efficiency 1)"
            self.sustained, self.sustained_basis = 1.0, "measured CPU rate"
        else:
            hit = _curve_table().get((spec.model, precision))
            if hit is None:
                have = sorted(p for (g, p) in _curve_table() if g == spec.model)
                raise WorkbenchError(f"precision: no {precision} GEMM curve for {spec.model} in "
                                     f"datasets/gemm_efficiency.csv (have: {', '.join(have) or 'none'})")
            self.row = hit
            self.curve, self.basis = hit.curve, hit.basis
            self.peak_flops = spec.peak(precision) * 1e12
            self._scale = 1.0
            if hit.max_efficiency is not None:
                self._scale = hit.max_efficiency / _grid_max(hit.curve, hit.file, hit.reference)
            self.sustained, self.sustained_basis = sustained_ratio(spec.model)
            self._scale *= self.sustained
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
        r = self.row
        eff = _gemm_grid(self.curve, r.file, r.reference).at(m, n, k) * self._scale
        return flops / (self.peak_flops * eff)

    def bmm_seconds(self, m: int, n: int, k: int, count: int = 1, elem: int = 2) -> float:
        """A batched GEMM (e.g. QKᵀ of unfused attention): the GEMM curve, floored by its HBM traffic
        (inputs read and output written once at the elementwise bandwidth): small-k batched GEMMs that
        write an s×s matrix are memory-bound."""
        t = self.gemm_seconds(m * count, n, k)  # one launch: its tiles fill the GPU like one tall GEMM's
        return max(t, self.memory_seconds(float(elem) * (m * k + k * n + m * n) * count))

    def attention_seconds(self, flops: float, seq: int, head_dim: int, causal: bool = True,
                          backward: bool = False, cap: float | None = None) -> float:
        """Seconds for flash attention doing `flops` useful FLOPs (backward: pass the forward's FLOPs × 2.5);
        `cap`: an older kernel's best fraction of peak (the measured curve is today's SDPA)."""
        if flops <= 0:
            return 0.0
        if self.spec.is_cpu:
            return flops / self.attn_peak
        curves = _attention_curves(() if self.spec.is_cpu else self.row.attention_files) or _attention_curves()
        hd = 128 if head_dim > 96 else 64
        key = ("attn_bwd" if backward else "attn_fwd", hd, int(causal))
        xs, ys = curves[key] if key in curves else _attention_curves()[key]
        eff = float(np.interp(math.log2(max(seq, 1)), xs, ys))
        if not self.spec.is_cpu:
            eff *= self.sustained
        if cap is not None:
            eff = min(eff, cap)
        return flops / (self.attn_peak * eff)

    def attention_max_seq(self) -> float:
        """The longest sequence length with a measured attention point (beyond it the curve is clamped)."""
        if self.spec.is_cpu:
            return float("inf")
        curves = _attention_curves(self.row.attention_files) or _attention_curves()
        return float(2 ** max(xs.max() for xs, _ in curves.values()))

    def memory_seconds(self, nbytes: float, size_hint: float | None = None) -> float:
        """Seconds for a memory-bound op moving `nbytes` (efficiency from the elementwise curve at `size_hint`)."""
        if nbytes <= 0:
            return 0.0
        if self.spec.is_cpu:
            return nbytes / self.mem_Bps
        xs, ys = _elementwise_curve(self.row.file, self.row.reference)
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
    # the curve itself (burst clocks, as the sweep measured), without the sustained-clock factor
    d["predicted_s"] = [dm.gemm_seconds(int(m), int(n), int(k)) * dm.sustained for m, n, k in zip(d["m"], d["n"], d["k"])]
    d["error"] = d["predicted_s"] / d["seconds"] - 1
    return pd.DataFrame(d)
