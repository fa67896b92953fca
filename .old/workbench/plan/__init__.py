"""Parallel training plans (value object, parsing, validation, search) and serving placements
(`Placement`; the planner is `workbench.plan.place.place`)."""

from workbench.plan.placement import Placement
from workbench.plan.spec import PRECISIONS, RECOMPUTE, Plan, parse_plan
from workbench.plan.validate import check, problem, split_layers

__all__ = ["PRECISIONS", "RECOMPUTE", "Placement", "Plan", "check", "parse_plan", "problem", "split_layers"]


def __getattr__(name: str):  # lazy: search imports the simulator
    if name in ("search_plans", "candidates"):
        from workbench.plan import search

        return getattr(search, name)
    raise AttributeError(name)
