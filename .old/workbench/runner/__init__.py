"""Real runs: launch ranks with torchrun semantics, stream telemetry while they run, return a measured Result.

`start_train(...)` returns a `RunHandle` at once (updates stream while the job runs);
`run_train(...)` blocks and returns the `Result`. See docs/running.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from workbench.core.stream import RunHandle, Update
from workbench.errors import RunFailed

_LAZY = {"start_train": "workbench.runner.launcher", "run_train": "workbench.runner.launcher",
         "load_run": "workbench.runner.launcher"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench.runner' has no attribute {name!r}")


__all__ = ["RunFailed", "RunHandle", "Update", "run_train", "start_train", "load_run"]
