"""Software stacks: which kernels a training framework runs and what it overlaps (`plan.stack`).

A stack is a fact about software, not a tuned number: flash or unfused attention, fused or separate
elementwise kernels, data-parallel gradient reduction overlapped or not, TP communication overlap,
blocking or asynchronous pipeline sends, CP by ring or all-gather, 1F1B or DualPipe, fp8 MoE dispatch,
node-limited routing, fp32 parameters cast per micro-batch (autocast), Megatron's or FSDP2's sharded data
parallelism, the host's dispatch of each op (eager PyTorch, DTensor, compiled blocks: `train_host.py`). Presets live in `datasets/software_stacks.yaml`, each with its source; the
default is `modern` (today's Megatron-core / TransformerEngine).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cache
from typing import Any

from workbench.errors import WorkbenchError

DEFAULT_STACK = "modern"
ATTENTION = ("flash", "unfused")
ELEMENTWISE = ("fused", "megatron-2021", "eager")
CP_EXCHANGE = ("ring", "all_gather")
SCHEDULES = ("1f1b", "dualpipe")
PARAM_CAST = ("none", "autocast")
SHARDING = ("megatron", "fsdp2")
HOST = ("none", "eager", "compiled")


@dataclass(frozen=True)
class Stack:
    """One software stack (see `datasets/software_stacks.yaml` for what each field means)."""

    name: str
    attention: str = "flash"
    attention_efficiency_cap: float | None = None
    elementwise: str = "fused"
    dp_overlap: bool = True
    tp_overlap: bool = False
    tp_async_backward: bool = True
    sp_async_backward: bool = True
    p2p_overlap: bool = True
    p2p_scatter_gather: bool = True
    cp_exchange: str = "ring"
    schedule: str = "1f1b"
    dispatch_bytes: float | None = None
    node_limit: int = 0
    comm_sm_fraction: float | None = None
    expert_imbalance: float = 1.0
    param_cast: str = "none"
    sharding: str = "megatron"
    host: str = "none"
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for field, value, allowed in (("attention", self.attention, ATTENTION),
                                      ("elementwise", self.elementwise, ELEMENTWISE),
                                      ("cp_exchange", self.cp_exchange, CP_EXCHANGE),
                                      ("schedule", self.schedule, SCHEDULES),
                                      ("param_cast", self.param_cast, PARAM_CAST),
                                      ("sharding", self.sharding, SHARDING),
                                      ("host", self.host, HOST)):
            if value not in allowed:
                raise WorkbenchError(f"stack.{field}: {value!r} is not one of {', '.join(allowed)} "
                                     f"(stack {self.name!r} in datasets/software_stacks.yaml)")
        if self.expert_imbalance < 1.0:
            raise WorkbenchError(f"stack.expert_imbalance: must be at least 1 (busiest/mean), got {self.expert_imbalance}")
        if self.comm_sm_fraction is not None and not 0.0 <= self.comm_sm_fraction < 1.0:
            raise WorkbenchError(f"stack.comm_sm_fraction: must be in [0, 1), got {self.comm_sm_fraction}")


@cache
def _presets() -> dict[str, Stack]:
    from workbench.data import read_yaml

    raw = read_yaml("software_stacks.yaml")
    out = {}
    for name, d in raw.items():
        out[str(name)] = Stack(name=str(name), **{k: v for k, v in dict(d).items()})
    return out


def stack_names() -> tuple[str, ...]:
    return tuple(_presets())


@cache
def load_stack(name: str | None) -> Stack:
    """The named preset (None = the default, `modern`), optionally with fields changed after colons:
    `megatron-2021:attention=flash:dp_overlap=1`. An unknown name or field raises naming the known ones."""
    presets = _presets()
    text = DEFAULT_STACK if name in (None, "") else str(name)
    key, *changes = text.split(":")
    hit = presets.get(key)
    if hit is None:
        raise WorkbenchError(f"plan.stack: {key[:40]!r} is not a known software stack "
                             f"(known: {', '.join(presets)}; add one to datasets/software_stacks.yaml)")
    if not changes:
        return hit
    types = {f.name: f.type for f in fields(Stack) if f.name not in ("name", "description", "source")}
    values: dict[str, Any] = {}
    for ch in changes:
        field, eq, raw = ch.partition("=")
        if field not in types or not eq:
            raise WorkbenchError(f"plan.stack: {ch[:40]!r} is not field=value of a stack field "
                                 f"(fields: {', '.join(types)})")
        values[field] = _value(field, raw, str(types[field]))
    return replace(hit, name=text, **values)


def _value(field: str, raw: str, typ: str) -> Any:
    low = raw.strip().lower()
    if "bool" in typ:
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise WorkbenchError(f"plan.stack: {field} expects true/false, got {raw[:20]!r}")
        return low in ("1", "true", "yes", "on")
    if low in ("none", "null") and "None" in typ:
        return None
    if "float" in typ or "int" in typ:
        try:
            x = float(low)
        except ValueError:
            raise WorkbenchError(f"plan.stack: {field} expects a number, got {raw[:20]!r}") from None
        return int(x) if typ.startswith("int") else x
    return raw.strip()
