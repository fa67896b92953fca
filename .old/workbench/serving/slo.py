"""`SLO`: latency targets in milliseconds (DistServe's goodput: a request counts if it meets every one)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from workbench.errors import WorkbenchError
from workbench.options import parse_options
from workbench.validate import number, show

SLO_KEYS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class SLO:
    """Targets in ms; 0 = no target on that latency."""

    ttft: float = 0.0
    tpot: float = 0.0
    itl: float = 0.0
    e2el: float = 0.0

    def __post_init__(self) -> None:
        for k in SLO_KEYS:
            v = getattr(self, k)
            if v:
                number(v, f"slo.{k}", 0.0, 1e9)

    @classmethod
    def parse(cls, spec: Any) -> SLO:
        """`ttft=200,tpot=50` (ms), a mapping, an SLO, or None (no targets)."""
        if isinstance(spec, SLO):
            return spec
        if spec is None or spec == "":
            return cls()
        raw = dict(spec) if isinstance(spec, dict) else parse_options(str(spec), "slo", "ttft=200,tpot=50")
        kw = {}
        for k, v in raw.items():
            if k not in SLO_KEYS:
                raise WorkbenchError(f"slo: unknown key {show(k, 40)} (use {', '.join(SLO_KEYS)}, values in ms)")
            kw[k] = number(v, f"slo.{k}", 0.0, 1e9)
        return cls(**kw)

    @property
    def any(self) -> bool:
        return any(getattr(self, k) for k in SLO_KEYS)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v}

    def __str__(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.to_dict().items())
