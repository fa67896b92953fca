"""`workbench run train`: the sharded GPT training job for real, with live telemetry, sim check and calibration."""

from __future__ import annotations

import argparse
import statistics
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
    p.add_argument("--json", action="store_true")


def train_report(args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    from workbench.run.launcher import start_train

    kw: dict[str, Any] = {"p2p": args.p2p, "optimizer": args.optimizer, "lr": args.lr, "timeout": args.timeout,
                          "hosts": args.hosts.split(",") if args.hosts else None,
                          "master_addr": args.master_addr, "telemetry_addr": args.telemetry_addr,
                          "env": getattr(args, "env", None)}
    baseline = None
    if args.overhead != "none":
        mode: bool | str = "ab" if args.overhead == "ab" else False
        steps = max(args.steps, 30) if mode == "ab" else args.steps
        baseline = start_train(args.cluster, args.model, args.plan, steps, args.backend, telemetry=mode,
                               **kw).wait()
    h = start_train(args.cluster, args.model, args.plan, args.steps, args.backend, telemetry=True, **kw)
    for u in h.updates():
        if progress and not args.json and u.events.shape[0]:
            print(f"\r  step {u.step}/{u.steps}  t={u.t:6.2f}s  +{len(u.events)} events", end="", file=sys.stderr)
    r = h.wait()
    if progress and not args.json:
        print(file=sys.stderr)
    m = r.metrics
    out: dict[str, Any] = {
        "losses": m["losses"], "step_seconds": m["step_seconds"], "events": m["events"],
        "updates": m["updates"], "updates_per_s": m["updates_per_s"],
        "telemetry_overhead_pct": None, "telemetry_cost_pct": m["telemetry_cost_pct"],
        "step_seconds_off": None, "sim_step_seconds": None, "sim_error_pct_before": None,
        "sim_error_pct_after": None, "ranks": m["ranks"], "backend": m["backend"], "p2p": m["p2p"], "plan": m["plan"],
        "model": m["model"], "params": m["params"], "tokens_per_s": m["tokens_per_s"],
        "tflops_per_rank": m["tflops_per_rank"], "mfu_fp32": m["mfu_fp32"],
        "devices": m["devices"], "cluster": m["cluster"], "step_seconds_all": m["step_seconds_all"],
    }
    if baseline is not None:
        bm = baseline.metrics
        out["overhead_method"] = args.overhead
        if args.overhead == "ab":  # alternate steps of one run: odd steps on, even steps off
            times = bm["step_seconds_all"]
            out["step_seconds_off"] = statistics.median(times[2::2]) if len(times) > 2 else None
            out["step_seconds_on"] = statistics.median(times[3::2]) if len(times) > 3 else None
            out["telemetry_overhead_pct"] = bm["telemetry_overhead_pct"]
        else:
            off = bm["step_seconds"]
            out["step_seconds_off"] = off
            out["telemetry_overhead_pct"] = (m["step_seconds"] - off) / off * 100
        out["step_seconds_all_overhead_run"] = bm["step_seconds_all"]
        out["losses_match_without_telemetry"] = bm["losses"][: len(m["losses"])] == m["losses"][: len(bm["losses"])]
    if not args.no_sim:
        out |= _sim(args, r)
    if args.trace:
        out["trace"] = str(r.to_perfetto(args.trace))
    out["memory_peak_bytes_per_rank"] = (r.memory.groupby(["rank", "category"])["bytes"].max()
                                         .groupby("rank").sum().astype(int).tolist() if not r.memory.empty else [])
    out["compute_seconds_per_step"] = _kind_seconds(r, "compute")
    out["comm_seconds_per_step"] = _kind_seconds(r, "collective") + _kind_seconds(r, "transfer")
    return out


def _kind_seconds(r: Any, kind: str) -> float:
    from workbench.compare import per_step

    t = per_step(r, ("kind",))
    return float(t.loc[t["kind"] == kind, "seconds"].sum())


def _sim(args: argparse.Namespace, r: Any) -> dict[str, Any]:
    from workbench.calibrate.run import before_after
    from workbench.run.launcher import default_cluster
    from workbench.topology import load_cluster

    cluster = load_cluster(args.cluster) if args.cluster else default_cluster(r.metrics["ranks"], args.backend)
    try:
        ba = before_after(cluster, r)
    except Exception as exc:  # noqa: BLE001 - the run's numbers stand even if the simulator cannot model it
        return {"sim_note": f"simulation failed: {type(exc).__name__}: {exc}"}
    ba.pop("calibrated_cluster", None)
    return ba


def run(args: argparse.Namespace) -> int:
    from workbench.run.errors import RunFailed

    try:
        return _run(args)
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
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
