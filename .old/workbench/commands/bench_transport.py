"""`workbench bench transport`: single, batched and paged writes, imm latency, baselines (raw socket,
gloo; on GPUs a device copy and NCCL), soak."""

from __future__ import annotations

import argparse
from typing import Any

from workbench.commands import Command, emit
from workbench.errors import WorkbenchError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="tcp", help="tcp (default), cuda_ipc or nixl")
    p.add_argument("--lanes", type=int, default=4, help="most lanes: single writes are swept over 1, 2, 4, … up to it")
    p.add_argument("--device", default="cpu", help="where the buffers live: cpu or cuda:N")
    p.add_argument("--target-device", help="where the target's buffer lives (default: --device), e.g. cuda:1")
    p.add_argument("--quick", action="store_true", help="a short sweep (4 KiB, 1 MiB, 16 MiB; no 256 MiB) and a 5000-write soak")
    p.add_argument("--soak", type=int, default=None, help="random writes in the soak (default 100000; 0 skips it)")
    p.add_argument("--no-baselines", action="store_true", help="skip the raw-socket and gloo baselines")
    p.add_argument("--no-gpu-baselines", action="store_true", help="skip the device-copy and NCCL baselines")
    p.add_argument("--save", metavar="MACHINE", default=None,
                   help="also write benchmarks/results/transport-MACHINE.json and .md")
    p.add_argument("--out-dir", default="benchmarks/results", help="where --save writes")
    p.add_argument("--trace", metavar="PATH", default=None,
                   help="write the timed operations (Result events) as a Perfetto/Chrome trace")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import platform
    import re
    from pathlib import Path

    from transport import bench
    from transport.backends import BACKENDS
    from transport.errors import TransportError
    from workbench.bench.record import write
    from workbench.result import Result

    if args.backend not in BACKENDS:
        raise WorkbenchError(f"--backend: unknown {args.backend!r} (choose from {', '.join(BACKENDS)})")
    if not 1 <= args.lanes <= 64:
        raise WorkbenchError(f"--lanes: must be 1..64, got {args.lanes}")
    if args.soak is not None and not 0 <= args.soak <= 10_000_000:
        raise WorkbenchError(f"--soak: must be 0..10000000 writes, got {args.soak}")
    for name, dev in (("--device", args.device), ("--target-device", args.target_device or args.device)):
        if not re.fullmatch(r"cpu|cuda:\d{1,2}", dev):
            raise WorkbenchError(f"{name}: use cpu or cuda:N, got {dev[:40]!r}")
    if args.save is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", args.save):
        raise WorkbenchError(f"--save: a machine name of letters, digits, '.', '_' or '-', got {args.save[:40]!r}")
    out = Path(args.out_dir)
    if args.save and out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out-dir: {args.out_dir!r} is not a folder")
    if args.trace and (Path(args.trace).is_dir() or not Path(args.trace).resolve().parent.is_dir()):
        raise WorkbenchError(f"--trace: {args.trace!r} is not a writable file path (its folder must exist)")
    sizes = (4 << 10, 64 << 10, 1 << 20, 16 << 20) if args.quick else bench.SIZES
    soak = args.soak if args.soak is not None else (5000 if args.quick else 100_000)
    machine = args.save or platform.node()
    try:
        report = bench.run(args.backend, args.lanes, sizes=sizes, baselines=not args.no_baselines,
                           soak_writes=soak, device=args.device, machine=machine,
                           target_device=args.target_device, gpu_baselines=not args.no_gpu_baselines)
    except TransportError as exc:
        raise WorkbenchError(f"bench transport ({args.backend}): {exc}") from exc
    rows = [{k: r.get(k) for k in bench.ROW_KEYS} for r in report.rows]
    if args.save:
        out.mkdir(parents=True, exist_ok=True)
        saved = record(report, args, machine)
        write(saved, out / f"transport-{machine}.json", "--save")
        m = saved["machine"]
        (out / f"transport-{machine}.md").write_text(
            f"# Transport benchmark on {machine}\n\n`{saved['command']}` — {m['platform']}, {m['cpus_usable']} CPUs\n\n"
            + report.table() + "\n\nRatios: " + json.dumps(report.ratios(), indent=1)
            + "\n\nSoak: " + json.dumps(report.soak) + "\n")
    if args.trace:
        Result(events=report.events, source="run", fidelity="measured", metrics=report.metrics()).to_perfetto(args.trace)
    if args.json:
        emit(rows, True)
    else:
        print(report.table())
        print()
        for k, v in report.ratios().items():
            print(f"{k}: {v:.2f}")
        if report.soak:
            print("soak:", report.soak)
    return 0


def record(report: Any, args: argparse.Namespace, machine: str) -> dict[str, Any]:
    """The run as the one benchmark record (`workbench.bench.record`), with `workbench.bench.machine`'s
    machine block: the rows as measured; the summary holds the backend and devices, the headline ratios,
    the soak's counts (`soak_*`) and the run's notes (the paged writes' single-write reference, the copy
    paths used), flattened."""
    from workbench.bench.machine import machine as machine_record
    from workbench.bench.record import flat
    from workbench.bench.record import record as make

    summary = {"backend": args.backend, "device": args.device, "target_device": args.target_device or args.device,
               **report.metrics(), **flat(report.notes)}
    return make("transport", report.rows, summary, "workbench bench transport " + " ".join(_argv(args)),
                machine=machine_record(machine))


def _argv(args: argparse.Namespace) -> list[str]:
    out = [f"--backend {args.backend}", f"--lanes {args.lanes}"]
    if args.device != "cpu":
        out.append(f"--device {args.device}")
    if args.target_device:
        out.append(f"--target-device {args.target_device}")
    if args.no_baselines:
        out.append("--no-baselines")
    if args.quick:
        out.append("--quick")
    if args.soak is not None:
        out.append(f"--soak {args.soak}")
    return out


COMMANDS = [Command("bench", "transport", "benchmark the transport (writes, paged writes, imm latency) against "
                    "a raw socket pair and torch.distributed gloo, plus a soak", add_arguments, run)]
