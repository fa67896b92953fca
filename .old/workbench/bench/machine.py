"""One machine record: what ran a benchmark (every `workbench bench …` result carries it)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; the platform's processor otherwise)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the machine's count where there is none)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gpus(timeout: float = 10.0) -> list[dict[str, Any]]:
    """NVIDIA GPUs as `nvidia-smi` lists them (name, memory, driver); empty without nvidia-smi.

    Asks nvidia-smi rather than torch, so recording the machine never imports torch or CUDA.
    """
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mem = float(parts[1]) if parts[1].replace(".", "", 1).isdigit() else None
            found.append({"name": parts[0], "memory_MiB": mem, "driver": parts[2]})
    return found


def machine(name: str | None = None) -> dict[str, Any]:
    """What ran a benchmark: `name` (given, e.g. "cpu2-vm" or "h200x2"; the host name otherwise),
    OS, Python, CPU model and counts, the 1-minute load average at the start (a busy machine
    shows), and the GPUs."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "name": name or platform.node() or "unknown",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "load_1min": load,
        "gpus": gpus(),
    }
