"""`workbench bench dashboard`: is the live dashboard smooth, and does it leave the notebook responsive?

The benchmark itself is `workbench.bench.dashboard` (run inside a real Jupyter kernel); this
command owns its options and writes the one benchmark record (`workbench.bench.record`).
"""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=20.0, help="updates per second of the synthetic stream")
    p.add_argument("--seconds", type=float, default=10.0, help="how long the synthetic stream runs")
    p.add_argument("--steps", type=int, default=40, help="training steps of each real run")
    p.add_argument("--out", help="also write the record here (e.g. benchmarks/results/dashboard-<machine>.json)")
    p.add_argument("--machine", help="the machine's name in the record (default: the host name)")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")


def _run(args: argparse.Namespace) -> int:
    from workbench.bench import record as rec
    from workbench.bench.dashboard import run_in_kernel
    from workbench.errors import WorkbenchError
    from workbench.io import check_output

    if not args.rate > 0 or not args.seconds > 0 or args.steps < 1:
        raise WorkbenchError(f"--rate and --seconds must be positive and --steps at least 1 "
                             f"(got --rate {args.rate:g} --seconds {args.seconds:g} --steps {args.steps})")
    if args.out:
        check_output(args.out, "--out")
    command = f"workbench bench dashboard --rate {args.rate:g} --seconds {args.seconds:g} --steps {args.steps}"
    m = run_in_kernel(args.rate, args.seconds, args.steps)
    out = rec.record("dashboard", m.rows, m.summary, command, machine=args.machine)
    if args.out:
        rec.write(out, args.out)
    emit(out if args.json else out["summary"], args.json)
    return 0


COMMANDS = [Command("bench", "dashboard", "benchmark the live dashboard in a real kernel (redraw cost, "
                    "updates/s, notebook responsiveness during a run)", _args, _run)]
