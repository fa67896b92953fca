"""Real runs: launch ranks with torchrun semantics, stream telemetry while they run, return a measured Result.

`start_train(...)` returns a `RunHandle` at once (updates stream while the job runs);
`run_train(...)` blocks and returns the `Result`. See docs/running.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from workbench.run.errors import RunFailed
from workbench.run.stream import RunHandle, Update

_LAZY = {"start_train": "workbench.run.launcher", "run_train": "workbench.run.launcher",
         "load_run": "workbench.run.launcher"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench.run' has no attribute {name!r}")


__all__ = ["RunFailed", "RunHandle", "Update", "run_train", "start_train", "load_run"]
