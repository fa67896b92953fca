"""Parser for the text that nccl-tests (`all_reduce_perf`, `all_gather_perf`, …) prints.

It reads the output as it comes: the `#`-prefixed header (with or without the `root`
column, `error` or `#wrong`), data rows of out-of-place and in-place figures (`N/A` where
a test has no in-place variant), rank prefixes such as `[0] ` from mpirun's
`--tag-output`, interleaved `NCCL INFO` lines, and several tests in one file
(`# Collective test starting: …`). Rows become a DataFrame with one row per size:
`op, size, count, type, redop, root, time_us, algbw_GBps, busbw_GBps, wrong,
time_us_inplace, algbw_GBps_inplace, busbw_GBps_inplace, wrong_inplace`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from workbench.errors import WorkbenchError

_PREFIX = re.compile(r"^\s*(\[\d+\]\s*)+")
_OP_NAMES = {
    "all_reduce": "all_reduce", "allreduce": "all_reduce", "all_gather": "all_gather", "allgather": "all_gather",
    "reduce_scatter": "reduce_scatter", "reducescatter": "reduce_scatter", "alltoall": "all_to_all",
    "all_to_all": "all_to_all", "broadcast": "broadcast", "sendrecv": "send_recv", "send_recv": "send_recv",
    "reduce": "reduce", "gather": "gather", "scatter": "scatter", "hypercube": "hypercube",
}
_TEST = re.compile(r"(all_reduce|all_gather|reduce_scatter|alltoall|broadcast|sendrecv|reduce|gather|scatter|"
                   r"hypercube)_perf")
COLUMNS = ("op", "size", "count", "type", "redop", "root", "time_us", "algbw_GBps", "busbw_GBps", "wrong",
           "time_us_inplace", "algbw_GBps_inplace", "busbw_GBps_inplace", "wrong_inplace")


def _num(tok: str) -> float:
    try:
        return float(tok)
    except ValueError:
        return math.nan  # N/A


def parse_nccl_tests(text: str, op: str | None = None) -> pd.DataFrame:
    """Rows of nccl-tests output `text`; `op` names the test when the text does not say."""
    rows: list[dict[str, object]] = []
    current = _OP_NAMES.get(op or "", op)
    has_root = None  # from the header; guessed from the row width when the header is missing
    avg: dict[str, float] = {}
    for raw in text.splitlines():
        line = _PREFIX.sub("", raw).rstrip()
        if not line.strip():
            continue
        m = _TEST.search(line)
        if m and "Collective test concluded" in line:
            for r in rows:  # rows printed before the test said its name
                if r["op"] == "unknown":
                    r["op"] = _OP_NAMES[m.group(1)]
        elif m and ("Collective test starting" in line or "/" in line or line.lstrip().startswith(m.group(0))):
            current = _OP_NAMES[m.group(1)]
        if "NCCL INFO" in line or "NCCL WARN" in line:
            # mpirun may glue a data row's start onto a log line; keep only what follows the log text
            continue
        s = line.strip()
        if s.startswith("#"):
            if re.search(r"\bsize\b.*\bcount\b.*\btype\b", s):
                has_root = " root " in f" {s} "
            am = re.search(r"Avg bus bandwidth\s*:\s*([0-9.eE+-]+)", s)
            if am and current:
                avg[current] = float(am.group(1))
            continue
        toks = s.split()
        if len(toks) < 8 or not toks[0].isdigit() or not toks[1].isdigit():
            continue
        root_col = has_root if has_root is not None else len(toks) in (9, 13)
        head = 5 if root_col else 4
        nums = toks[head:]
        if len(nums) < 4:
            continue
        out = nums[:4]
        inp = nums[4:8] + ["nan"] * (4 - len(nums[4:8]))
        rows.append({
            "op": current or "unknown", "size": int(toks[0]), "count": int(toks[1]), "type": toks[2],
            "redop": toks[3], "root": int(toks[4]) if root_col and toks[4].lstrip("-").isdigit() else -1,
            "time_us": _num(out[0]), "algbw_GBps": _num(out[1]), "busbw_GBps": _num(out[2]), "wrong": _num(out[3]),
            "time_us_inplace": _num(inp[0]), "algbw_GBps_inplace": _num(inp[1]),
            "busbw_GBps_inplace": _num(inp[2]), "wrong_inplace": _num(inp[3]),
        })
    if not rows:
        raise WorkbenchError("nccl-tests output: no result rows found (expected lines like "
                             "'  1048576  262144  float  sum  -1  27.76  37.78  66.11  0 …')")
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs["avg_busbw_GBps"] = avg
    return df


def read_nccl_tests(path: str | Path, op: str | None = None) -> pd.DataFrame:
    """Parse an nccl-tests output file (comment lines `##` at the top are ignored as headers)."""
    from workbench.io import read_text

    return parse_nccl_tests(read_text(path, "nccl-tests output"), op)


def check_busbw(df: pd.DataFrame, ranks: int) -> pd.Series:
    """busbw recomputed from algbw with nccl-tests' factors, per row (for checking a parse)."""
    from workbench.sim.collectives import bus_factor

    return df.apply(lambda r: r["algbw_GBps"] * bus_factor(str(r["op"]), ranks), axis=1)
