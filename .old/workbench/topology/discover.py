"""Discovery of the machine this runs on: GPUs from nvidia-smi, NICs from sysfs, else CPU ranks.

On a CPU-only box the result is a one-node cluster whose compute devices are CPU ranks with
*measured* rates (a float32 matmul and a large copy), so local runs can be simulated too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from workbench.topology import catalogue as cat
from workbench.topology.model import CPU_MODEL, Cluster, Fabric, Node

_NAME_TO_MODEL = (
    ("H200", "H200"), ("H100 PCIe", "H100-PCIe"), ("H100", "H100-SXM"), ("B200", "B200"),
    ("A100-SXM4-40GB", "A100-40GB"), ("A100-SXM4-80GB", "A100-80GB"), ("A100 80GB", "A100-80GB"),
    ("A100", "A100-40GB"), ("V100", "V100-SXM2"), ("L40S", "L40S"), ("3090", "RTX-3090"), ("4090", "RTX-4090"),
)


def gpu_model_from_name(name: str) -> str | None:
    """Catalogue model for an nvidia-smi name such as 'NVIDIA H100 80GB HBM3'."""
    for needle, model in _NAME_TO_MODEL:
        if needle in name:
            return model
    return None


def _nvidia_gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _nics() -> tuple[int, str]:
    """(count, model) of RDMA NICs from /sys/class/infiniband, else 1 Ethernet port."""
    ib = Path("/sys/class/infiniband")
    devs = sorted(p.name for p in ib.iterdir()) if ib.is_dir() else []
    if devs:
        efa = [d for d in devs if d.startswith(("efa", "rdmap"))]
        return len(devs), "EFAv2-100G" if efa else "CX7-NDR-400G"
    return 1, "ETH-10G"


@lru_cache(maxsize=1)
def measure_cpu(seconds: float = 0.3) -> dict[str, float]:
    """Measured float32 matmul TFLOP/s (all cores) and copy GB/s of this CPU."""
    import numpy as np

    n = 512
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = a.copy()
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        a @ b
        reps += 1
    flops = 2 * n**3 * reps / (time.perf_counter() - t0)
    src = np.ones(32 * 1024 * 1024 // 8)
    dst = np.empty_like(src)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 2:
        np.copyto(dst, src)
        reps += 1
    gbps = 2 * src.nbytes * reps / (time.perf_counter() - t0) / 1e9
    return {"fp32_tflops": round(flops / 1e12, 4), "memory_GBps": round(gbps, 2)}


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):  # pragma: no cover
        return 8.0


def discover(cpu_ranks: int | None = None, measure: bool = True) -> Cluster:
    """This machine as a one-node cluster (GPUs if nvidia-smi finds known ones, else CPU ranks)."""
    names = _nvidia_gpus()
    nics, nic_model = _nics()
    models = [gpu_model_from_name(n) for n in names]
    if names and all(models):
        model = str(models[0])
        intra = "nvswitch" if len(names) > 1 and cat.gpu(model).nvlink_form == "nvswitch" else "pcie"
        node = Node(gpu=model, gpus=len(names), intra=intra, nic=nic_model, nics=nics)
        return Cluster(name=f"local ({len(names)}x {model})", nodes=(node,), fabric=Fabric(kind="switch", switch="ethernet"))
    ranks = cpu_ranks or max(os.cpu_count() or 1, 1)
    specs = dict(measure_cpu()) if measure else {"fp32_tflops": 0.05, "memory_GBps": 5.0}
    specs = {k: v / ranks for k, v in specs.items()} | {"memory_GB": round(_memory_gb() / ranks, 2)}
    node = Node(gpu=CPU_MODEL, gpus=ranks, intra="pcie", nic=nic_model, nics=nics,
                specs=tuple(sorted(specs.items())))
    return Cluster(name=f"local ({ranks} CPU ranks)", nodes=(node,), fabric=Fabric(kind="switch", switch="ethernet"))
