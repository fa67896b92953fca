"""One result shape for every benchmark of the workbench.

```
{"benchmark": "sim",                 # which benchmark (sim, dashboard, transport, kernels, …)
 "machine": {...},                   # workbench.bench.machine.machine(): what ran it
 "command": "workbench bench sim",   # the command that reproduces it
 "date": "2026-11-30T18:40:00+00:00",
 "summary": {"train_eval_ms": 1.4},  # the headline numbers: flat name → number (or short string)
 "rows": [{...}, ...]}               # the measurements behind them, one flat dict per row
```

Summary keys carry their unit as a suffix (`_us`, `_ms`, `_s`, `_per_s`, `GBps`, …); rows say
which part of the benchmark made them (`bench` or `mode`) and keep a baseline measured in the
same run beside the thing measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

KEYS = ("benchmark", "machine", "command", "date", "summary", "rows")


def plain(value: Any) -> Any:
    """`value` as plain JSON types (numpy scalars and arrays, tuples, sets; NaN and inf as None)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar or array
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def record(benchmark: str, rows: Iterable[Mapping[str, Any]], summary: Mapping[str, Any], command: str,
           machine: Mapping[str, Any] | str | None = None) -> dict[str, Any]:
    """The one JSON record of a benchmark run. `machine`: a machine record, or a name for a new one."""
    from workbench.bench.machine import machine as make_machine

    info = dict(machine) if isinstance(machine, Mapping) else make_machine(machine)
    rec = {"benchmark": benchmark, "machine": info, "command": command,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "summary": dict(summary), "rows": [dict(r) for r in rows]}
    out: dict[str, Any] = plain(rec)
    check(out)
    return out


def flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`values` as summary entries: nested mappings become `outer_inner` keys, lists comma-separated text.

    For a benchmark's extra fields (a soak's counts, notes, versions) that belong beside its headline numbers.
    """
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flat(v, key + "_")
        elif isinstance(v, (list, tuple, set)):
            out[key] = ",".join(str(x) for x in v)
        else:
            out[key] = v
    return out


def check(rec: Any, where: str = "record") -> None:
    """Raise `WorkbenchError` naming the field when `rec` is not the one result shape."""
    if not isinstance(rec, Mapping):
        raise WorkbenchError(f"{where}: expected a JSON object with {', '.join(KEYS)}, got {type(rec).__name__}")
    missing = [k for k in KEYS if k not in rec]
    if missing:
        raise WorkbenchError(f"{where}: missing {', '.join(missing)} (a benchmark record has {', '.join(KEYS)})")
    if not isinstance(rec["benchmark"], str) or not rec["benchmark"]:
        raise WorkbenchError(f"{where}.benchmark: expected a name, got {rec['benchmark']!r}")
    if not isinstance(rec["machine"], Mapping) or "name" not in rec["machine"]:
        raise WorkbenchError(f"{where}.machine: expected a machine record with a name (workbench.bench.machine)")
    if not isinstance(rec["summary"], Mapping):
        raise WorkbenchError(f"{where}.summary: expected an object of name → number")
    for k, v in rec["summary"].items():
        if isinstance(v, (Mapping, list)):
            raise WorkbenchError(f"{where}.summary.{k}: expected a number or short text, got a "
                                 f"{type(v).__name__} (put details in rows)")
    if not isinstance(rec["rows"], list) or not all(isinstance(r, Mapping) for r in rec["rows"]):
        raise WorkbenchError(f"{where}.rows: expected a list of objects (one per measurement)")


def write(rec: Mapping[str, Any], path: str | Path, field: str = "--out") -> Path:
    """Write a record as indented JSON; a path that cannot be written is a `WorkbenchError` naming `field`."""
    from workbench.io import check_output

    check(rec)
    p = check_output(path, field)
    try:
        p.write_text(json.dumps(rec, indent=2) + "\n")
    except OSError as exc:
        raise WorkbenchError(f"{field}: cannot write {str(path)!r}: {exc.strerror}") from exc
    return p


def load(path: str | Path) -> dict[str, Any]:
    """Read a record written by `write` (checked: a file of another shape names what is missing)."""
    from workbench.io import read_text

    try:
        rec = json.loads(read_text(path, "record"))
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"record: {path} is not JSON ({exc.msg} at line {exc.lineno})") from None
    check(rec, where=str(path))
    return dict(rec)


@dataclass(frozen=True)
class Measured:
    """What one benchmark function returns: headline numbers (`summary`) and the rows behind them."""

    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Measured(summary={self.summary!r}, rows=[{len(self.rows)} rows])"
