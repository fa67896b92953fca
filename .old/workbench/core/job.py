"""`Job`: the one description of what to simulate or run — cluster, model, plan and workload.

A Job is an immutable, serialisable value object. Strings (preset names, `key=value` specs,
file paths) are turned into objects once, here at the edge (`Job.create`), so every engine
receives typed objects. The workload says what kind of job it is (`training` now; `serving`
plugs in beside it through `register_workload`) and how that kind parses its plan.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from workbench.core.layout import RankLayout
from workbench.errors import WorkbenchError
from workbench.models.spec import ModelSpec
from workbench.plan.spec import Plan, parse_plan
from workbench.topology.model import Cluster


@runtime_checkable
class Workload(Protocol):
    """What a job does on its cluster: `kind` names it; `parse_plan` turns a plan spec into this
    kind's plan object; `to_dict`/`from_dict` round-trip it."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...


_WORKLOADS: dict[str, type] = {}
_BUILTIN = {"training": "workbench.core.job", "serving": "workbench.serving"}


def register_workload(cls: type) -> type:
    """Class decorator: make a workload kind known to `Job` (by its `kind`)."""
    _WORKLOADS[cls.kind] = cls  # type: ignore[attr-defined]
    return cls


def workload_type(kind: str) -> type:
    if kind not in _WORKLOADS and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    if kind not in _WORKLOADS:
        raise WorkbenchError(f"workload.kind: {kind!r} is not one of {', '.join(sorted(set(_BUILTIN) | set(_WORKLOADS)))}")
    return _WORKLOADS[kind]


BACKENDS = ("gloo", "nccl")
OPTIMIZERS = ("adamw", "sgd")
ENGINES = ("native", "megatron")


@register_workload
@dataclass(frozen=True)
class Training:
    """A training run: `steps` optimizer steps with `optimizer` at learning rate `lr`, ranks talking
    over `backend` (gloo on CPU ranks, nccl on GPUs); `telemetry` on, off or "ab" (alternate
    steps with and without recording, to measure its overhead); `seed` for data and weights.
    `engine`: "native" (torch's FSDP2 / DTensor TP / pipelining on a Llama-family model and a
    tokenised text corpus) or "megatron" (the hand-written GPT with every collective timed);
    `compile` (torch.compile per block), `corpus` (text files; None = the repo's docs),
    `checkpoint_dir` (torch.distributed.checkpoint save at the end, resume from it),
    `export_dir` (Hugging Face safetensors + config.json + tokenizer.json) are native-only."""

    kind: ClassVar[str] = "training"
    steps: int = 5
    backend: str = "gloo"
    optimizer: str = "adamw"
    lr: float = 1e-3
    seed: int = 0
    telemetry: bool | str = True
    engine: str = "native"
    compile: bool = False
    corpus: str | None = None
    checkpoint_dir: str | None = None
    export_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= 1_000_000:
            raise WorkbenchError(f"workload.steps: expected a whole number in 1..1000000, got {self.steps!r}")
        if self.backend not in BACKENDS:
            raise WorkbenchError(f"workload.backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise WorkbenchError(f"workload.optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < float(lr) <= 10):
            raise WorkbenchError(f"workload.lr: expected a learning rate in (0, 10], got {lr!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise WorkbenchError(f"workload.seed: expected a whole number in 0..2^32-1, got {self.seed!r}")
        if self.telemetry not in (True, False, "ab"):
            raise WorkbenchError(f"workload.telemetry: expected true, false or 'ab', got {self.telemetry!r}")
        if self.engine not in ENGINES:
            raise WorkbenchError(f"workload.engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if not isinstance(self.compile, bool):
            raise WorkbenchError(f"workload.compile: expected true or false, got {self.compile!r}")
        for name in ("corpus", "checkpoint_dir", "export_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise WorkbenchError(f"workload.{name}: expected a path, got {v!r}")
            if v is not None and self.engine != "native":
                raise WorkbenchError(f"workload.{name}: only the native engine reads a corpus, checkpoints and "
                                     "exports (set engine='native')")
        if self.compile and self.engine != "native":
            raise WorkbenchError("workload.compile: only the native engine compiles (set engine='native')")

    @staticmethod
    def parse_plan(spec: Any) -> Plan:
        return parse_plan(spec if spec is not None else {})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Training:
        return cls(**_known(cls, d, "workload"))


def _known(cls: type, d: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    bad = sorted(set(d) - names - {"kind"})
    if bad:
        raise WorkbenchError(f"{where}: unknown field(s) {', '.join(map(repr, bad))} (known: {', '.join(sorted(names))})")
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class Job:
    """Cluster × model × plan × workload. Build one with `Job.create(...)` from strings or objects.

    `plan` is the workload's plan type (`Plan` for training); a training plan may be partial
    (`None` fields): `workbench.simulate` completes it with the plan search and reports it.
    """

    cluster: Cluster
    model: ModelSpec
    plan: Any = field(default_factory=Plan)
    workload: Any = field(default_factory=Training)

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, Cluster):
            raise WorkbenchError("job.cluster: expected a Cluster (use Job.create to parse a spec or file)")
        if not isinstance(self.model, ModelSpec):
            raise WorkbenchError("job.model: expected a ModelSpec (use Job.create to parse a spec or file)")
        if not isinstance(self.workload, Workload):
            raise WorkbenchError("job.workload: expected a workload object such as Training()")

    # ---------------------------------------------------------------- the edge
    @classmethod
    def create(cls, cluster: Any, model: Any, plan: Any = None, workload: Any = None, **workload_fields: Any) -> Job:
        """A Job from specs: `cluster` a preset spec/file/Cluster, `model` a preset/HF config/ModelSpec,
        `plan` a "k=v,…" spec/dict/plan object, `workload` a workload object, a kind name or a dict
        with `kind`; extra keywords are workload fields (e.g. `steps=3`)."""
        from workbench.models.presets import load_model
        from workbench.topology.presets import load_cluster

        wl = _workload(workload, workload_fields)
        return cls(load_cluster(cluster), load_model(model), type(wl).parse_plan(plan), wl)

    def with_plan(self, plan: Any) -> Job:
        return replace(self, plan=type(self.workload).parse_plan(plan))

    def with_cluster(self, cluster: Any) -> Job:
        from workbench.topology.presets import load_cluster

        return replace(self, cluster=load_cluster(cluster))

    def with_workload(self, **changes: Any) -> Job:
        return replace(self, workload=replace(self.workload, **changes))

    # ---------------------------------------------------------------- views
    @property
    def kind(self) -> str:
        return str(self.workload.kind)

    @property
    def layout(self) -> RankLayout:
        """The rank layout of this job's plan (tp→cp→dp→pp); unset degrees count as 1."""
        return RankLayout.of(self.plan)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        from workbench.topology.spec import to_dict as cluster_dict

        plan = self.plan.to_dict() if hasattr(self.plan, "to_dict") else asdict(self.plan)
        return {"kind": self.kind, "cluster": cluster_dict(self.cluster), "model": asdict(self.model),
                "plan": {k: v for k, v in plan.items() if v is not None}, "workload": self.workload.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> Job:
        from workbench.models.presets import load_model
        from workbench.topology.presets import load_cluster
        from workbench.topology.spec import from_dict as cluster_from

        if not isinstance(d, Mapping):
            raise WorkbenchError(f"job: expected a mapping with cluster, model, plan, workload; got {type(d).__name__}")
        bad = sorted(set(d) - {"kind", "cluster", "model", "plan", "workload"})
        if bad:
            raise WorkbenchError(f"job: unknown field(s) {', '.join(map(repr, bad))} (known: cluster, model, plan, workload)")
        for need in ("cluster", "model"):
            if need not in d:
                raise WorkbenchError(f"job.{need}: missing (give a preset name, a spec or a mapping)")
        wl_raw = d.get("workload") or {"kind": d.get("kind", "training")}
        wl = _workload(wl_raw, {})
        c = d["cluster"]
        cluster = cluster_from(c) if isinstance(c, Mapping) else load_cluster(c)
        m = d["model"]
        if isinstance(m, Mapping):
            try:
                model = ModelSpec(**m)
            except TypeError as exc:
                raise WorkbenchError(f"job.model: {exc}") from None
        else:
            model = load_model(m)
        return cls(cluster, model, type(wl).parse_plan(d.get("plan")), wl)

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=1, default=str)
        import yaml

        return str(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.dumps("json" if path.suffix == ".json" else "yaml"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Job:
        from workbench.io import read_structured

        return cls.from_dict(read_structured(path, "job"))

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        from workbench.display import repr_mimebundle

        rows = [("kind", self.kind), ("cluster", f"{self.cluster.name} ({self.cluster.num_gpus} GPUs)"),
                ("model", self.model.name), ("plan", str(self.plan) or "(chosen by the simulator)"),
                ("workload", ", ".join(f"{k}={v}" for k, v in self.workload.to_dict().items() if k != "kind"))]
        return repr_mimebundle("Job", rows, text=repr(self))

    def __repr__(self) -> str:
        return (f"Job({self.kind}: {self.model.name} on {self.cluster.name}, plan={str(self.plan) or 'auto'}, "
                f"{self.workload!r})")


def _workload(value: Any, extra: Mapping[str, Any]) -> Any:
    if value is None:
        value = "training"
    if isinstance(value, str):
        wl = workload_type(value)
        return _build(wl, dict(extra))
    if isinstance(value, Mapping):
        kind = str(value.get("kind", "training"))
        return _build(workload_type(kind), {k: v for k, v in value.items() if k != "kind"} | dict(extra))
    if isinstance(value, Workload):
        return replace(value, **extra) if extra else value  # type: ignore[type-var]
    raise WorkbenchError(f"job.workload: expected a workload object, a kind name or a mapping, got {type(value).__name__}")


def _build(cls: type, d: dict[str, Any]) -> Any:
    make: Callable[[Mapping[str, Any]], Any] | None = getattr(cls, "from_dict", None)
    return make(d) if make else cls(**_known(cls, d, "workload"))
