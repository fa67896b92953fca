"""Parsing and formatting of sizes (`4KiB`, `32MiB`, `1GiB`, `1e6`, plain bytes)."""

from __future__ import annotations

import re

from workbench.errors import WorkbenchError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float, field: str = "size") -> int:
    """Bytes in `text`: `4KiB`, `32MiB`, `1GiB`, `1.5GB`, `4096`. Raises naming `field`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise WorkbenchError(f"{field}: must not be negative, got {text}")
        return int(text)
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise WorkbenchError(
            f"{field}: cannot read size {text!r} (use bytes or a unit: 4KiB, 32MiB, 1GiB, 10MB)"
        )
    return int(round(float(m.group(1)) * _UNITS[unit]))


def format_bytes(n: float) -> str:
    """`n` bytes in binary units, e.g. `32.0 MiB`."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
