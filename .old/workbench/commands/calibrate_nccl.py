"""`workbench calibrate nccl-tests FILE…`: fit the intra-node collective model to real nccl-tests output."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", help="nccl-tests text outputs (all_reduce_perf … or benchmarks/nccl_sweep.py)")
    p.add_argument("--cluster", required=True, help="the cluster the tests ran on, e.g. dgx-h100:nodes=1,gpu=H200")
    p.add_argument("--gpus", type=int, help="ranks that took part (default: every GPU of the cluster)")
    p.add_argument("--op", help="the test's op when neither the text nor the file name says it")
    p.add_argument("--algo", default="ring", help="the algorithm whose efficiency is fitted: ring or nvls")
    p.add_argument("--min-bytes", default="64MiB", help="rows at least this large drive the fit")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from workbench.calibration.fit import fit_nccl_tests
    from workbench.calibration.nccl_tests import read_nccl_tests
    from workbench.errors import WorkbenchError
    from workbench.topology import load_cluster
    from workbench.units import parse_size

    cluster = load_cluster(args.cluster)
    if args.gpus is not None and not 1 <= args.gpus <= cluster.num_gpus:
        raise WorkbenchError(f"--gpus: must be between 1 and {cluster.num_gpus} for {cluster.name}, got {args.gpus}")
    group = cluster.gpus[: args.gpus] if args.gpus else None
    frames = []
    for f in args.files:
        op = args.op or next((o for o in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "alltoall")
                              if o in Path(f).name), None)
        frames.append(read_nccl_tests(f, op=op))
    rows = pd.concat(frames, ignore_index=True)
    if (rows["op"] == "unknown").any():
        raise WorkbenchError("--op: a file does not say which collective it measured; pass --op all_reduce (or …)")
    _, table = fit_nccl_tests(rows, cluster, group, args.algo, min_bytes=parse_size(args.min_bytes, "--min-bytes"))
    fitted = table.attrs["fitted"]
    big = table[table["size"] >= parse_size(args.min_bytes)]
    summary = {
        "param": fitted["param"], "before": fitted["before"], "after": fitted["after"],
        "median_abs_err_before_pct": float(big["err_before"].abs().median() * 100),
        "median_abs_err_after_pct": float(big["err_after"].abs().median() * 100),
        "rows": table.to_dict("records"),
    }
    text = (f"{fitted['param']}: {fitted['before']:.4g} -> {fitted['after']:.4g}; median |error| on rows >= "
            f"{args.min_bytes}: {summary['median_abs_err_before_pct']:.1f} % before, "
            f"{summary['median_abs_err_after_pct']:.1f} % after\n"
            + table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    emit(summary, args.json, text)
    return 0


COMMANDS = [Command("calibrate", "nccl-tests", "fit the collective model to nccl-tests output; busbw before/after",
                    add_arguments, run)]
