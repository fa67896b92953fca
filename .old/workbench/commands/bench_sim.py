"""`workbench bench sim`: how fast the simulator is (benchmarks in `workbench.bench.sim`)."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", help="run only this benchmark (repeatable); see workbench.bench.sim")
    p.add_argument("--out", help="also write the record here (e.g. benchmarks/results/sim-<machine>.json)")
    p.add_argument("--machine", help="the machine's name in the record (default: the host name)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON (headline numbers in 'summary')")


def _run(args: argparse.Namespace) -> int:
    from workbench.bench import record as rec
    from workbench.bench.sim import discover, run
    from workbench.errors import WorkbenchError
    from workbench.io import check_output

    if args.only:
        bad = sorted(set(args.only) - set(discover()))
        if bad:
            raise WorkbenchError(f"--only: unknown benchmark(s) {bad} (known: {', '.join(discover())})")
    if args.out:
        check_output(args.out, "--out")  # before minutes of measuring
    command = "workbench bench sim" + "".join(f" --only {o}" for o in args.only or [])
    measured = run(args.only)
    out = rec.record("sim", measured.rows, measured.summary, command, machine=args.machine)
    if args.out:
        rec.write(out, args.out)
    emit(out if args.json else out["summary"], args.json)
    return 0


COMMANDS = [Command("bench", "sim", "benchmark the simulator (closed-form collectives, flow-level all-to-all, "
                    "training step and plan search)", _args, _run)]
