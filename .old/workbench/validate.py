"""One validation layer for user input: typed fields with ranges, and bounded error messages.

Every number a user can give (a YAML field, a `key=value` option, a CLI flag) goes through
`whole` or `number`: only finite values of the right kind inside the field's range pass;
`nan`, `inf`, `1e400`, negative or fractional counts, full-width digits and absurd sizes are
errors naming the field, the value (shortened, never echoed whole) and the allowed range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from workbench.errors import WorkbenchError

SHOWN = 60
"""The most characters of a bad value an error message repeats."""

MAX_MESSAGE = 2000
"""The most characters of one error line the CLI prints."""

# ASCII only: `re`'s \d and Python's int()/float() would accept full-width and other Unicode digits.
_WHOLE = re.compile(r"[+-]?[0-9]+(?:\.0*)?(?:[eE][+]?[0-9]+)?")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def show(value: Any, limit: int = SHOWN) -> str:
    """A short, printable form of `value` for an error message (long values are cut with `…`)."""
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        kind = type(value).__name__
        return f"a {kind} of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes of binary data"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"a {len(str(abs(value)))}-digit number"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` on one line, at most `limit` characters."""
    one = " ".join(message.split("\n")) if "\n" in message else message
    return one if len(one) <= limit else one[: limit - 1] + "…"


def _range(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}" if isinstance(lo, float) else f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"<= {hi:g}" if isinstance(hi, float) else f"<= {hi}")
    return " and ".join(parts)


def whole(value: Any, field: str, lo: int = 0, hi: int = 2**31, unit: str = "") -> int:
    """`value` as a whole number in `lo..hi`: an int, an integral finite float, or ASCII digits."""
    what = f"expected a whole number{' of ' + unit if unit else ''} {_range(lo, hi)}"
    n: int | None = None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    elif isinstance(value, float):
        n = int(value) if math.isfinite(value) and value.is_integer() else None
    elif isinstance(value, str):
        s = value.strip()
        if len(s) <= 40 and _WHOLE.fullmatch(s):
            if re.fullmatch(r"[+-]?[0-9]+", s):
                n = int(s)
            else:
                f = float(s)
                n = int(f) if math.isfinite(f) and f.is_integer() else None
    if n is None or not lo <= n <= hi:
        raise WorkbenchError(f"{field}: {what}, got {show(value)}")
    return n


def number(value: Any, field: str, lo: float | None = 0.0, hi: float | None = 1e15, *, lo_open: bool = True,
           unit: str = "") -> float:
    """`value` as a finite number in (`lo`, `hi`] (or [`lo`, `hi`] with `lo_open=False`)."""
    what = f"expected a number{' of ' + unit if unit else ''} {_range(lo, hi, lo_open)}"
    x: float | None = None
    if isinstance(value, bool):
        x = None
    elif isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:
            x = None
    elif isinstance(value, str):
        s = value.strip()
        if len(s) <= 40 and _NUMBER.fullmatch(s):
            x = float(s)
    ok = x is not None and math.isfinite(x)
    if ok and lo is not None:
        ok = x > lo if lo_open else x >= lo  # type: ignore[operator]
    if ok and hi is not None:
        ok = x <= hi  # type: ignore[operator]
    if not ok:
        raise WorkbenchError(f"{field}: {what}, got {show(value)}")
    return float(x)  # type: ignore[arg-type]


def boolean(value: Any, field: str) -> bool:
    """A yes/no field: a bool, 0/1, or one of true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise WorkbenchError(f"{field}: expected true or false (yes/no, 1/0), got {show(value)}")


def text(value: Any, field: str, max_len: int = 200) -> str:
    """A short piece of text (a name): a string, or a number written as one."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise WorkbenchError(f"{field}: expected a name (text), got {show(value)}")
    s = str(value)
    if len(s) > max_len:
        raise WorkbenchError(f"{field}: expected at most {max_len} characters, got {len(s)} ({show(s)})")
    if any(ord(c) < 32 for c in s):
        raise WorkbenchError(f"{field}: control characters are not allowed, got {show(s)}")
    return s


def choice(value: Any, field: str, allowed: Iterable[str]) -> str:
    """One of `allowed` (exact)."""
    options = list(allowed)
    if not isinstance(value, str) or value not in options:
        raise WorkbenchError(f"{field}: {show(value)} is not one of {', '.join(options)}")
    return value


def mapping(value: Any, field: str, allowed: Iterable[str] | None = None) -> Mapping[str, Any]:
    """A mapping with string keys (and only `allowed` keys, when given)."""
    if not isinstance(value, Mapping):
        raise WorkbenchError(f"{field}: expected a mapping, got {show(value)}")
    odd = [k for k in value if not isinstance(k, str)]
    if odd:
        raise WorkbenchError(f"{field}: keys must be names, got {show(odd[0])}")
    if allowed is not None:
        names = set(allowed)
        bad = sorted(set(value) - names)
        if bad:
            shown = ", ".join(show(b, 40) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise WorkbenchError(f"{field}: unknown key(s) {shown} (allowed: {', '.join(sorted(names))})")
    return value
