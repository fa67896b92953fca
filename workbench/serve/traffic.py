"""Traffic specs for serving: closed loop, open loop (Poisson/gamma) or a trace, and the
requests they make (arrival time, prompt length, output length).

Spec strings (parsed once here):
  `concurrency=16,isl=1024,osl=1024,requests=320`            closed loop at a concurrency
  `rate=4,burstiness=1,dataset=conversation,requests=1000,seed=0`   open loop, gamma arrivals
  `trace=FILE` (CSV or JSONL: timestamp, input_length/ContextTokens, output_length/GeneratedTokens)

Lengths: fixed (`isl`, `osl`) or drawn from a dataset's distribution (`datasets/traffic/lengths.csv`:
the Azure 2023 trace statistics; a log-normal through its median and p90), optionally scaled
(`scale=0.05`) and capped (`max_isl`, `max_osl`) for small models.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

_KEYS = {"concurrency": int, "rate": float, "burstiness": float, "requests": int, "isl": int, "osl": int,
         "dataset": str, "seed": int, "trace": str, "scale": float, "max_isl": int, "max_osl": int,
         "min_isl": int, "max_concurrency": int}


@dataclass(frozen=True)
class Traffic:
    concurrency: int = 0
    rate: float = 0.0              # requests/s; inf = all at once
    burstiness: float = 1.0        # gamma shape of the inter-arrival times (1 = Poisson)
    requests: int = 100
    isl: int = 0
    osl: int = 0
    dataset: str = "random"
    seed: int = 0
    trace: str | None = None
    scale: float = 1.0
    max_isl: int = 0
    max_osl: int = 0
    min_isl: int = 4
    max_concurrency: int = 0

    @classmethod
    def parse(cls, spec: str | Traffic) -> Traffic:
        if isinstance(spec, Traffic):
            return spec
        kw: dict[str, Any] = {}
        for part in str(spec).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise WorkbenchError(f"traffic: {part!r} is not key=value (e.g. concurrency=16,isl=128,osl=64,requests=100)")
            k, v = (s.strip() for s in part.split("=", 1))
            if k not in _KEYS:
                raise WorkbenchError(f"traffic: unknown key {k!r} (known: {', '.join(_KEYS)})")
            try:
                kw[k] = _KEYS[k](v)
            except ValueError:
                raise WorkbenchError(f"traffic: {k}={v!r} is not a {_KEYS[k].__name__}") from None
        t = cls(**kw)
        t.check()
        return t

    def check(self) -> None:
        if self.trace is None and not self.concurrency and not self.rate:
            raise WorkbenchError("traffic: give concurrency=N (closed loop), rate=R (open loop) or trace=FILE")
        if self.concurrency and self.rate:
            raise WorkbenchError("traffic: concurrency and rate exclude each other (use max_concurrency with rate)")
        if self.requests < 1:
            raise WorkbenchError(f"traffic: requests must be ≥ 1, got {self.requests}")
        if self.burstiness <= 0:
            raise WorkbenchError(f"traffic: burstiness must be > 0, got {self.burstiness}")
        if self.dataset not in ("random", *_profiles()):
            raise WorkbenchError(f"traffic: dataset {self.dataset!r} unknown (random, {', '.join(_profiles())})")
        if self.dataset == "random" and self.trace is None and (self.isl < 1 or self.osl < 1):
            raise WorkbenchError("traffic: dataset=random needs isl=N and osl=N (or choose dataset=conversation)")
        if self.trace is not None and not Path(self.trace).is_file():
            raise WorkbenchError(f"traffic: trace file {self.trace!r} not found")

    @property
    def mode(self) -> str:
        return "trace" if self.trace else "closed" if self.concurrency else "open"

    def spec(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        base = Traffic()
        return ",".join(f"{k}={v}" for k, v in d.items() if v != getattr(base, k) and v is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec()}

    def plan(self) -> list[dict[str, float]]:
        """Requests in order: arrival (s from the start; 0 for closed loop), input and output lengths."""
        import numpy as np

        rng = np.random.default_rng(self.seed)
        if self.trace:
            return _read_trace(Path(self.trace), self.requests)
        n = self.requests
        isl = self._lengths(rng, "prompt", self.isl, n, self.max_isl, self.min_isl)
        osl = self._lengths(rng, "output", self.osl, n, self.max_osl, 1)
        if self.mode == "open" and math.isfinite(self.rate):
            gaps = rng.gamma(self.burstiness, 1.0 / (self.rate * self.burstiness), n)
            arrivals = np.cumsum(gaps) - gaps[0]
        else:
            arrivals = np.zeros(n)
        return [{"arrival": float(a), "input_len": int(i), "output_len": int(o)} for a, i, o in zip(arrivals, isl, osl)]

    def _lengths(self, rng: Any, which: str, fixed: int, n: int, cap: int, floor: int) -> Any:
        import numpy as np

        if fixed:
            return np.full(n, fixed)
        row = _profiles()[self.dataset][which]
        mu = math.log(row["median"] * self.scale)
        sigma = max(1e-6, (math.log(row["p90"] * self.scale) - mu) / 1.2815515655446004)
        x = np.rint(rng.lognormal(mu, sigma, n)).astype(int)
        hi = cap or int(row["p99"] * self.scale * 1.5) or 1
        return np.clip(x, floor, max(floor, hi))


def _profiles() -> dict[str, dict[str, dict[str, float]]]:
    from workbench.data import dataset_path

    out: dict[str, dict[str, dict[str, float]]] = {}
    with open(dataset_path("traffic/lengths.csv")) as f:
        for r in csv.DictReader(f):
            out.setdefault(r["dataset"], {})[r["which"]] = {k: float(r[k]) for k in ("mean", "median", "p90", "p99")}
    return out


def _read_trace(path: Path, limit: int) -> list[dict[str, float]]:
    rows: list[dict[str, Any]]
    if path.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with open(path) as f:
            rows = list(csv.DictReader(f))
    out = []
    t0 = None
    for r in rows[:limit]:
        ts = r.get("timestamp", r.get("TIMESTAMP", r.get("arrival")))
        isl = r.get("input_length", r.get("ContextTokens"))
        osl = r.get("output_length", r.get("GeneratedTokens"))
        if ts is None or isl is None or osl is None:
            raise WorkbenchError(f"traffic trace {path}: each row needs timestamp, input_length and output_length "
                                 f"(or Azure's TIMESTAMP, ContextTokens, GeneratedTokens); got {sorted(r)}")
        t = _seconds(ts)
        t0 = t if t0 is None else t0
        out.append({"arrival": t - t0, "input_len": int(isl), "output_len": max(1, int(osl))})
    return out


def _seconds(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        import pandas as pd

        return float(pd.Timestamp(v).timestamp())
