"""workbench: build GPU cluster topologies, simulate sharded jobs on them, run them for real, watch live.

Heavy parts are imported lazily: `import workbench` stays fast and needs no plotting or
widget package.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Cluster": "workbench.topology",
    "load_cluster": "workbench.topology",
    "preset": "workbench.topology",
    "discover": "workbench.topology",
    "Result": "workbench.result",
    "WorkbenchError": "workbench.errors",
    "compare": "workbench.compare",
    "calibrate": "workbench.calibrate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, name, module)  # the attribute of that name, else the module itself
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = sorted(_LAZY)
