"""`workbench topology show|path|validate|discover`."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="preset with options (aws-p5:nodes=4), 'local', or a YAML/JSON file")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _show_args(p: argparse.ArgumentParser) -> None:
    _spec(p)
    _json(p)
    p.add_argument("--yaml", action="store_true", help="print the cluster as YAML (a file you can edit and load)")


def _show(args: argparse.Namespace) -> int:
    from workbench.topology import dumps, load_cluster
    from workbench.topology.display import cluster_text

    c = load_cluster(args.spec)
    if args.yaml:
        print(dumps(c, "yaml"), end="")
        return 0
    emit(c.summary(), args.json, cluster_text(c))
    return 0


def _path_args(p: argparse.ArgumentParser) -> None:
    _spec(p)
    p.add_argument("gpu_a", help="source GPU, e.g. n0.g0")
    p.add_argument("gpu_b", help="destination GPU, e.g. n1.g3")
    p.add_argument("--lane", type=int, default=0, help="which of the source GPU's NICs (across nodes)")
    _json(p)


def _path(args: argparse.Namespace) -> int:
    from workbench.topology import load_cluster

    c = load_cluster(args.spec)
    nics = c.nics_of(args.gpu_a)
    if args.lane and args.lane >= max(len(nics), 1):
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"--lane: {args.gpu_a} has {len(nics)} NIC(s), so lanes are 0..{max(len(nics) - 1, 0)}; "
                             f"got {args.lane}")
    path = c.path(args.gpu_a, args.gpu_b, lane=args.lane)
    d = path.as_dict()
    d["nics_a"] = c.nics_of(args.gpu_a)
    d["nics_b"] = c.nics_of(args.gpu_b)
    text = "\n".join(
        [f"{path.src} -> {path.dst}: bottleneck {path.bottleneck_GBps:g} GB/s, latency {path.latency_us:.2f} us"]
        + [f"  {lk.name:40s} {lk.kind:14s} {lk.GBps:8.2f} GB/s  {lk.latency_us:.2f} us" for lk in path.links]
    )
    emit(d, args.json, text)
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a cluster YAML or JSON file")


def _validate(args: argparse.Namespace) -> int:
    from workbench.topology import load

    c = load(args.file)
    s = c.summary()
    print(f"ok: {c.name}: {s['nodes']} nodes, {s['gpus']} devices {s['gpu_models']}, {s['links']} links")
    return 0


def _discover_args(p: argparse.ArgumentParser) -> None:
    _json(p)
    p.add_argument("--yaml", action="store_true", help="print the discovered cluster as YAML")


def _discover(args: argparse.Namespace) -> int:
    from workbench.topology import discover, dumps
    from workbench.topology.display import cluster_text

    c = discover()
    if args.yaml:
        print(dumps(c, "yaml"), end="")
        return 0
    s = c.summary()
    s["devices"] = [{"id": g, "kind": c.graph.vertex(g).kind, "model": c.graph.vertex(g).model} for g in c.gpus]
    s["specs"] = dict(c.nodes[0].specs)
    emit(s, args.json, cluster_text(c))
    return 0


COMMANDS = [
    Command("topology", "show", "summarise a cluster (preset, file or 'local')", _show_args, _show),
    Command("topology", "path", "the route between two GPUs: links, bottleneck, latency", _path_args, _path),
    Command("topology", "validate", "check a cluster file; exit 2 naming the bad field", _validate_args, _validate),
    Command("topology", "discover", "describe this machine as a cluster", _discover_args, _discover),
]
