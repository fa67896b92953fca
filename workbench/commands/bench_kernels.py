"""`workbench bench kernels`: data-movement kernels against a copy of the same bytes (and torch on GPU)."""

from __future__ import annotations

import argparse
import sys

from workbench.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--size", default="64MiB", help="CPU output size per kernel (default 64MiB)")
    p.add_argument("--gpu-sizes", default="256MiB,1GiB", help="GPU output sizes (default 256MiB,1GiB)")
    p.add_argument("--out", help="also write {machine, command, rows} to this JSON file")
    p.add_argument("--machine", help="machine name recorded with --out")


def _run(args: argparse.Namespace) -> int:
    import json
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
        command = " ".join(["workbench bench kernels", *sys.argv[3:]]) if len(sys.argv) > 2 else "workbench bench kernels"
        try:
            Path(args.out).write_text(json.dumps(bench.record(rows, args.machine, command), indent=2))
        except OSError as exc:
            raise WorkbenchError(f"--out: cannot write {args.out!r}: {exc.strerror}") from exc
    bench.print_rows(rows, args.json)
    return 0


COMMANDS = [
    Command(
        group="bench",
        name="kernels",
        help="MoE dispatch/combine, paged KV, FP8/INT8 kernels: GB/s against a plain copy (and torch on GPU)",
        add_arguments=add_arguments,
        run=_run,
    )
]
