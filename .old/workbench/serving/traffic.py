"""`Traffic`: what clients send a server — closed loop, open loop or a trace — and the requests it makes.

Spec strings (parsed once, here):
  `concurrency=16,isl=1024,osl=1024,requests=320`                  closed loop (`vllm bench serve --max-concurrency`)
  `rate=4,burstiness=1,dataset=conversation,requests=1000,seed=0`   open loop, gamma inter-arrivals (1 = Poisson)
  `rate=inf,isl=1000,osl=1000,requests=500`                         every request at t=0 (max-throughput tables)
  `trace=FILE`                                                       JSONL/CSV rows: timestamp, input_length, output_length

Lengths are fixed (`isl`, `osl`) or drawn from a public trace's distribution (`dataset=conversation|code`,
`datasets/traffic/lengths.csv`: log-normal through the trace's median and p90, clipped at 1.5 × p99);
`scale` shrinks them for small models, `max_isl`/`max_osl`/`min_isl` bound them; `prefix=N` makes
every prompt start with the same N tokens (a shared system prompt, for prefix caching).
The key names and the length draw match `workbench.serve.traffic`, so the simulator and the real
traffic benchmark draw the same requests from the same spec and seed.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.options import parse_options
from workbench.validate import number, show, text, whole

_INT = ("concurrency", "requests", "isl", "osl", "seed", "max_isl", "max_osl", "min_isl", "max_concurrency", "prefix")
_FLOAT = ("rate", "burstiness", "scale")
_TEXT = ("dataset", "trace")
KEYS = _INT + _FLOAT + _TEXT
MAX_REQUESTS = 10_000_000


@dataclass(frozen=True)
class Requests:
    """The requests of a traffic, as arrays (one entry per request, in issue order)."""

    arrival: np.ndarray  # seconds from the start (closed loop: 0 for the first `concurrency`, see `closed`)
    isl: np.ndarray
    osl: np.ndarray
    closed: int  # closed-loop concurrency (0 = open loop / trace: arrivals are given)
    prefix: int = 0

    def __len__(self) -> int:
        return len(self.isl)


@dataclass(frozen=True)
class Traffic:
    """A traffic: closed loop at `concurrency`, open loop at `rate` req/s (gamma `burstiness`), or a `trace`."""

    concurrency: int = 0
    rate: float = 0.0
    burstiness: float = 1.0
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
    prefix: int = 0

    def __post_init__(self) -> None:
        for k in _INT:
            whole(getattr(self, k), f"traffic.{k}", 0, MAX_REQUESTS if k != "seed" else 2**32 - 1)
        if isinstance(self.rate, str) or not (self.rate == math.inf or (isinstance(self.rate, (int, float))
                                                                         and not isinstance(self.rate, bool)
                                                                         and math.isfinite(self.rate)
                                                                         and self.rate >= 0)):
            raise WorkbenchError(f"traffic.rate: expected requests per second >= 0 (or inf), got {show(self.rate)}; "
                                 "e.g. rate=4")
        number(self.burstiness, "traffic.burstiness", 0.0, 1e6)
        number(self.scale, "traffic.scale", 0.0, 1e3)
        if self.trace is None and not self.concurrency and not self.rate:
            raise WorkbenchError("traffic: give concurrency=N (closed loop), rate=R (open loop) or trace=FILE")
        if self.concurrency and self.rate:
            raise WorkbenchError("traffic.rate: concurrency and rate exclude each other (use max_concurrency with rate)")
        if self.requests < 1:
            raise WorkbenchError(f"traffic.requests: expected at least 1 request, got {self.requests}")
        if self.dataset not in ("random", *profiles()):
            raise WorkbenchError(f"traffic.dataset: {show(self.dataset)} is not one of random, {', '.join(profiles())}")
        if self.dataset == "random" and self.trace is None and (self.isl < 1 or self.osl < 1):
            raise WorkbenchError("traffic.isl: dataset=random needs isl=N and osl=N (or choose dataset=conversation)")
        if self.trace is not None and not Path(self.trace).is_file():
            raise WorkbenchError(f"traffic.trace: file {show(self.trace)} not found")

    # ------------------------------------------------------------ the edge
    @classmethod
    def parse(cls, spec: Any) -> Traffic:
        """A Traffic from a spec string, a mapping, or a Traffic."""
        if isinstance(spec, Traffic):
            return spec
        if isinstance(spec, dict):
            raw = {str(k): v for k, v in spec.items() if k != "spec"}
            if "spec" in spec:
                return cls.parse(spec["spec"])
        else:
            raw = parse_options(str(spec), "traffic", "concurrency=16,isl=1024,osl=1024,requests=320")
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            if k not in KEYS:
                raise WorkbenchError(f"traffic: unknown key {show(k, 40)} (known: {', '.join(KEYS)})")
            if k in _INT:
                kw[k] = whole(v, f"traffic.{k}", 0, MAX_REQUESTS if k != "seed" else 2**32 - 1)
            elif k == "rate":
                kw[k] = math.inf if str(v).strip().lower() == "inf" else number(v, "traffic.rate", 0.0, 1e9,
                                                                                 lo_open=False)
            elif k in _FLOAT:
                kw[k] = number(v, f"traffic.{k}", 0.0, 1e6)
            else:
                kw[k] = text(v, f"traffic.{k}", 4096)
        return cls(**kw)

    @property
    def mode(self) -> str:
        return "trace" if self.trace else "closed" if self.concurrency else "open"

    def spec(self) -> str:
        base = {f.name: f.default for f in fields(self)}
        return ",".join(f"{k}={v}" for k, v in asdict(self).items() if v != base[k] and v is not None)

    def __str__(self) -> str:
        return self.spec()

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec()}

    def with_requests(self, n: int) -> Traffic:
        from dataclasses import replace

        return replace(self, requests=n)

    # ------------------------------------------------------------ the requests
    def draw(self) -> Requests:
        """The requests: arrival times, input and output lengths (seeded: the same spec gives the same requests)."""
        rng = np.random.default_rng(self.seed)
        if self.trace:
            arr, isl, osl = _read_trace(Path(self.trace), self.requests)
            return Requests(arr, isl, osl, 0, self.prefix)
        n = self.requests
        isl = self._lengths(rng, "prompt", self.isl, n, self.max_isl, self.min_isl)
        osl = self._lengths(rng, "output", self.osl, n, self.max_osl, 1)
        if self.prefix:
            isl = np.maximum(isl, self.prefix + 1)
        if self.mode == "open" and math.isfinite(self.rate):
            gaps = rng.gamma(self.burstiness, 1.0 / (self.rate * self.burstiness), n)
            arrivals = np.cumsum(gaps) - gaps[0]
        else:
            arrivals = np.zeros(n)
        closed = self.concurrency or (self.max_concurrency if self.mode == "open" and not math.isfinite(self.rate)
                                      else 0)
        return Requests(arrivals.astype(float), isl.astype(np.int64), osl.astype(np.int64), int(closed), self.prefix)

    def plan(self) -> list[dict[str, float]]:
        """The requests as rows (arrival, input_len, output_len), as `workbench.serve.traffic` gives them."""
        r = self.draw()
        return [{"arrival": float(a), "input_len": int(i), "output_len": int(o)}
                for a, i, o in zip(r.arrival, r.isl, r.osl)]

    def _lengths(self, rng: Any, which: str, fixed: int, n: int, cap: int, floor: int) -> np.ndarray:
        if fixed:
            return np.full(n, fixed, dtype=np.int64)
        row = profiles()[self.dataset][which]
        mu = math.log(row["median"] * self.scale)
        sigma = max(1e-6, (math.log(row["p90"] * self.scale) - mu) / 1.2815515655446004)
        x = np.rint(rng.lognormal(mu, sigma, n)).astype(np.int64)
        hi = cap or int(row["p99"] * self.scale * 1.5) or 1
        return np.clip(x, floor, max(floor, hi))


@cache
def profiles() -> dict[str, dict[str, dict[str, float]]]:
    """Length statistics per dataset and side (prompt/output), from `datasets/traffic/lengths.csv`."""
    from workbench.data import dataset_path

    out: dict[str, dict[str, dict[str, float]]] = {}
    with open(dataset_path("traffic/lengths.csv")) as f:
        for r in csv.DictReader(f):
            out.setdefault(r["dataset"], {})[r["which"]] = {k: float(r[k]) for k in ("mean", "median", "p90", "p99")}
    return out


def _read_trace(path: Path, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if path.stat().st_size > 1 << 30:
        raise WorkbenchError(f"traffic.trace: {path} is larger than 1 GiB")
    rows: list[dict[str, Any]]
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise WorkbenchError(f"traffic.trace: {path} line {i + 1} is not JSON ({exc.msg})") from None
    else:
        with open(path) as f:
            rows = list(csv.DictReader(f))
    arr, isl, osl = [], [], []
    for i, r in enumerate(rows[:limit]):
        if not isinstance(r, dict):
            raise WorkbenchError(f"traffic.trace: {path} row {i + 1} is not an object")
        ts = r.get("timestamp", r.get("TIMESTAMP", r.get("arrival")))
        a = r.get("input_length", r.get("ContextTokens"))
        b = r.get("output_length", r.get("GeneratedTokens"))
        if ts is None or a is None or b is None:
            raise WorkbenchError(f"traffic.trace: {path} row {i + 1} needs timestamp, input_length and output_length "
                                 f"(or Azure's TIMESTAMP, ContextTokens, GeneratedTokens); got {sorted(r)}")
        arr.append(_seconds(ts, i))
        isl.append(whole(a, f"traffic.trace row {i + 1} input_length", 1, 1 << 24))
        osl.append(max(1, whole(b, f"traffic.trace row {i + 1} output_length", 0, 1 << 24)))
    if not arr:
        raise WorkbenchError(f"traffic.trace: {path} holds no requests")
    t = np.asarray(arr, float)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return t, np.asarray(isl, np.int64)[order], np.asarray(osl, np.int64)[order]


def _seconds(v: Any, i: int) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        import pandas as pd

        try:
            return float(pd.Timestamp(v).timestamp())
        except (ValueError, TypeError):
            raise WorkbenchError(f"traffic.trace: row {i + 1} timestamp {show(v)} is neither seconds nor a date") from None
    if not math.isfinite(x):
        raise WorkbenchError(f"traffic.trace: row {i + 1} timestamp {show(v)} is not finite")
    return x
