"""The one result schema shared by the simulator and the real runner.

A `Result` holds four things, so that every plot, comparison and export works on a
simulated and on a measured job alike:

- `events`: one row per compute span, collective, transfer or idle gap, with columns
  `EVENT_COLUMNS` (times in seconds from the job's start; `links` is a tuple of link ids).
- `memory`: bytes per rank and category over time, columns `MEMORY_COLUMNS`.
- `links`: link utilisation over time, columns `LINK_COLUMNS` (`GBps` is the mean rate
  carried over [start, end), `utilisation` that rate over the link's capacity).
- `metrics`: summary numbers (step time, busbw, …) as a plain dict.

`job` is the Job that produced it (plan completed). `source` says where the numbers came from (`sim` or `run`) and `fidelity` which engine
produced them (`closed-form`, `flow`, `measured`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

EVENT_KINDS = ("compute", "collective", "transfer", "idle")
EVENT_COLUMNS = ("rank", "device", "kind", "op", "bytes", "links", "start", "end")
MEMORY_COLUMNS = ("rank", "category", "bytes", "time")
LINK_COLUMNS = ("link", "start", "end", "GBps", "utilisation")


def _frame(rows: Iterable[Mapping[str, Any]] | pd.DataFrame | None, columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows.copy()
    if df.empty and len(df.columns) == 0:
        df = pd.DataFrame(columns=list(columns))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"result table lacks columns {missing} (schema: {list(columns)})")
    extra = [c for c in df.columns if c not in columns]
    return df[list(columns) + extra].reset_index(drop=True)


def events_frame(rows: Iterable[Mapping[str, Any]] | pd.DataFrame | None = None) -> pd.DataFrame:
    """An events table in the schema (extra columns such as `group` or `flow` are kept)."""
    df = _frame(rows, EVENT_COLUMNS)
    bad = set(df["kind"].dropna().unique()) - set(EVENT_KINDS)
    if bad:
        raise ValueError(f"events.kind: unknown {sorted(bad)} (allowed: {', '.join(EVENT_KINDS)})")
    return df


def memory_frame(rows: Iterable[Mapping[str, Any]] | pd.DataFrame | None = None) -> pd.DataFrame:
    return _frame(rows, MEMORY_COLUMNS)


def links_frame(rows: Iterable[Mapping[str, Any]] | pd.DataFrame | None = None) -> pd.DataFrame:
    return _frame(rows, LINK_COLUMNS)


@dataclass
class Result:
    """Events, memory, link utilisation and summary metrics of one simulated or measured job."""

    events: pd.DataFrame = field(default_factory=events_frame)
    memory: pd.DataFrame = field(default_factory=memory_frame)
    links: pd.DataFrame = field(default_factory=links_frame)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = "sim"
    fidelity: str = "closed-form"
    job: Any = None  # the `workbench.core.Job` (plan completed) that produced these numbers

    def __post_init__(self) -> None:
        self.events = events_frame(self.events)
        self.memory = memory_frame(self.memory)
        self.links = links_frame(self.links)

    @property
    def duration(self) -> float:
        """Seconds from the first event's start to the last event's end (0 when empty)."""
        if self.events.empty:
            return 0.0
        return float(self.events["end"].max() - self.events["start"].min())

    def to_perfetto(self, path: str | Path) -> Path:
        """Write a Chrome/Perfetto trace (JSON trace-event format) of the events; returns the path."""
        path = Path(path)
        trace: list[dict[str, Any]] = []
        for rank in sorted(self.events["rank"].dropna().unique().tolist()):
            trace.append({"ph": "M", "name": "process_name", "pid": int(rank), "args": {"name": f"rank {rank}"}})
        tids = {k: i for i, k in enumerate(EVENT_KINDS)}
        for ev in self.events.itertuples(index=False):
            trace.append({
                "name": str(ev.op), "cat": str(ev.kind), "ph": "X",
                "pid": int(ev.rank) if pd.notna(ev.rank) else 0, "tid": tids.get(str(ev.kind), 9),
                "ts": float(ev.start) * 1e6, "dur": max(float(ev.end - ev.start) * 1e6, 0.0),
                "args": {"bytes": int(ev.bytes) if pd.notna(ev.bytes) else 0, "device": str(ev.device),
                         "links": list(ev.links) if isinstance(ev.links, (list, tuple)) else []},
            })
        for row in self.memory.itertuples(index=False):
            trace.append({"name": f"memory {row.category}", "ph": "C", "pid": int(row.rank),
                          "ts": float(row.time) * 1e6, "args": {str(row.category): float(row.bytes)}})
        path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms",
                                    "metadata": {"source": self.source, "fidelity": self.fidelity}}))
        return path

    def summary(self) -> pd.DataFrame:
        """Seconds and bytes per event kind and op."""
        if self.events.empty:
            return pd.DataFrame(columns=["kind", "op", "count", "seconds", "bytes"])
        ev = self.events.assign(seconds=self.events["end"] - self.events["start"])
        return (ev.groupby(["kind", "op"], as_index=False)
                .agg(count=("op", "size"), seconds=("seconds", "sum"), bytes=("bytes", "sum")))

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        from workbench.display import repr_mimebundle

        rows = [(k, v if isinstance(v, (int, float, str, bool)) or v is None else _fmt(v)) for k, v in self.metrics.items()]
        note = f"{len(self.events)} events, {len(self.memory)} memory rows, {len(self.links)} link rows"
        return repr_mimebundle(f"Result ({self.source}, {self.fidelity})", rows, repr(self), note, none="–")

    def __repr__(self) -> str:
        m = ", ".join(f"{k}={_fmt(v)}" for k, v in list(self.metrics.items())[:6])
        return f"Result(source={self.source!r}, fidelity={self.fidelity!r}, events={len(self.events)}, {m})"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
