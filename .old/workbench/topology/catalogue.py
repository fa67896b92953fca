"""Typed access to the hardware catalogue in `datasets/` (GPUs, NICs, node links, switches)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from workbench.data import read_csv
from workbench.errors import WorkbenchError

PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8")


def _num(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


@dataclass(frozen=True)
class GPUSpec:
    """One catalogue GPU (or a measured CPU device): capacity and peak rates."""

    model: str
    name: str
    memory_GB: float
    memory_GBps: float
    peak_tflops: tuple[tuple[str, float], ...]  # (precision, dense TFLOP/s) where supported
    nvlink_gen: int | None
    nvlink_GBps: float  # total both directions
    pcie_gen: int
    is_cpu: bool = False
    source: str = ""
    nvlink_form: str = ""  # nvswitch | bridge | "" (no NVLink)

    def peak(self, precision: str) -> float:
        """Peak dense TFLOP/s at `precision`; raises naming what the GPU supports."""
        table = dict(self.peak_tflops)
        if precision not in table:
            raise WorkbenchError(
                f"precision: {self.model} has no {precision} rate (supported: {', '.join(table)})"
            )
        return table[precision]


@dataclass(frozen=True)
class NICSpec:
    model: str
    name: str
    protocol: str  # efa-srd | ib-rc | roce-rc | tcp
    Gbps: float
    latency_us: float
    msg_rate_M: float | None
    gpudirect: bool
    pcie_gen: int
    source: str = ""

    @property
    def GBps(self) -> float:
        return self.Gbps / 8.0


@cache
def gpu_models() -> dict[str, GPUSpec]:
    out: dict[str, GPUSpec] = {}
    for row in read_csv("gpus.csv").to_dict("records"):
        peaks = tuple(
            (p, float(row[f"{p}_tflops" if p != "int8" else "int8_tops"]))
            for p in PRECISIONS
            if _num(row[f"{p}_tflops" if p != "int8" else "int8_tops"]) is not None
        )
        gen = _num(row["nvlink_gen"])
        out[row["model"]] = GPUSpec(
            model=row["model"], name=row["name"], memory_GB=float(row["memory_GB"]),
            memory_GBps=float(row["memory_GBps"]), peak_tflops=peaks,
            nvlink_gen=int(gen) if gen is not None else None, nvlink_GBps=_num(row["nvlink_GBps"]) or 0.0,
            pcie_gen=int(row["pcie_gen"]), source=str(row["source"]),
            nvlink_form=str(row["nvlink_form"]) if gen is not None else "",
        )
    return out


@cache
def nic_models() -> dict[str, NICSpec]:
    out: dict[str, NICSpec] = {}
    for row in read_csv("nics.csv").to_dict("records"):
        out[row["model"]] = NICSpec(
            model=row["model"], name=row["name"], protocol=row["protocol"], Gbps=float(row["Gbps"]),
            latency_us=float(row["latency_us"]), msg_rate_M=_num(row["msg_rate_M"]),
            gpudirect=bool(int(row["gpudirect"])), pcie_gen=int(row["pcie_gen"]), source=str(row["source"]),
        )
    return out


def gpu(model: str, field: str = "gpu") -> GPUSpec:
    models = gpu_models()
    if model not in models:
        raise WorkbenchError(f"{field}: unknown GPU model {model!r} (known: {', '.join(models)}, CPU)")
    return models[model]


def nic(model: str, field: str = "nic") -> NICSpec:
    models = nic_models()
    if model not in models:
        raise WorkbenchError(f"{field}: unknown NIC model {model!r} (known: {', '.join(models)})")
    return models[model]


@cache
def node_link(kind: str, generation: int) -> tuple[float, float]:
    """(GB/s per direction, latency µs) of an intra-node link kind and generation."""
    df = read_csv("links.csv")
    hit = df[(df["kind"] == kind) & (df["generation"] == generation)]
    if hit.empty:
        gens = sorted(df[df["kind"] == kind]["generation"].tolist())
        raise WorkbenchError(f"link: no {kind} generation {generation} in links.csv (known: {gens})")
    row = hit.iloc[0]
    return float(row["GBps_per_direction"]), float(row["latency_us"])


@cache
def switch_latency_us(kind: str) -> float:
    df = read_csv("fabrics.csv")
    hit = df[df["kind"] == kind]
    if hit.empty:
        raise WorkbenchError(f"fabric.switch: unknown switch kind {kind!r} (known: {', '.join(df['kind'])})")
    return float(hit.iloc[0]["latency_us"])


def switch_kinds() -> list[str]:
    return list(read_csv("fabrics.csv")["kind"])
