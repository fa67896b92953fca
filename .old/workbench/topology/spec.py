"""Clusters to and from plain dicts, YAML and JSON, with validation that names the bad field.

The file format groups identical consecutive nodes with `count`:

    name: my-lab
    nodes:
      - {gpu: H100-SXM, gpus: 8, intra: nvswitch, nic: EFAv2-100G, nics: 32, count: 2}
    fabric: {kind: rail, switch: efa}
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from workbench.errors import WorkbenchError
from workbench.io import check_path, parse_structured, read_text
from workbench.topology import catalogue as cat
from workbench.topology.model import CPU_MODEL, FABRIC_KINDS, INTRA_KINDS, Cluster, Fabric, Node
from workbench.validate import number, show, text, whole

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


MAX_GPUS_PER_NODE = 1024
MAX_NICS_PER_NODE = 1024
MAX_GPUS = 131072
"""The largest cluster built (2^17 GPUs: 8 s and 0.5 GB on a 2-core VM); larger ones are typos."""


def _int(v: Any, field: str, lo: int = 0, hi: int = 65536) -> int:
    if isinstance(v, str):  # a file's number is a number; "8" is a typo for 8 only in key=value specs
        raise WorkbenchError(f"{field}: expected a whole number >= {lo} and <= {hi}, got {show(v)}")
    return whole(v, field, lo, hi)


def _num(v: Any, field: str, lo: float = 0.0, hi: float = 1e9) -> float:
    if isinstance(v, str):
        raise WorkbenchError(f"{field}: expected a number > {lo:g} and <= {hi:g}, got {show(v)}")
    return number(v, field, lo, hi)


def from_dict(d: Any) -> Cluster:
    """Validate and build a `Cluster`; errors name the field, e.g. `nodes[2].gpu: unknown GPU model …`."""
    if not isinstance(d, dict):
        raise WorkbenchError(f"cluster: expected a mapping with 'nodes', got {type(d).__name__}")
    unknown = set(d) - {"name", "nodes", "fabric"}
    if unknown:
        raise WorkbenchError(f"cluster: unknown keys {_keys(unknown)} (allowed: name, nodes, fabric)")
    name = text(d.get("name") if d.get("name") is not None else "cluster", "name")
    raw_nodes = d.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise WorkbenchError("nodes: expected a non-empty list of nodes")
    nodes: list[Node] = []
    raw_index: list[int] = []  # the file's entry of each node, for error messages
    total = 0
    for i, rn in enumerate(raw_nodes):
        f = f"nodes[{i}]"
        if not isinstance(rn, dict):
            raise WorkbenchError(f"{f}: expected a mapping, got {show(rn)}")
        bad = set(rn) - _NODE_KEYS
        if bad:
            raise WorkbenchError(f"{f}: unknown keys {_keys(bad)} (allowed: {', '.join(sorted(_NODE_KEYS))})")
        if "gpu" not in rn:
            raise WorkbenchError(f"{f}.gpu: missing (known: {', '.join(cat.gpu_models())}, {CPU_MODEL})")
        gpu = text(rn["gpu"], f"{f}.gpu", 64)
        if gpu != CPU_MODEL:
            cat.gpu(gpu, field=f"{f}.gpu")
        intra = rn.get("intra", "nvswitch" if gpu != CPU_MODEL else "pcie")
        if not isinstance(intra, str) or intra not in INTRA_KINDS:
            raise WorkbenchError(f"{f}.intra: unknown {show(intra)} (allowed: {', '.join(INTRA_KINDS)})")
        if intra != "pcie" and gpu != CPU_MODEL:
            form = cat.gpu(gpu).nvlink_form
            if form == "":
                raise WorkbenchError(f"{f}.intra: {gpu} has no NVLink, so {intra!r} is impossible (use pcie)")
            if intra == "nvswitch" and form != "nvswitch":
                raise WorkbenchError(
                    f"{f}.intra: {gpu} connects by NVLink bridge only, not an NVSwitch (use nvlink-bridge or pcie)"
                )
        nic = text(rn.get("nic", "ETH-10G"), f"{f}.nic", 64)
        cat.nic(nic, field=f"{f}.nic")
        specs = rn.get("specs") or {}
        if not isinstance(specs, dict):
            raise WorkbenchError(f"{f}.specs: expected a mapping of measured rates, got {show(specs)}")
        node = Node(
            gpu=gpu, gpus=_int(rn.get("gpus", 8), f"{f}.gpus", 1, MAX_GPUS_PER_NODE), intra=intra, nic=nic,
            nics=_int(rn.get("nics", 1), f"{f}.nics", 0, MAX_NICS_PER_NODE),
            specs=tuple(sorted((_spec_key(k, f"{f}.specs"), _num(v, f"{f}.specs.{k}")) for k, v in specs.items())),
        )
        count = _int(rn.get("count", 1), f"{f}.count", 1, MAX_GPUS)
        total += count * node.gpus
        if total > MAX_GPUS:
            raise WorkbenchError(f"{f}.count: the cluster would have more than {MAX_GPUS} GPUs "
                                 f"({count} nodes of {node.gpus} here); the limit is {MAX_GPUS}")
        nodes.extend([node] * count)
        raw_index.extend([i] * count)
    rf = d.get("fabric", {}) or {}
    if not isinstance(rf, dict):
        raise WorkbenchError(f"fabric: expected a mapping, got {show(rf)}")
    bad = set(rf) - _FABRIC_KEYS
    if bad:
        raise WorkbenchError(f"fabric: unknown keys {_keys(bad)} (allowed: {', '.join(sorted(_FABRIC_KEYS))})")
    kind = rf.get("kind", "rail")
    if not isinstance(kind, str) or kind not in FABRIC_KINDS:
        raise WorkbenchError(f"fabric.kind: unknown {show(kind)} (allowed: {', '.join(FABRIC_KINDS)})")
    switch = rf.get("switch", "efa")
    if not isinstance(switch, str) or switch not in cat.switch_kinds():
        raise WorkbenchError(f"fabric.switch: unknown {show(switch)} (allowed: {', '.join(cat.switch_kinds())})")
    fabric = Fabric(
        kind=kind, switch=switch, leaf_ports=_int(rf.get("leaf_ports", 32), "fabric.leaf_ports", 1, 65536),
        spines=_int(rf.get("spines", 8), "fabric.spines", 1, 65536),
        oversubscription=_num(rf.get("oversubscription", 1.0), "fabric.oversubscription", 0.0, 1024.0),
    )
    if len(nodes) > 1 and any(n.nics == 0 for n in nodes):
        i = next(i for i, n in enumerate(nodes) if n.nics == 0)
        raise WorkbenchError(f"nodes[{raw_index[i]}].nics: a node of a multi-node cluster needs at least one NIC")
    return Cluster(name=name, nodes=tuple(nodes), fabric=fabric)


def _spec_key(k: Any, field: str) -> str:
    if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", k):
        raise WorkbenchError(f"{field}: a measured rate's name is a word like fp32_tflops, got {show(k)}")
    return k


def _keys(keys: Any) -> str:
    """Unknown keys for a message: sorted, each shortened, at most five."""
    names = sorted(show(k, 40) for k in keys)
    return "[" + ", ".join(names[:5]) + (f", … {len(names) - 5} more" if len(names) > 5 else "") + "]"


def dumps(c: Cluster, fmt: str = "yaml") -> str:
    if fmt == "json":
        return json.dumps(to_dict(c), indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(to_dict(c), sort_keys=False)
    raise WorkbenchError(f"format: unknown {fmt!r} (allowed: yaml, json)")


def loads(text: str) -> Cluster:
    """A cluster from YAML or JSON text (bounded size, depth and aliases: `workbench.io`)."""
    return from_dict(parse_structured(text, "cluster file"))


def dump(c: Cluster, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(dumps(c, "json" if path.suffix == ".json" else "yaml"))
    return path


def load(path: str | Path) -> Cluster:
    path = check_path(path, "cluster")
    if not path.exists():
        raise WorkbenchError(f"cluster: no such file {show(str(path), 200)} "
                             "(give a preset like aws-p5:nodes=2 or a YAML/JSON file)")
    return loads(read_text(path, "cluster file"))
