"""Moved: the simulator's benchmarks live in `workbench.bench.sim` (one home for the workbench's
benchmarks). This name stays so a module that registers with `workbench.sim.bench.register` still
works (`workbench/sim/bench_*.py` modules are still discovered)."""

from workbench.bench.sim import BENCHES, median_call_us, register, run

__all__ = ["BENCHES", "median_call_us", "register", "run"]
