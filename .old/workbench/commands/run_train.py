"""`workbench run train`: the sharded GPT training job for real, with live telemetry, sim check and calibration."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from workbench.commands import Command, emit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", default=None, help="cluster spec for device names and the simulation (default: this machine)")
    p.add_argument("--model", default=None, help="gpt:layers=4,hidden=128,heads=4,vocab=256,seq=64 (the default)")
    p.add_argument("--plan", required=True, help="dp=2,tp=1,pp=1,mbs=2,gbs=8 (+ zero=1); world = dp*tp*pp ranks")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--p2p", choices=["auto", "transport", "dist"], default="auto",
                   help="pipeline sends: the transport tcp engine (auto on CPU) or torch.distributed send/recv")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--overhead", choices=["ab", "separate", "none"], default="ab",
                   help="measure the telemetry overhead: ab = one extra run with telemetry off and on in alternate "
                        "steps (robust to other load); separate = an extra run with telemetry off; none")
    p.add_argument("--no-sim", action="store_true", help="skip the simulation and calibration")
    p.add_argument("--hosts", default=None,
                   help="network namespaces to spread the ranks over: ns1,ns2 (existing) or emulate:N[:MBIT] "
                        "(an emulated cluster of N hosts with links shaped to MBIT Mbit/s, made and removed here); root")
    p.add_argument("--master-addr", default=None, help="rendezvous address the ranks reach (with --hosts)")
    p.add_argument("--telemetry-addr", default=None, help="this launcher's address as the ranks see it (with --hosts)")
    p.add_argument("--trace", default=None, help="write a Perfetto/Chrome trace of the measured events here")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is stopped")
    p.add_argument("--engine", choices=["native", "megatron"], default=None,
                   help="native: PyTorch's FSDP2/DTensor/pipelining (default); megatron: the hand-written engine "
                        "with every collective timed and pipeline sends over the transport")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (native engine)")
    p.add_argument("--corpus", default=None, help="a text file or folder to train on (default: the project's docs)")
    p.add_argument("--checkpoint-dir", default=None, help="save/resume torch.distributed.checkpoint here")
    p.add_argument("--export-dir", default=None, help="write an HF-format (Llama) checkpoint here at the end")
    p.add_argument("--json", action="store_true")


def train_report(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """One turn of `workbench.loop` for the CLI's arguments; the flat summary it prints."""
    from workbench.runner.launcher import local_job
    from workbench.workflow import loop

    workload = {k: v for k, v in (("engine", args.engine), ("compile", args.compile or None), ("corpus", args.corpus),
                                  ("checkpoint_dir", args.checkpoint_dir), ("export_dir", args.export_dir))
                if v is not None}
    job = local_job(args.cluster, args.model, args.plan, args.steps, args.backend, optimizer=args.optimizer,
                    lr=args.lr, **workload)
    _check_cores(job, args)
    options: dict[str, Any] = {"p2p": args.p2p, "timeout": args.timeout,
                               "hosts": args.hosts.split(",") if args.hosts else None,
                               "master_addr": args.master_addr, "telemetry_addr": args.telemetry_addr,
                               "env": getattr(args, "env", None)}

    def show(u: Any) -> None:
        if progress and not args.json and u.events.shape[0]:
            print(f"\r  step {u.step}/{u.steps}  t={u.t:6.2f}s  +{len(u.events)} events", end="", file=sys.stderr)

    res = loop(job, simulate=not args.no_sim, overhead=args.overhead, on_update=show, **options)
    if progress and not args.json:
        print(file=sys.stderr)
    out = res.summary()
    out["_measured"] = res.measured  # the trace is written after the results are printed
    return out


def _check_cores(job: Any, args: argparse.Namespace) -> None:
    """Refuse a timeout that cannot be met; warn when CPU ranks outnumber this machine's cores."""
    import os

    from workbench.errors import WorkbenchError

    if not args.timeout > 0:
        raise WorkbenchError(f"--timeout: must be more than 0 seconds, got {args.timeout:g}")
    world = (job.plan.dp or 1) * (job.plan.tp or 1) * (job.plan.pp or 1)
    cores = os.cpu_count() or 1
    if job.workload.backend == "gloo" and not args.hosts and world > cores:
        print(f"warning: the plan needs {world} ranks but this machine has {cores} CPU cores; the ranks will "
              "share cores, so steps are slow and their times are not representative", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from workbench.errors import RunFailed

    try:
        return _run(args)
    except RunFailed as exc:
        print(file=sys.stderr)  # end the progress line: the failure gets its own
        print(f"error: {exc}", file=sys.stderr)
        partial = getattr(exc.partial, "metrics", None) or {}
        if partial.get("steps"):
            losses = ", ".join(f"{x:.3f}" for x in partial.get("losses", []) if x is not None)
            print(f"partial results: {partial['steps']} steps finished by every rank; losses: {losses}; "
                  f"step {partial['step_seconds'] * 1e3:.1f} ms median", file=sys.stderr)
        if getattr(exc, "log_dir", ""):
            print(f"rank logs: {exc.log_dir}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.hosts and args.hosts.startswith("emulate:"):
        from transport.emulate import EmulatedCluster
        from workbench.errors import WorkbenchError

        parts = args.hosts.split(":")
        try:
            n, mbit = int(parts[1]), float(parts[2]) if len(parts) > 2 else 1000.0
        except (IndexError, ValueError):
            raise WorkbenchError(f"hosts: {args.hosts!r}; use emulate:N or emulate:N:MBIT, e.g. emulate:2:1000") from None
        with EmulatedCluster(hosts=n, rate_mbit=mbit) as c:
            args.hosts = ",".join(c.ns(i) for i in range(n))
            args.master_addr = args.master_addr or c.ip(0)
            args.env = {"GLOO_SOCKET_IFNAME": "eth0"}
            out = train_report(args)
            out["emulated"] = {"hosts": n, "rate_mbit": mbit, "namespaces": args.hosts.split(",")}
    else:
        out = train_report(args)
    return _print(args, out)


def _print(args: argparse.Namespace, out: dict[str, Any]) -> int:
    measured = out.pop("_measured", None)
    if args.trace and measured is not None:  # results first, then the trace: a bad trace path loses nothing
        out["trace"] = str(args.trace)
    code = _print_results(args, out)
    if args.trace and measured is not None:
        try:
            measured.to_perfetto(args.trace)
        except OSError as exc:
            from workbench.errors import WorkbenchError

            raise WorkbenchError(f"--trace: cannot write {args.trace!r} ({exc.strerror or exc}); "
                                 "the results above are complete") from None
    return code


def _print_results(args: argparse.Namespace, out: dict[str, Any]) -> int:
    if args.json:
        emit(out, True)
        return 0
    losses = ", ".join(f"{x:.3f}" for x in out["losses"] if x is not None)
    lines = [f"ranks {out['ranks']} ({out['backend']}), plan {out['plan']}, model {out['model']}",
             f"losses: {losses}",
             f"step: {out['step_seconds'] * 1e3:.1f} ms median ({out['tokens_per_s']:.0f} tokens/s)",
             f"telemetry: {out['events']} events, {out['updates_per_s']:.1f} updates/s, overhead "
             + (f"{out['telemetry_overhead_pct']:.1f} %" if out["telemetry_overhead_pct"] is not None else "not measured")
             + f" (recorder cost {out['telemetry_cost_pct']:.2f} % of the step)"]
    if out.get("sim_step_seconds") is not None:
        lines.append(f"simulated step {out['sim_step_seconds'] * 1e3:.1f} ms: error {out['sim_error_pct_before']:+.1f} % "
                     f"before, {out['sim_error_pct_after']:+.1f} % after calibrating on this run")
    elif out.get("sim_note"):
        lines.append(out["sim_note"])
    print("\n".join(lines))
    return 0


COMMANDS = [Command("run", "train", "run the sharded GPT training job for real (torchrun semantics) with live telemetry",
                    add_arguments, run)]
