"""Pure plotly figure builders (each returns a `go.Figure`; no widgets). Needs the 'notebook' extra.

Importing `workbench.viz` without plotly raises `ExtraMissing` naming the extra. Builders live
in submodules named for what they draw (`topology`, `fabrics`, `training`, `results`,
`transport`); any public name of one is reachable here, imported on first use:
`workbench.viz.topology_figure`, `workbench.viz.link_colour_update`, …
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from workbench.errors import require

require("plotly.graph_objects", "notebook")

from workbench.viz.topology import link_colour_update, topology_figure, update_in_place  # noqa: E402

SUBMODULES = ("topology", "fabrics", "training", "results", "transport", "placement", "serving", "replicas")

__all__ = ["SUBMODULES", "link_colour_update", "topology_figure", "update_in_place"]


def __getattr__(name: str) -> Any:
    """`workbench.viz.<builder>`: find `name` in the first submodule that defines it."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    for sub in SUBMODULES:
        full = f"{__name__}.{sub}"
        if importlib.util.find_spec(full) is None:
            continue
        module = importlib.import_module(full)
        if not name.startswith("_") and hasattr(module, name):
            value = getattr(module, name)
            globals()[name] = value
            return value
    raise AttributeError(f"workbench.viz has no {name!r} (looked in {', '.join(SUBMODULES)})")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))
