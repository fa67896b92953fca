"""Clusters to and from plain dicts, YAML and JSON, with validation that names the bad field.

The file format groups identical consecutive nodes with `count`:

    name: my-lab
    nodes:
      - {gpu: H100-SXM, gpus: 8, intra: nvswitch, nic: EFAv2-100G, nics: 32, count: 2}
    fabric: {kind: rail, switch: efa}
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import WorkbenchError
from workbench.topology import catalogue as cat
from workbench.topology.model import CPU_MODEL, FABRIC_KINDS, INTRA_KINDS, Cluster, Fabric, Node

_NODE_KEYS = {f.name for f in fields(Node)} | {"count"}
_FABRIC_KEYS = {f.name for f in fields(Fabric)}


def to_dict(c: Cluster) -> dict[str, Any]:
    """A plain dict (JSON/YAML-ready); consecutive identical nodes become one entry with `count`."""
    nodes: list[dict[str, Any]] = []
    prev: Node | None = None
    for n in c.nodes:
        if n == prev:
            nodes[-1]["count"] += 1
            continue
        d = asdict(n)
        if n.specs:
            d["specs"] = dict(n.specs)
        else:
            d.pop("specs")
        d["count"] = 1
        nodes.append(d)
        prev = n
    return {"name": c.name, "nodes": nodes, "fabric": asdict(c.fabric)}


def _int(v: Any, field: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < lo:
        raise WorkbenchError(f"{field}: expected a whole number >= {lo}, got {v!r}")
    return int(v)


def _num(v: Any, field: str, lo: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= lo:
        raise WorkbenchError(f"{field}: expected a number > {lo}, got {v!r}")
    return float(v)


def from_dict(d: Any) -> Cluster:
    """Validate and build a `Cluster`; errors name the field, e.g. `nodes[2].gpu: unknown GPU model …`."""
    if not isinstance(d, dict):
        raise WorkbenchError(f"cluster: expected a mapping with 'nodes', got {type(d).__name__}")
    unknown = set(d) - {"name", "nodes", "fabric"}
    if unknown:
        raise WorkbenchError(f"cluster: unknown keys {sorted(unknown)} (allowed: name, nodes, fabric)")
    raw_nodes = d.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise WorkbenchError("nodes: expected a non-empty list of nodes")
    nodes: list[Node] = []
    raw_index: list[int] = []  # the file's entry of each node, for error messages
    for i, rn in enumerate(raw_nodes):
        f = f"nodes[{i}]"
        if not isinstance(rn, dict):
            raise WorkbenchError(f"{f}: expected a mapping, got {rn!r}")
        bad = set(rn) - _NODE_KEYS
        if bad:
            raise WorkbenchError(f"{f}: unknown keys {sorted(bad)} (allowed: {', '.join(sorted(_NODE_KEYS))})")
        if "gpu" not in rn:
            raise WorkbenchError(f"{f}.gpu: missing (known: {', '.join(cat.gpu_models())}, {CPU_MODEL})")
        gpu = str(rn["gpu"])
        if gpu != CPU_MODEL:
            cat.gpu(gpu, field=f"{f}.gpu")
        intra = rn.get("intra", "nvswitch" if gpu != CPU_MODEL else "pcie")
        if intra not in INTRA_KINDS:
            raise WorkbenchError(f"{f}.intra: unknown {intra!r} (allowed: {', '.join(INTRA_KINDS)})")
        if intra != "pcie" and gpu != CPU_MODEL:
            form = cat.gpu(gpu).nvlink_form
            if form == "":
                raise WorkbenchError(f"{f}.intra: {gpu} has no NVLink, so {intra!r} is impossible (use pcie)")
            if intra == "nvswitch" and form != "nvswitch":
                raise WorkbenchError(
                    f"{f}.intra: {gpu} connects by NVLink bridge only, not an NVSwitch (use nvlink-bridge or pcie)"
                )
        nic = str(rn.get("nic", "ETH-10G"))
        cat.nic(nic, field=f"{f}.nic")
        specs = rn.get("specs") or {}
        if not isinstance(specs, dict):
            raise WorkbenchError(f"{f}.specs: expected a mapping of measured rates, got {specs!r}")
        node = Node(
            gpu=gpu, gpus=_int(rn.get("gpus", 8), f"{f}.gpus", 1), intra=intra, nic=nic,
            nics=_int(rn.get("nics", 1), f"{f}.nics", 0),
            specs=tuple(sorted((str(k), _num(v, f"{f}.specs.{k}")) for k, v in specs.items())),
        )
        nodes.extend([node] * _int(rn.get("count", 1), f"{f}.count", 1))
        raw_index.extend([i] * _int(rn.get("count", 1), f"{f}.count", 1))
    rf = d.get("fabric", {}) or {}
    if not isinstance(rf, dict):
        raise WorkbenchError(f"fabric: expected a mapping, got {rf!r}")
    bad = set(rf) - _FABRIC_KEYS
    if bad:
        raise WorkbenchError(f"fabric: unknown keys {sorted(bad)} (allowed: {', '.join(sorted(_FABRIC_KEYS))})")
    kind = rf.get("kind", "rail")
    if kind not in FABRIC_KINDS:
        raise WorkbenchError(f"fabric.kind: unknown {kind!r} (allowed: {', '.join(FABRIC_KINDS)})")
    switch = rf.get("switch", "efa")
    if switch not in cat.switch_kinds():
        raise WorkbenchError(f"fabric.switch: unknown {switch!r} (allowed: {', '.join(cat.switch_kinds())})")
    fabric = Fabric(
        kind=kind, switch=switch, leaf_ports=_int(rf.get("leaf_ports", 32), "fabric.leaf_ports", 1),
        spines=_int(rf.get("spines", 8), "fabric.spines", 1),
        oversubscription=_num(rf.get("oversubscription", 1.0), "fabric.oversubscription"),
    )
    if len(nodes) > 1 and any(n.nics == 0 for n in nodes):
        i = next(i for i, n in enumerate(nodes) if n.nics == 0)
        raise WorkbenchError(f"nodes[{raw_index[i]}].nics: a node of a multi-node cluster needs at least one NIC")
    return Cluster(name=str(d.get("name", "cluster")), nodes=tuple(nodes), fabric=fabric)


def dumps(c: Cluster, fmt: str = "yaml") -> str:
    if fmt == "json":
        return json.dumps(to_dict(c), indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(to_dict(c), sort_keys=False)
    raise WorkbenchError(f"format: unknown {fmt!r} (allowed: yaml, json)")


def loads(text: str) -> Cluster:
    """A cluster from YAML or JSON text (JSON is YAML, so one parser reads both)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkbenchError(f"cluster file: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    return from_dict(data)


def dump(c: Cluster, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(dumps(c, "json" if path.suffix == ".json" else "yaml"))
    return path


def load(path: str | Path) -> Cluster:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"cluster: no such file {str(path)!r} (give a preset like aws-p5:nodes=2 or a YAML/JSON file)")
    return loads(path.read_text())
