"""Interactive Jupyter apps (ipywidgets + a plotly FigureWidget). Needs the 'notebook' extra.

Importing `workbench.widgets` without ipywidgets, anywidget or plotly raises `ExtraMissing`
naming the extra. `TopologyBuilder` builds clusters; `Dashboard` (in `widgets.dashboard`)
watches a job live and is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from workbench.errors import require

require("ipywidgets", "notebook")
require("anywidget", "notebook")  # plotly >= 6 FigureWidget is built on anywidget
require("plotly.graph_objects", "notebook")

from workbench.widgets.topology_builder import TopologyBuilder  # noqa: E402

_LAZY = {"Dashboard": "dashboard"}

__all__ = ["Dashboard", "TopologyBuilder"]


def __getattr__(name: str) -> Any:
    """`Dashboard` and friends: imported from their submodule on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"workbench.widgets has no {name!r}")
