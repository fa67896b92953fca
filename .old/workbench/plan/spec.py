"""`Plan`: how a training job is sharded — parsing "tp=8,pp=64,dp=6,gbs=3072,recompute=full" and checks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench.options import parse_options
from workbench.validate import boolean, show, text, whole

RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp16", "fp8", "fp32")
INT_FIELDS = ("tp", "pp", "dp", "ep", "cp", "vpp", "zero", "mbs", "gbs")
ALIASES = {"v": "vpp", "interleave": "vpp", "micro_batch": "mbs", "global_batch": "gbs", "recomp": "recompute",
           "dtype": "precision", "fsdp": "zero", "sequence_parallel": "sp"}
RANGES = {"tp": (1, 2**20), "pp": (1, 2**20), "dp": (1, 2**20), "ep": (1, 2**20), "cp": (1, 2**20), "vpp": (1, 1024),
          "zero": (0, 3), "mbs": (1, 2**20), "gbs": (1, 2**30)}
"""Each whole-number field's allowed range."""


@dataclass(frozen=True)
class Plan:
    """A (possibly partial) parallel plan; `None` fields are chosen by the simulator and reported back.

    tp, pp, dp, ep (experts sharded over ep of the dp ranks), cp (context parallel), sp (sequence
    parallelism with TP), vpp (interleaved 1F1B chunks per stage), zero (0-3; 3 = FSDP), recompute
    (none | selective | full), mbs (micro-batch), gbs (global batch in sequences), precision
    (bf16 | fp16 | fp8 compute with fp32 master weights, or fp32), offload (activations to host memory),
    stack (the software stack: a preset of `datasets/software_stacks.yaml`, e.g. megatron-2021).
    """

    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    ep: int | None = None
    cp: int | None = None
    sp: bool | None = None
    vpp: int | None = None
    zero: int | None = None
    recompute: str | None = None
    mbs: int | None = None
    gbs: int | None = None
    precision: str | None = None
    offload: bool | None = None
    stack: str | None = None  # software stack preset (datasets/software_stacks.yaml); None = "modern"

    def __post_init__(self) -> None:
        for f in INT_FIELDS:
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise WorkbenchError(f"plan.{f}: expected a whole number, got {show(v)}")
            if v is not None and f == "zero" and not 0 <= v <= 3:
                raise WorkbenchError(f"plan.zero: ZeRO stages are 0-3 (3 = FSDP), got {show(v)}")
            if v is not None:
                whole(v, f"plan.{f}", *RANGES[f])
        for f in ("sp", "offload"):
            if getattr(self, f) is not None and not isinstance(getattr(self, f), bool):
                raise WorkbenchError(f"plan.{f}: expected true or false, got {show(getattr(self, f))}")
        if self.recompute is not None and (not isinstance(self.recompute, str) or self.recompute not in RECOMPUTE):
            raise WorkbenchError(f"plan.recompute: {show(self.recompute)} is not one of {', '.join(RECOMPUTE)}")
        if self.precision is not None and (not isinstance(self.precision, str) or self.precision not in PRECISIONS):
            raise WorkbenchError(f"plan.precision: {show(self.precision)} is not one of {', '.join(PRECISIONS)}")

    @property
    def missing(self) -> list[str]:
        """Fields still to choose (`stack` is never chosen: None means the default software stack)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is None and f.name != "stack"]

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def world(self) -> int:
        return int(self.tp or 1) * int(self.pp or 1) * int(self.dp or 1) * int(self.cp or 1)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per pipeline per step (gbs / (dp · mbs))."""
        return int(self.gbs or 0) // (int(self.dp or 1) * int(self.mbs or 1))

    def with_defaults(self, **values: Any) -> Plan:
        """Fill only the fields that are still `None`."""
        return replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        from workbench.display import AUTO, repr_mimebundle

        rows = [(k, None if v is None else _fmt(v)) for k, v in asdict(self).items()]
        return repr_mimebundle("Plan", rows, f"Plan({self})", none=AUTO)

    def __str__(self) -> str:
        return ",".join(f"{k}={_fmt(v)}" for k, v in asdict(self).items() if v is not None)


def _fmt(v: Any) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def parse_plan(text: str | dict[str, Any] | Plan) -> Plan:
    """A `Plan` from "tp=8,pp=64,dp=6,gbs=3072,recompute=full" (or a dict); unknown keys are errors."""
    if isinstance(text, Plan):
        return text
    items: dict[str, Any]
    if isinstance(text, Mapping):
        items = dict(text)
    elif isinstance(text, str):
        items = dict(parse_options(text, "plan", "tp=8", flags={"fsdp": "3", "offload": "1", "sp": "1"}))
    else:
        raise WorkbenchError(f"plan: expected a spec like tp=8,pp=2,dp=4 or a mapping, got {show(text)}")
    known = {f.name for f in fields(Plan)}
    out: dict[str, Any] = {}
    for k, v in items.items():
        if not isinstance(k, str):
            raise WorkbenchError(f"plan: field names are text, got {show(k)}")
        key = ALIASES.get(k, k)
        if key not in known:
            where = f"plan.{k}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,39}", k) else f"plan: {show(k, 40)}"
            raise WorkbenchError(f"{where}: unknown field (known: {', '.join(sorted(known))})")
        if key in out:
            raise WorkbenchError(f"plan.{key}: given twice (as {k} and another name); give it once")
        value: Any = v
        if k == "fsdp" and v is not None:
            value = 3 if str(v).strip() == "3" else 3 * int(boolean(v, "plan.fsdp"))
        out[key] = _convert(key, value)
    return Plan(**out)


def _convert(key: str, v: Any) -> Any:
    if v is None or (isinstance(v, str) and v.lower() in ("auto", "?", "")):
        return None
    if key in INT_FIELDS:
        return whole(v, f"plan.{key}", *RANGES[key])
    if key in ("sp", "offload"):
        return boolean(v, f"plan.{key}")
    return text(v, f"plan.{key}", 64)
