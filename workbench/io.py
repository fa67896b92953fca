"""Reading user files safely: bounded size, safe YAML (no object tags), clear errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

MAX_BYTES = 16 * 1024 * 1024


def read_text(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> str:
    """The text of a user file, or a WorkbenchError saying what is wrong with it."""
    p = Path(path)
    try:
        if p.is_dir():
            raise WorkbenchError(f"{what}: {str(p)[:200]!r} is a directory; give a file")
        size = p.stat().st_size
        if size > max_bytes:
            raise WorkbenchError(f"{what}: {str(p)[:200]!r} is {size} bytes; the limit is {max_bytes}")
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise WorkbenchError(f"{what}: cannot read {str(p)[:200]!r}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise WorkbenchError(f"{what}: {str(p)[:200]!r} is not UTF-8 text") from None


def parse_structured(text: str, what: str) -> Any:
    """YAML or JSON text → plain data (safe loader; errors name the file kind, bounded in length)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass
        raise WorkbenchError(f"{what}: not valid YAML or JSON ({str(exc)[:300]})") from None


def read_structured(path: str | Path, what: str) -> Any:
    return parse_structured(read_text(path, what), what)
