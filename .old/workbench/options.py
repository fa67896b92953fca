"""The `key=value,key=value` option strings of cluster, model and plan specs."""

from __future__ import annotations

from collections.abc import Mapping

from workbench.errors import WorkbenchError
from workbench.validate import show

MAX_SPEC = 4096
"""The longest option string read (a real spec is well under a few hundred characters)."""


def parse_options(text: str, field: str, example: str = "nodes=4", flags: Mapping[str, str] | None = None) -> dict[str, str]:
    """`"a=1,b=x"` → `{"a": "1", "b": "x"}`. A bare word is allowed only if `flags` gives its value.

    A key given twice (`tp=8,tp=4`) or an empty key is an error, not "last one wins"."""
    text = str(text)
    if len(text) > MAX_SPEC:
        raise WorkbenchError(f"{field}: the options are {len(text)} characters long; the limit is {MAX_SPEC}")
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            if flags and part in flags:
                key, value = part, flags[part]
            else:
                raise WorkbenchError(f"{field}: option {show(part)} needs a value, like {example}")
        if not key:
            raise WorkbenchError(f"{field}: option {show(part)} has no name before '=', like {example}")
        if key in out:
            raise WorkbenchError(f"{field}: option {show(key, 40)} is given twice; give each option once")
        out[key] = value.strip()
    return out
