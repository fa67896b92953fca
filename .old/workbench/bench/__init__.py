"""The workbench's own benchmarks: one machine record, one result shape, the benchmarks themselves.

- `machine.py`: `machine(name)`, what ran a benchmark (one dict, built in one place);
- `record.py`: `record(benchmark, rows, summary, command)`, the one JSON shape every
  `workbench bench …` command writes: `{benchmark, machine, command, date, summary, rows}`;
- `sim.py`, `sim_train.py`, `sim_serve.py`: the simulator's benchmarks (`workbench bench sim`, a registry);
- `dashboard.py`: the live dashboard's benchmark, run inside a real Jupyter kernel
  (`workbench bench dashboard`).

`transport/bench.py` and `kernels/bench.py` stay in their packages (which import nothing of
`workbench`); their CLI wrappers (`workbench bench transport|kernels`) put their rows into this
shape, as `workbench bench serve --out` does; extra fields go into the summary (`record.flat`). CLI options live in
`workbench/commands/bench_*.py`; the functions here take plain typed arguments.
"""
