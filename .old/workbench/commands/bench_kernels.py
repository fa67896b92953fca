"""`workbench bench kernels`: data-movement kernels against a copy of the same bytes (and torch on GPU)."""

from __future__ import annotations

import argparse
from typing import Any

from workbench.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--size", default="64MiB", help="CPU output size per kernel (default 64MiB)")
    p.add_argument("--gpu-sizes", default="256MiB,1GiB", help="GPU output sizes (default 256MiB,1GiB)")
    p.add_argument("--out", help="also write the benchmark record (workbench.bench.record: machine, command, summary, rows) here")
    p.add_argument("--machine", help="machine name recorded with --out")


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workbench.errors import WorkbenchError
    from workbench.units import parse_size

    size = int(parse_size(args.size, field="--size"))
    gpu_sizes = tuple(int(parse_size(s, field="--gpu-sizes")) for s in str(args.gpu_sizes).split(","))
    for name, v in [("--size", size), *(("--gpu-sizes", g) for g in gpu_sizes)]:
        if not 1 <= v <= 1 << 36:
            raise WorkbenchError(f"{name}: must be between 1 B and 64 GiB, got {v} B")
    if args.out:
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise WorkbenchError(f"--out: {args.out!r} is not a writable file path (its folder must exist)")
    from kernels import bench
    from kernels.errors import KernelInputError

    try:
        rows = bench.run(args.device, size, gpu_sizes)
    except KernelInputError as exc:
        raise WorkbenchError(str(exc)) from exc
    if args.out:
        from workbench.bench.record import write

        command = f"workbench bench kernels --device {args.device} --size {args.size} --gpu-sizes {args.gpu_sizes}"
        write(record(rows, bench.machine(), command, args.machine), args.out)
    bench.print_rows(rows, args.json)
    return 0


def record(rows: list[dict[str, Any]], software: dict[str, Any], command: str, name: str | None) -> dict[str, Any]:
    """The run as the one benchmark record (`workbench.bench.record`) with `workbench.bench.machine`'s machine
    block. Summary: each kernel's ratio to a plain copy at its largest size (`<kernel>_<device>_vs_copy`) and
    what the machine block does not hold (`kernels.bench.machine()`'s numba/numpy/torch/CuPy versions, numba
    threads, the GPU torch saw)."""
    from workbench.bench.machine import machine
    from workbench.bench.record import record as make

    summary = {k: v for k, v in software.items() if k not in ("cpu", "cores")}
    for r in sorted(rows, key=lambda r: r["bytes"]):  # the largest size of a kernel and device wins
        summary[f"{r['kernel']}_{r['device']}_vs_copy"] = r["ratio"]
    return make("kernels", rows, summary, command, machine=machine(name))


COMMANDS = [
    Command(
        group="bench",
        name="kernels",
        help="MoE dispatch/combine, paged KV, FP8/INT8 kernels: GB/s against a plain copy (and torch on GPU)",
        add_arguments=add_arguments,
        run=_run,
    )
]
