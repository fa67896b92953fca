"""`workbench bench sim`: how fast the simulator is (registry in `workbench.sim.bench`)."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", action="append", help="run only this benchmark (repeatable); see workbench.sim.bench")
    p.add_argument("--out", help="also write the JSON here (e.g. benchmarks/results/sim-<machine>.json)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run(args: argparse.Namespace) -> int:
    import json

    from workbench.errors import WorkbenchError
    from workbench.sim import bench

    if args.only:
        import importlib
        import pkgutil

        import workbench.sim as sim_pkg

        for info in pkgutil.iter_modules(sim_pkg.__path__):  # bench_*.py modules register more benchmarks
            if info.name.startswith("bench_"):
                importlib.import_module(f"workbench.sim.{info.name}")
        bad = set(args.only) - set(bench.BENCHES)
        if bad:
            raise WorkbenchError(f"--only: unknown benchmark(s) {sorted(bad)} (known: {', '.join(bench.BENCHES)})")
    out = bench.run_all(args.only)
    out["command"] = "workbench bench sim" + "".join(f" --only {o}" for o in args.only or [])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    flat = {k: v for k, v in out.items() if not isinstance(v, (dict, list))}
    emit(out if args.json else flat, args.json)
    return 0


COMMANDS = [Command("bench", "sim", "benchmark the simulator (closed-form collectives, flow-level all-to-all)",
                    _args, _run)]
