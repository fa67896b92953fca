"""`workbench doctor`: what this machine can use for real runs — GPUs, NCCL, EFA, aws-ofi-nccl, NIXL, CUDA IPC — and what to fix."""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
from typing import Any

from workbench.commands import Command, emit

_OFI_GLOBS = ("/opt/amazon/ofi-nccl/lib/libnccl-net*.so", "/opt/aws-ofi-nccl/lib/libnccl-net*.so",
              "/usr/local/lib/libnccl-net*.so", "/usr/lib/x86_64-linux-gnu/libnccl-net*.so",
              "/usr/lib64/libnccl-net*.so")


def _cmd(args: list[str], timeout: float = 10) -> tuple[int, str]:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return 127, str(exc)


def check(name: str, ok: bool | None, detail: str, fix: str = "") -> dict[str, Any]:
    """One line of the report: ok True (usable), False (a problem to fix) or None (not applicable here)."""
    return {"check": name, "ok": ok, "detail": detail, "fix": "" if ok else fix}  # None: a hint to enable it


def checks() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        import torch
        import torch.distributed as dist

        out.append(check("torch", True, f"torch {torch.__version__}"))
        out.append(check("gloo", dist.is_gloo_available(), "torch.distributed gloo backend (CPU ranks)",
                         "install a torch build with distributed support"))
        ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(ngpu)]
        out.append(check("gpus", ngpu > 0 or None, f"{ngpu} CUDA GPU(s){': ' + ', '.join(names) if names else ''}"
                         + ("" if ngpu else f"; torch build {torch.version.cuda or 'CPU-only'}"),
                         "no GPU: runs use gloo on CPU ranks; on a GPU host install a CUDA build of torch"))
        nccl = dist.is_nccl_available()
        ver = ".".join(map(str, torch.cuda.nccl.version())) if nccl and ngpu else ""
        out.append(check("nccl", nccl if ngpu else None,
                         f"NCCL {ver}" if nccl and ngpu else ("available" if nccl else "not in this torch build"),
                         "install a CUDA build of torch (it bundles NCCL)"))
        if ngpu >= 2:
            p2p = torch.cuda.can_device_access_peer(0, 1)
            out.append(check("cuda_ipc", p2p, f"GPU 0 ↔ GPU 1 peer access: {p2p}",
                             "enable P2P (IOMMU/ACS settings) or expect staging through host memory"))
        else:
            out.append(check("cuda_ipc", None, "needs two GPUs on this host"))
    except ImportError:
        out.append(check("torch", False, "torch is not installed", "pip install torch==2.13.0 (CPU) or a CUDA build"))
    # EFA / libfabric
    fi = shutil.which("fi_info") or next((p for p in ("/opt/amazon/efa/bin/fi_info",) if os.path.exists(p)), None)
    if fi:
        rc, txt = _cmd([fi, "-p", "efa"])
        n = txt.count("provider: efa")
        out.append(check("efa", rc == 0 and n > 0, f"fi_info -p efa: {n} EFA endpoint(s)" if rc == 0 else txt[-200:],
                         "no EFA device: attach EFA interfaces to the instance (p4d/p5) and load the efa driver"))
    else:
        ib = sorted(os.listdir("/sys/class/infiniband")) if os.path.isdir("/sys/class/infiniband") else []
        efa = [d for d in ib if d.startswith(("efa", "rdmap"))]
        out.append(check("efa", None if not efa else False,
                         f"fi_info not found; RDMA devices: {', '.join(ib) or 'none'}",
                         "install the EFA software (aws-efa-installer) to get libfabric and fi_info"))
    # aws-ofi-nccl
    plugin = [p for g in _OFI_GLOBS for p in glob.glob(g)]
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if d:
            plugin += glob.glob(os.path.join(d, "libnccl-net*.so"))
    out.append(check("aws-ofi-nccl", bool(plugin) or (None if not fi else False),
                     f"NCCL net plugin: {plugin[0]}" if plugin else "no libnccl-net*.so found",
                     "install aws-ofi-nccl (part of the AWS EFA installer / DLAMI) and put its lib on "
                     "LD_LIBRARY_PATH; set FI_PROVIDER=efa"))
    # NIXL
    try:
        import importlib.util

        has_nixl = importlib.util.find_spec("nixl") is not None
    except (ImportError, ValueError):
        has_nixl = False
    out.append(check("nixl", has_nixl or None, "nixl Python package " + ("found" if has_nixl else "not installed"),
                     "pip install 'workbench[rdma]' (NIXL with UCX/libfabric) for RDMA point-to-point"))
    # transport tcp (always)
    try:
        import transport  # noqa: F401

        out.append(check("transport-tcp", True, "embedded TCP transport backend"))
    except ImportError as exc:
        out.append(check("transport-tcp", False, str(exc), "reinstall workbench"))
    ns = shutil.which("ip") is not None and os.geteuid() == 0
    out.append(check("netns", ns or None, "network namespaces for the emulated cluster: "
                     + ("root and ip(8) present" if ns else "needs root and iproute2"),
                     "run as root with iproute2 installed to emulate several hosts"))
    out.append(check("cpu", True, f"{os.cpu_count()} cores (CPU ranks for gloo runs)"))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    rows = checks()
    if args.json:
        emit(rows, True)
        return 0
    mark = {True: "ok  ", False: "FIX ", None: "--  "}
    for r in rows:
        hint = {False: "fix", None: "to use it"}.get(r["ok"], "")
        print(f"{mark[r['ok']]} {r['check']:<14} {r['detail']}" + (f"\n       {hint}: {r['fix']}" if r["fix"] else ""))
    return 0


COMMANDS = [Command("doctor", None, "report what this machine can use (GPUs, NCCL, EFA, aws-ofi-nccl, NIXL, CUDA IPC) "
                    "and what to fix", add_arguments, run)]
