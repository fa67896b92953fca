"""Named cluster presets from `datasets/presets.yaml`, with options: `aws-p5:nodes=4`, `dgx-a100:gpu=A100-80GB`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.data import read_yaml
from workbench.errors import WorkbenchError
from workbench.options import parse_options
from workbench.topology.model import Cluster
from workbench.topology.spec import from_dict, load

PRESET_OPTIONS = ("nodes", "gpu", "nics", "oversubscription", "leaf_ports")


def preset_names() -> list[str]:
    return list(read_yaml("presets.yaml"))


def preset(name: str, **options: Any) -> Cluster:
    """Build a preset; options: nodes, gpu (where the preset has variants), nics, oversubscription, leaf_ports."""
    table = read_yaml("presets.yaml")
    if name not in table:
        raise WorkbenchError(f"cluster: unknown preset {name!r} (known: {', '.join(table)}; or a YAML/JSON file)")
    p = table[name]
    bad = set(options) - set(PRESET_OPTIONS)
    if bad:
        raise WorkbenchError(f"{name}: unknown options {sorted(bad)} (allowed: {', '.join(PRESET_OPTIONS)})")
    try:
        nodes = int(options.get("nodes", p["nodes"]))
    except ValueError:
        raise WorkbenchError(f"{name}.nodes: expected a whole number, got {options['nodes']!r}") from None
    if nodes < 1:
        raise WorkbenchError(f"{name}.nodes: must be at least 1, got {nodes}")
    gpu = str(options.get("gpu", p["gpu"]))
    if gpu not in p["gpu_choices"]:
        raise WorkbenchError(f"{name}.gpu: {gpu!r} is not a variant of {name} (allowed: {', '.join(p['gpu_choices'])})")
    templates = p.get("groups") or [p["node"]]
    counts = _split(nodes, [float(t.get("share", 1.0)) for t in templates])
    raw_nodes = []
    for t, count in zip(templates, counts):
        if count == 0:
            continue
        n = {k: v for k, v in t.items() if k != "share"}
        n.setdefault("gpu", gpu)
        if "nics" in options:
            n["nics"] = _option(name, "nics", options["nics"], int)
        raw_nodes.append({**n, "count": count})
    fabric = dict(p.get("fabric", {}))
    for key, typ in (("oversubscription", float), ("leaf_ports", int)):
        if key in options:
            fabric[key] = _option(name, key, options[key], typ)
    label = name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
    return from_dict({"name": label, "nodes": raw_nodes, "fabric": fabric})


def _option(name: str, key: str, value: Any, typ: type) -> Any:
    try:
        return typ(value)
    except ValueError:
        kind = "a whole number" if typ is int else "a number"
        raise WorkbenchError(f"{name}.{key}: expected {kind}, got {value!r}") from None


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
    text = str(spec)
    if text == "local":
        from workbench.topology.discover import discover

        return discover()
    if Path(text).suffix.lower() in (".yaml", ".yml", ".json") or Path(text).is_file():
        return load(text)
    name, _, opts = text.partition(":")
    return preset(name, **parse_options(opts, name))
