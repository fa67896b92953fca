"""`Placement`: where a model's layers live on a (mixed) cluster, for serving or training.

A placement is one or more *replicas* (independent pipelines that share the request stream by
routing `weight`); each replica is a list of *stages* in pipeline order. A stage holds a
contiguous block of layers `[first, last]` (inclusive) on a TP group of `devices` (one node),
the weight and KV precision of its layers (per layer when they differ), and what it keeps off
the GPU (`Offload`: weights/KV/activations in host memory or on NVMe, brought back one layer
ahead of use). Stages are numbered globally in placement order (replica 0's stages first);
validation errors name the stage (and replica) and the device.

The planner (`workbench.plan.place`) writes placements; the serving simulator, the real server
and the converter (`workbench.convert`) read them. YAML/JSON round trip: `to_dict`/`from_dict`,
`dumps`/`loads`, `save`/`load`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8", "fp4")
KV_PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "int8")
TIERS = ("host", "nvme")
FETCH = ("layer-ahead", "on-demand")  # when offloaded bytes are brought back to the GPU


@cache
def precision_table() -> dict[str, dict[str, Any]]:
    """`datasets/precisions.csv` as {precision: {bytes, compute, archs: set, source}}."""
    from workbench.data import read_csv

    out: dict[str, dict[str, Any]] = {}
    for r in read_csv("precisions.csv").to_dict("records"):
        out[str(r["precision"])] = {"bytes": float(r["bytes"]), "compute": str(r["compute"]),
                                    "archs": frozenset(str(r["archs"]).split("|")), "source": str(r["source"])}
    return out


@cache
def gpu_arch(model: str) -> str:
    """The architecture column of `datasets/gpus.csv` for a GPU model ('CPU' for CPU ranks)."""
    from workbench.data import read_csv

    if model == "CPU":
        return "CPU"
    df = read_csv("gpus.csv")
    hit = df[df["model"] == model]
    if hit.empty:
        raise WorkbenchError(f"gpu: unknown GPU model {model!r} (known: {', '.join(df['model'])})")
    return str(hit.iloc[0]["arch"])


@cache
def supported_precisions(model: str) -> tuple[str, ...]:
    """Formats the GPU model supports in hardware (CPU ranks: fp32 and bf16/fp16 storage)."""
    arch = gpu_arch(model)
    if arch == "CPU":
        return ("fp32", "bf16", "fp16", "int8", "fp8")
    return tuple(p for p, row in precision_table().items() if arch in row["archs"])


def bytes_per_element(precision: str) -> float:
    if precision not in precision_table():
        raise WorkbenchError(f"precision: unknown {precision!r} (known: {', '.join(precision_table())})")
    return float(precision_table()[precision]["bytes"])


def _frac(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise WorkbenchError(f"{where}: expected a fraction in [0, 1], got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Offload:
    """What a stage keeps off its GPUs: fractions of its weights, KV cache and (training)
    activations, held in `tier` (host memory or NVMe) and brought back `fetch` (layer-ahead:
    the next layer's share is copied in while the current layer computes, then dropped)."""

    weights: float = 0.0
    kv: float = 0.0
    activations: float = 0.0
    tier: str = "host"
    fetch: str = "layer-ahead"

    def __post_init__(self) -> None:
        for f in ("weights", "kv", "activations"):
            object.__setattr__(self, f, _frac(getattr(self, f), f"offload.{f}"))
        if self.tier not in TIERS:
            raise WorkbenchError(f"offload.tier: {self.tier!r} is not one of {', '.join(TIERS)}")
        if self.fetch not in FETCH:
            raise WorkbenchError(f"offload.fetch: {self.fetch!r} is not one of {', '.join(FETCH)}")

    @property
    def any(self) -> bool:
        return bool(self.weights or self.kv or self.activations)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "kv": self.kv, "activations": self.activations, "tier": self.tier,
                "fetch": self.fetch}


NO_OFFLOAD = Offload()


@dataclass(frozen=True)
class Stage:
    """Layers `[first, last]` on the TP group `devices`; `precision`/`kv_precision` for every layer
    unless `layer_precisions` (one weight format per layer of the stage) says otherwise."""

    devices: tuple[str, ...]
    layers: tuple[int, int]
    precision: str = "bf16"
    kv_precision: str = "bf16"
    layer_precisions: tuple[str, ...] = ()
    offload: Offload = NO_OFFLOAD

    @property
    def tp(self) -> int:
        return len(self.devices)

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def last(self) -> int:
        return self.layers[1]

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0] + 1

    def layer_precision(self, layer: int) -> str:
        """Weight format of global layer index `layer` (which must be in this stage)."""
        if not self.first <= layer <= self.last:
            raise WorkbenchError(f"layer: {layer} is not in this stage ({self.first}..{self.last})")
        return self.layer_precisions[layer - self.first] if self.layer_precisions else self.precision

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"devices": list(self.devices), "layers": [self.first, self.last], "tp": self.tp,
                             "precision": self.precision, "kv_precision": self.kv_precision}
        if self.layer_precisions:
            d["layer_precisions"] = list(self.layer_precisions)
        if self.offload.any:
            d["offload"] = self.offload.to_dict()
        return d


@dataclass(frozen=True)
class Replica:
    """One pipeline: `stages` in order; `weight` = its share of the requests (normalised over replicas)."""

    stages: tuple[Stage, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class StageRef:
    """A stage with its global index and replica, as `Placement.stages` lists them."""

    index: int
    replica: int
    stage: Stage


@dataclass(frozen=True)
class Placement:
    """Replicas of stages covering `num_layers` layers of `model`; `cluster` optionally carries the
    cluster spec (a mapping as `workbench topology` writes it, or a preset string) so a file can be
    checked on its own."""

    model: str
    num_layers: int
    replicas: tuple[Replica, ...]
    cluster: Any = field(default=None, compare=False)
    notes: str = ""

    def __post_init__(self) -> None:
        self.check_structure()

    # ------------------------------------------------------------------ views
    @property
    def stages(self) -> list[StageRef]:
        out, k = [], 0
        for r, rep in enumerate(self.replicas):
            for st in rep.stages:
                out.append(StageRef(k, r, st))
                k += 1
        return out

    def stage(self, index: int) -> Stage:
        refs = self.stages
        if not 0 <= index < len(refs):
            raise WorkbenchError(f"stage: {index} is out of range (this placement has stages 0..{len(refs) - 1})")
        return refs[index].stage

    @property
    def devices(self) -> list[str]:
        return [d for ref in self.stages for d in ref.stage.devices]

    @property
    def routing(self) -> list[float]:
        tot = sum(r.weight for r in self.replicas)
        return [r.weight / tot for r in self.replicas]

    def __iter__(self) -> Iterator[StageRef]:
        return iter(self.stages)

    # ------------------------------------------------------------------ validation
    def check_structure(self) -> None:
        """Layers contiguous per replica, devices used once, known formats, routing weights valid."""
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise WorkbenchError(f"placement.num_layers: expected a positive whole number, got {self.num_layers!r}")
        if not self.replicas:
            raise WorkbenchError("placement.replicas: needs at least one replica with stages")
        seen: dict[str, int] = {}
        for ref in self.stages:
            st, k = ref.stage, ref.index
            where = f"stage {k} (replica {ref.replica})"
            if not st.devices:
                raise WorkbenchError(f"{where}.devices: a stage needs at least one device")
            for d in st.devices:
                if d in seen:
                    raise WorkbenchError(f"{where}.devices: {d} is already used by stage {seen[d]}; each device "
                                         "holds one stage")
                seen[d] = k
            if st.precision not in PRECISIONS:
                raise WorkbenchError(f"{where}.precision: {st.precision!r} is not one of {', '.join(PRECISIONS)}")
            if st.kv_precision not in KV_PRECISIONS:
                raise WorkbenchError(
                    f"{where}.kv_precision: {st.kv_precision!r} is not one of {', '.join(KV_PRECISIONS)}")
            if st.layer_precisions:
                if len(st.layer_precisions) != st.num_layers:
                    raise WorkbenchError(f"{where}.layer_precisions: {len(st.layer_precisions)} entries for "
                                         f"{st.num_layers} layers; give one format per layer")
                bad = [p for p in st.layer_precisions if p not in PRECISIONS]
                if bad:
                    raise WorkbenchError(f"{where}.layer_precisions: {bad[0]!r} is not one of {', '.join(PRECISIONS)}")
        for r, rep in enumerate(self.replicas):
            if not rep.stages:
                raise WorkbenchError(f"replica {r}.stages: a replica needs at least one stage")
            if isinstance(rep.weight, bool) or not isinstance(rep.weight, (int, float)) or rep.weight < 0:
                raise WorkbenchError(f"replica {r}.weight: expected a routing weight >= 0, got {rep.weight!r}")
            nxt = 0
            for ref in [s for s in self.stages if s.replica == r]:
                a, b = ref.stage.layers
                if a != nxt or b < a:
                    why = (f"starts at {a} but the previous stage ended at {nxt - 1}" if a != nxt
                           else f"ends at {b} before it starts")
                    raise WorkbenchError(f"stage {ref.index} (replica {r}).layers: [{a}, {b}] {why}; layers of a "
                                         "replica must be contiguous from 0")
                nxt = b + 1
            if nxt != self.num_layers:
                raise WorkbenchError(f"replica {r}: its stages cover layers 0..{nxt - 1} but the model has "
                                     f"{self.num_layers} layers (0..{self.num_layers - 1})")
        if sum(r.weight for r in self.replicas) <= 0:
            raise WorkbenchError("placement.replicas: routing weights sum to 0; give at least one replica weight > 0")

    def validate(self, cluster: Any = None) -> None:
        """Check against a cluster (this placement's own `cluster` when not given): every device exists,
        TP groups stay inside one node, and each stage's formats are supported by its GPUs."""
        from workbench.topology.presets import load_cluster
        from workbench.topology.spec import from_dict

        c = cluster if cluster is not None else self.cluster
        if c is None:
            return
        if isinstance(c, Mapping):
            c = from_dict(dict(c))
        c = load_cluster(c)
        have = set(c.gpus)
        for ref in self.stages:
            st, where = ref.stage, f"stage {ref.index} (replica {ref.replica})"
            for d in st.devices:
                if d not in have:
                    raise WorkbenchError(f"{where}.devices: {d} is not a GPU of cluster {c.name!r} "
                                         f"(it has {c.gpus[0]}..{c.gpus[-1]}, {len(have)} GPUs)")
            nodes = sorted({c.node_of(d) for d in st.devices})
            if len(nodes) > 1:
                raise WorkbenchError(f"{where}.devices: the TP group spans nodes {', '.join(f'n{n}' for n in nodes)}; "
                                     "TP must stay inside one node (an all-reduce per layer over the network)")
            for d in st.devices:
                model = c.nodes[c.node_of(d)].gpu
                ok = supported_precisions(model)
                for label, fmt in [("precision", st.precision), ("kv_precision", st.kv_precision),
                                   *[("layer_precisions", p) for p in st.layer_precisions]]:
                    if fmt not in ok:
                        raise WorkbenchError(f"{where}.{label}: device {d} ({model}) has no {fmt} support "
                                             f"(supported: {', '.join(ok)})")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"model": self.model, "num_layers": self.num_layers,
                             "replicas": [{"weight": r.weight, "stages": [s.to_dict() for s in r.stages]}
                                          for r in self.replicas]}
        if self.cluster is not None:
            d["cluster"] = self.cluster
        if self.notes:
            d["notes"] = self.notes
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Placement:
        if not isinstance(d, Mapping):
            raise WorkbenchError(f"placement: expected a mapping with model, num_layers, replicas; got {type(d).__name__}")
        known = {"model", "num_layers", "replicas", "cluster", "notes", "stages"}
        bad = sorted(set(d) - known)
        if bad:
            raise WorkbenchError(f"placement: unknown field(s) {', '.join(map(repr, bad))} (known: {', '.join(sorted(known))})")
        reps = d.get("replicas")
        if reps is None and "stages" in d:  # a single pipeline written without replicas
            reps = [{"weight": 1.0, "stages": d["stages"]}]
        if not isinstance(reps, list) or not reps:
            raise WorkbenchError("placement.replicas: expected a non-empty list of {weight, stages}")
        replicas = []
        for r, rd in enumerate(reps):
            if not isinstance(rd, Mapping) or not isinstance(rd.get("stages"), list):
                raise WorkbenchError(f"replica {r}: expected a mapping with a 'stages' list")
            stages = tuple(_stage_from(sd, f"replica {r}.stages[{i}]") for i, sd in enumerate(rd["stages"]))
            replicas.append(Replica(stages, rd.get("weight", 1.0)))
        if "num_layers" not in d:
            raise WorkbenchError("placement.num_layers: missing (the model's layer count)")
        return cls(model=str(d.get("model", "model")), num_layers=d["num_layers"], replicas=tuple(replicas),
                   cluster=d.get("cluster"), notes=str(d.get("notes", "")))

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=1)
        if fmt != "yaml":
            raise WorkbenchError(f"format: unknown {fmt!r} (allowed: yaml, json)")
        import yaml

        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def loads(cls, text: str) -> Placement:
        from workbench.io import parse_structured

        return cls.from_dict(parse_structured(text, "placement"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.dumps("json" if path.suffix == ".json" else "yaml"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        from workbench.io import read_structured

        return cls.from_dict(read_structured(path, "placement"))

    # ------------------------------------------------------------------ display
    def table(self) -> list[dict[str, Any]]:
        return [{"stage": ref.index, "replica": ref.replica, "layers": f"{ref.stage.first}-{ref.stage.last}",
                 "tp": ref.stage.tp, "devices": ",".join(ref.stage.devices), "precision": ref.stage.precision,
                 "kv": ref.stage.kv_precision,
                 "offload": (f"{ref.stage.offload.weights:.0%} weights → {ref.stage.offload.tier}"
                             if ref.stage.offload.weights else "")} for ref in self.stages]

    def __repr__(self) -> str:
        n = len(self.stages)
        return (f"Placement({self.model!r}, {self.num_layers} layers, {len(self.replicas)} replica(s), {n} stage(s), "
                f"{len(self.devices)} devices)")

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        import html

        from workbench.display import STYLE

        rows = self.table()
        cols = list(rows[0]) if rows else []
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
        routing = ", ".join(f"{w:.2f}" for w in self.routing)
        html_out = (f"{STYLE}<div class='wb-repr'><div class='wb-title'>{html.escape(repr(self))}</div>"
                    f"<table><tr>{head}</tr>{body}</table>"
                    f"<div class='wb-muted'>routing over replicas: {html.escape(routing)}</div></div>")
        text = repr(self) + "\n" + "\n".join(
            f"  stage {r['stage']} (replica {r['replica']}): layers {r['layers']} on {r['devices']} tp={r['tp']} "
            f"{r['precision']}/{r['kv']} {r['offload']}".rstrip() for r in rows)
        return {"text/plain": text, "text/html": html_out}


def _stage_from(sd: Any, where: str) -> Stage:
    if not isinstance(sd, Mapping):
        raise WorkbenchError(f"{where}: expected a mapping with devices and layers")
    known = {f.name for f in fields(Stage)} | {"tp"}
    bad = sorted(set(sd) - known)
    if bad:
        raise WorkbenchError(f"{where}: unknown field(s) {', '.join(map(repr, bad))} (known: {', '.join(sorted(known))})")
    devs = sd.get("devices")
    if isinstance(devs, str):
        devs = [devs]
    if not isinstance(devs, list) or not all(isinstance(x, str) for x in devs):
        raise WorkbenchError(f"{where}.devices: expected a list of device names like n0.g0")
    lay = sd.get("layers")
    if (not isinstance(lay, (list, tuple)) or len(lay) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in lay)):
        raise WorkbenchError(f"{where}.layers: expected [first, last] (whole numbers, inclusive), got {lay!r}")
    if "tp" in sd and sd["tp"] != len(devs):
        raise WorkbenchError(f"{where}.tp: {sd['tp']!r} but {len(devs)} devices are listed; tp is the device count")
    off = sd.get("offload") or {}
    if not isinstance(off, Mapping):
        raise WorkbenchError(f"{where}.offload: expected a mapping (weights, kv, activations, tier, fetch)")
    okeys = {f.name for f in fields(Offload)}
    if set(off) - okeys:
        raise WorkbenchError(f"{where}.offload: unknown field(s) {sorted(set(off) - okeys)} (known: {', '.join(sorted(okeys))})")
    try:
        offload = Offload(**off)
    except WorkbenchError as exc:
        raise WorkbenchError(f"{where}.{exc}") from None
    lp = sd.get("layer_precisions") or ()
    return Stage(devices=tuple(devs), layers=(int(lay[0]), int(lay[1])), precision=str(sd.get("precision", "bf16")),
                 kv_precision=str(sd.get("kv_precision", "bf16")), layer_precisions=tuple(str(p) for p in lp),
                 offload=offload)
