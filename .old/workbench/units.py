"""Parsing and formatting of sizes (`4KiB`, `32MiB`, `1GiB`, `1e6`, plain bytes)."""

from __future__ import annotations

import math
import re

from workbench.errors import WorkbenchError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")  # ASCII digits only
MAX_SIZE = 2**60
"""The largest size read (1 EiB): larger ones are typos, and would overflow the simulators' arithmetic."""


def parse_size(text: str | int | float, field: str = "size") -> int:
    """Bytes in `text`: `4KiB`, `32MiB`, `1GiB`, `1.5GB`, `4096`. Raises naming `field`.

    A size is a whole number of bytes in 0..2^60: `nan`, `inf`, `1e400`, negative sizes and
    sizes that are not whole bytes (`1e-9`, `0.5`) are errors."""
    from decimal import Decimal

    from workbench.validate import show

    rule = "a whole number of bytes in 0..2^60 (use bytes or a unit: 4KiB, 32MiB, 1GiB, 10MB)"
    if isinstance(text, bool):
        raise WorkbenchError(f"{field}: expected {rule}, got {text!r}")
    if isinstance(text, (int, float)):
        value: Decimal | None = None
        if isinstance(text, int) or math.isfinite(text):
            value = Decimal(text)
    else:
        m = _SIZE.match(str(text)) if isinstance(text, str) and len(text) <= 64 else None
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise WorkbenchError(f"{field}: cannot read size {show(text)}; expected {rule}")
        try:
            value = Decimal(m.group(1)) * _UNITS[unit]
        except ArithmeticError:
            value = None
    if value is None or not value.is_finite() or value != value.to_integral_value() or not 0 <= value <= MAX_SIZE:
        raise WorkbenchError(f"{field}: expected {rule}, got {show(text)}")
    return int(value)


def format_bytes(n: float) -> str:
    """`n` bytes in binary units, e.g. `32.0 MiB`."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
