"""Named cluster presets from `datasets/presets.yaml`, with options: `aws-p5:nodes=4`, `dgx-a100:gpu=A100-80GB`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.data import read_yaml
from workbench.errors import WorkbenchError
from workbench.io import is_dir, is_file
from workbench.options import parse_options
from workbench.topology.model import Cluster
from workbench.topology.spec import MAX_GPUS, MAX_NICS_PER_NODE, from_dict, load
from workbench.validate import number, show, whole

PRESET_OPTIONS = ("nodes", "gpu", "nics", "oversubscription", "leaf_ports")


def preset_names() -> list[str]:
    return list(read_yaml("presets.yaml"))


def preset(name: str, **options: Any) -> Cluster:
    """Build a preset; options: nodes, gpu (where the preset has variants), nics, oversubscription, leaf_ports."""
    table = read_yaml("presets.yaml")
    if name not in table:
        raise WorkbenchError(f"cluster: unknown preset {show(name)} (known: {', '.join(table)}; or a YAML/JSON file)")
    p = table[name]
    bad = set(options) - set(PRESET_OPTIONS)
    if bad:
        shown = ", ".join(show(b, 40) for b in sorted(bad)[:5])
        raise WorkbenchError(f"{name}: unknown options [{shown}] (allowed: {', '.join(PRESET_OPTIONS)})")
    nodes = whole(options.get("nodes", p["nodes"]), f"{name}.nodes", 1, MAX_GPUS)
    gpu = options.get("gpu", p["gpu"])
    if not isinstance(gpu, str) or gpu not in p["gpu_choices"]:
        raise WorkbenchError(
            f"{name}.gpu: {show(gpu)} is not a variant of {name} (allowed: {', '.join(p['gpu_choices'])})")
    templates = p.get("groups") or [p["node"]]
    counts = _split(nodes, [float(t.get("share", 1.0)) for t in templates])
    raw_nodes = []
    for t, count in zip(templates, counts):
        if count == 0:
            continue
        n = {k: v for k, v in t.items() if k != "share"}
        n.setdefault("gpu", gpu)
        if "nics" in options:
            n["nics"] = whole(options["nics"], f"{name}.nics", 0, MAX_NICS_PER_NODE)
        raw_nodes.append({**n, "count": count})
    gpus = sum(int(n.get("gpus", 8)) * int(n["count"]) for n in raw_nodes)
    if gpus > MAX_GPUS:
        raise WorkbenchError(f"{name}.nodes: {nodes} nodes make {gpus} GPUs; the limit is {MAX_GPUS}")
    fabric = dict(p.get("fabric", {}))
    if "oversubscription" in options:
        fabric["oversubscription"] = number(options["oversubscription"], f"{name}.oversubscription", 0.0, 1024.0)
    if "leaf_ports" in options:
        fabric["leaf_ports"] = whole(options["leaf_ports"], f"{name}.leaf_ports", 1, 65536)
    label = name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
    return from_dict({"name": label[:200], "nodes": raw_nodes, "fabric": fabric})


def _split(total: int, shares: list[float]) -> list[int]:
    """Whole node counts per template in proportion to `shares` (first templates get the rounding)."""
    s = sum(shares)
    counts = [int(total * x / s) for x in shares]
    for i in range(total - sum(counts)):
        counts[i % len(counts)] += 1
    return counts


def load_cluster(spec: str | Path | Cluster) -> Cluster:
    """A cluster from a preset spec (`aws-p5:nodes=2`), a YAML/JSON path, `local`, or a Cluster."""
    if isinstance(spec, Cluster):
        return spec
    if not isinstance(spec, (str, Path)):
        raise WorkbenchError(f"cluster: expected a preset spec, a file path or a Cluster, got {show(spec)}")
    text = str(spec).strip()
    if text == "local":
        from workbench.topology.discover import discover

        return discover()
    if text.lower().endswith((".yaml", ".yml", ".json")) or is_file(text):
        return load(text)
    name, _, opts = text.partition(":")
    if is_dir(text):
        raise WorkbenchError(f"cluster: {show(text)} is a directory; give a cluster file or a preset")
    if name not in read_yaml("presets.yaml"):  # before its options, so messages start with a known name
        preset(name)
    return preset(name, **parse_options(opts, name))
