"""workbench: build GPU cluster topologies, simulate sharded jobs on them, run them for real, watch live.

    import workbench as wb
    job = wb.Job.create("aws-p5:nodes=2", "llama3-8b", "tp=8,pp=2,gbs=32")
    predicted = wb.simulate(job)
    measured = wb.run(wb.Job.create(None, "gpt:layers=4,hidden=128", "dp=2", steps=5))
    wb.compare(predicted, measured)

`import workbench` stays light: no plotting, widget, numba or torch import until a verb needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workbench.api import calibrate, compare, load_cluster, load_model, resolve, run, search, simulate, start
from workbench.core.job import Job, Training
from workbench.core.layout import RankLayout
from workbench.core.stream import RunHandle, Update
from workbench.errors import RunFailed, WorkbenchError
from workbench.result import Result
from workbench.workflow import LoopResult, loop

if TYPE_CHECKING:
    from workbench.widgets.dashboard import Dashboard

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Dashboard":  # needs the notebook extra (plotly, ipywidgets): imported on first use
        from workbench.widgets.dashboard import Dashboard

        return Dashboard
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = [
    "Dashboard", "Job", "LoopResult", "RankLayout", "Result", "RunFailed", "RunHandle", "Training", "Update",
    "WorkbenchError", "calibrate", "compare", "load_cluster", "load_model", "loop", "resolve", "run", "search",
    "simulate", "start",
]
