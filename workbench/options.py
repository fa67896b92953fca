"""The `key=value,key=value` option strings of cluster, model and plan specs."""

from __future__ import annotations

from collections.abc import Mapping

from workbench.errors import WorkbenchError


def parse_options(text: str, field: str, example: str = "nodes=4", flags: Mapping[str, str] | None = None) -> dict[str, str]:
    """`"a=1,b=x"` → `{"a": "1", "b": "x"}`. A bare word is allowed only if `flags` gives its value."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            if flags and part in flags:
                out[part] = flags[part]
                continue
            raise WorkbenchError(f"{field}: option {part!r} needs a value, like {example}")
        out[key.strip()] = value.strip()
    return out
