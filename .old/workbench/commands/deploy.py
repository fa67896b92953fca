"""`workbench deploy k8s|swarm`: the files that run a planned job on a real cluster."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", metavar="JOB.yaml", help="a saved Job (wb.Job.save); or give --cluster/--model/--plan")
    p.add_argument("--cluster", help="cluster preset or file (with --model and --plan)")
    p.add_argument("--model", help="model preset, spec or HF config.json")
    p.add_argument("--plan", default=None, help="plan spec (training: tp=8,pp=2,dp=4,gbs=..; serving: tp=8,...)")
    p.add_argument("--serve", action="store_true", help="a serving job (default: training)")
    p.add_argument("--image", default="ghcr.io/workbench/workbench:latest", help="container image to run")
    p.add_argument("--name", default="workbench", help="name prefix of the objects (a DNS label)")
    p.add_argument("--namespace", default="default")
    p.add_argument("--replicas", default="1:4", metavar="MIN:MAX", help="serving replicas per role (HPA bounds)")
    p.add_argument("--target-waiting", type=int, default=8,
                   help="queued requests per pod above which a replica is added")
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--json", action="store_true")


def _job(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from workbench.core.job import Job
    from workbench.errors import WorkbenchError

    if args.job:
        if args.cluster or args.model:
            raise WorkbenchError("--job: give either --job or --cluster/--model/--plan, not both")
        return Job.load(args.job)
    if not args.cluster or not args.model:
        raise WorkbenchError("--cluster/--model: give both (or --job JOB.yaml)")
    return Job.create(args.cluster, args.model, args.plan, "serving" if args.serve else "training")


def _replicas(text: str) -> tuple[int, int]:
    from workbench.errors import WorkbenchError

    lo, sep, hi = text.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise WorkbenchError(f"--replicas: {text[:40]!r}; use MIN:MAX, e.g. 1:4")
    return int(lo), int(hi)


def _run(args: argparse.Namespace) -> int:
    from workbench.deploy import Options, write

    lo, hi = _replicas(args.replicas)
    opts = Options(image=args.image, name=args.name, namespace=args.namespace, min_replicas=lo, max_replicas=hi,
                   target_waiting=args.target_waiting)
    res = write(_job(args), args.target, args.out, opts)
    emit(res, args.json, text="\n".join(res["files"]) + f"\nvalidated {len(res['validated'])} object checks")
    return 0


def _k8s(args: argparse.Namespace) -> int:
    args.target = "k8s"
    return _run(args)


def _swarm(args: argparse.Namespace) -> int:
    args.target = "swarm"
    return _run(args)


COMMANDS = [
    Command("deploy", "k8s", "Kubernetes manifests (serving or training, EFA/IB plumbing), validated offline", _args, _k8s),
    Command("deploy", "swarm", "a Docker Swarm stack file (no EFA in Swarm services), validated offline", _args, _swarm),
]
