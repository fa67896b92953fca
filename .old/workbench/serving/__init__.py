"""The serving workload: `Traffic` (what clients send), `ServingPlan` (how the model is served), `SLO`
(latency targets) and `Serving` (the Job workload that ties traffic, SLO and seed together).

`Job.create(cluster, model, plan="tp=8", workload=Serving(traffic="rate=4,dataset=conversation"))`
then `workbench.simulate(job)` runs the serving simulator (`workbench.sim.serve`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from workbench.core.job import register_workload
from workbench.errors import WorkbenchError
from workbench.serving.plan import ServingPlan
from workbench.serving.slo import SLO
from workbench.serving.traffic import Requests, Traffic


@register_workload
@dataclass(frozen=True)
class Serving:
    """Serve `traffic` (a Traffic or its spec) against `slo` (an SLO or "ttft=200,tpot=50")."""

    kind: ClassVar[str] = "serving"
    traffic: Any = field(default="concurrency=16,isl=1024,osl=256,requests=256")
    slo: Any = field(default=None)
    seed: int | None = None

    def __post_init__(self) -> None:
        t = Traffic.parse(self.traffic)
        if self.seed is not None:
            if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
                raise WorkbenchError(f"workload.seed: expected a whole number in 0..2^32-1, got {self.seed!r}")
            from dataclasses import replace

            t = replace(t, seed=self.seed)
        object.__setattr__(self, "traffic", t)
        object.__setattr__(self, "slo", SLO.parse(self.slo))

    @staticmethod
    def parse_plan(spec: Any) -> ServingPlan:
        return ServingPlan.parse(spec)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "traffic": self.traffic.spec(), "slo": str(self.slo), "seed": self.seed}

    @classmethod
    def from_dict(cls, d: Any) -> Serving:
        bad = sorted(set(d) - {"kind", "traffic", "slo", "seed"})
        if bad:
            raise WorkbenchError(f"workload: unknown field(s) {', '.join(map(repr, bad))} (known: traffic, slo, seed)")
        return cls(traffic=d.get("traffic", Serving.traffic), slo=d.get("slo") or None, seed=d.get("seed"))


__all__ = ["SLO", "Requests", "Serving", "ServingPlan", "Traffic"]
