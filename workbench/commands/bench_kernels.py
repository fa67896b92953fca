"""`workbench bench kernels`: data-movement kernels against a copy of the same bytes (and torch on GPU)."""

from __future__ import annotations

import argparse

from workbench.commands import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with `python -m kernels.bench` (defined here so parsing imports nothing heavy)."""
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--size", default="64MiB", help="CPU output size per kernel (default 64MiB)")
    p.add_argument("--gpu-sizes", default="256MiB,1GiB", help="GPU output sizes (default 256MiB,1GiB)")
    p.add_argument("--out", help="also write {machine, command, rows} to this JSON file")
    p.add_argument("--machine", help="machine name recorded with --out")


def _run(args: argparse.Namespace) -> int:
    from kernels.bench import main_args

    return main_args(args)


COMMANDS = [
    Command(
        group="bench",
        name="kernels",
        help="MoE dispatch/combine, paged KV, FP8/INT8 kernels: GB/s against a plain copy (and torch on GPU)",
        add_arguments=add_arguments,
        run=_run,
    )
]
