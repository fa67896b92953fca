"""`Plan`: how a training job is sharded — parsing "tp=8,pp=64,dp=6,gbs=3072,recompute=full" and checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench.options import parse_options

RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp16", "fp8", "fp32")
INT_FIELDS = ("tp", "pp", "dp", "ep", "cp", "vpp", "zero", "mbs", "gbs")
ALIASES = {"v": "vpp", "interleave": "vpp", "micro_batch": "mbs", "global_batch": "gbs", "recomp": "recompute",
           "dtype": "precision", "fsdp": "zero", "sequence_parallel": "sp"}


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
                raise WorkbenchError(f"plan.{f}: expected a whole number, got {v!r}")
            if v is not None and v < (0 if f == "zero" else 1):
                raise WorkbenchError(f"plan.{f}: must be at least {0 if f == 'zero' else 1}, got {v}")
        if self.zero is not None and self.zero > 3:
            raise WorkbenchError(f"plan.zero: ZeRO stages are 0-3 (3 = FSDP), got {self.zero}")
        if self.recompute is not None and self.recompute not in RECOMPUTE:
            raise WorkbenchError(f"plan.recompute: {self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise WorkbenchError(f"plan.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")

    @property
    def missing(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is None]

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
        import html

        cells = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape('(chosen by the simulator)' if v is None else _fmt(v))}</td></tr>"
            for k, v in asdict(self).items())
        return {"text/plain": f"Plan({self})", "text/html": f"<table class='wb-plan'>{cells}</table>"}

    def __str__(self) -> str:
        return ",".join(f"{k}={_fmt(v)}" for k, v in asdict(self).items() if v is not None)


def _fmt(v: Any) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def parse_plan(text: str | dict[str, Any] | Plan) -> Plan:
    """A `Plan` from "tp=8,pp=64,dp=6,gbs=3072,recompute=full" (or a dict); unknown keys are errors."""
    if isinstance(text, Plan):
        return text
    items: dict[str, Any]
    if isinstance(text, dict):
        items = dict(text)
    else:
        items = dict(parse_options(str(text), "plan", "tp=8", flags={"fsdp": "3", "offload": "1", "sp": "1"}))
    known = {f.name for f in fields(Plan)}
    out: dict[str, Any] = {}
    for k, v in items.items():
        key = ALIASES.get(k, k)
        if key not in known:
            raise WorkbenchError(f"plan.{k}: unknown field (known: {', '.join(sorted(known))})")
        value: Any = v
        if k == "fsdp":
            value = 3 if str(v).lower() in ("1", "true", "yes", "3") else 0
        out[key] = _convert(key, value)
    return Plan(**out)


def _convert(key: str, v: Any) -> Any:
    if v is None or (isinstance(v, str) and v.lower() in ("auto", "?", "")):
        return None
    if key in INT_FIELDS:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise WorkbenchError(f"plan.{key}: expected a whole number, got {v!r}") from None
        if not f.is_integer():
            raise WorkbenchError(f"plan.{key}: expected a whole number, got {v!r}")
        return int(f)
    if key in ("sp", "offload"):
        s = str(v).lower()
        if s not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise WorkbenchError(f"plan.{key}: expected true/false, got {v!r}")
        return s in ("1", "true", "yes", "on")
    return str(v)
