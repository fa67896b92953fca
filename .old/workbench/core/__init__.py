"""The job core: one Job, one rank layout, one vocabulary of ops and metrics, engines behind one protocol.

Everything else (simulators, runners, dashboard, compare, calibrate) depends on this package,
never the other way round. See docs/architecture.md.
"""

from workbench.core.job import Job, Training, Workload, register_workload
from workbench.core.layout import RankLayout, split_layers, stage_layers

__all__ = ["Job", "RankLayout", "Training", "Workload", "register_workload", "split_layers", "stage_layers"]
