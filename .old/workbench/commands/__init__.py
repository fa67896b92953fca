"""CLI commands. Each module holds `COMMANDS: list[Command]`; `workbench.cli` finds them.

Keep module imports light: import heavy packages (torch, plotly, numba) inside `run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    group: str
    name: str | None
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def emit(obj: Any, as_json: bool, text: str | None = None) -> None:
    """Print `obj` as JSON (with `--json`) or `text` (or a key: value listing) otherwise."""
    if as_json:
        json.dump(obj, sys.stdout, indent=2, default=_default)
        sys.stdout.write("\n")
    elif text is not None:
        print(text)
    elif isinstance(obj, dict):
        width = max((len(str(k)) for k in obj), default=0)
        for k, v in obj.items():
            print(f"{str(k).ljust(width)}  {v:.6g}" if isinstance(v, float) else f"{str(k).ljust(width)}  {v}")
    else:
        print(obj)


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
