"""Engines behind one protocol: a simulator takes a Job and returns a Result; a runner takes a Job
and returns a live handle (`RunHandle`) that streams `Update`s and ends in a Result.

Engines are found by the job's workload kind. The built-in ones are named here as import paths,
so nothing heavy is imported until a job of that kind is simulated or run; a new workload or
engine plugs in with `register_simulator` / `register_runner`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.core.job import Job
    from workbench.core.stream import RunHandle
    from workbench.result import Result


class Simulator(Protocol):
    def __call__(self, job: Job) -> Result: ...


class Runner(Protocol):
    def __call__(self, job: Job, **options: Any) -> RunHandle: ...


_SIMULATORS: dict[str, Callable[..., Any]] = {}
_RUNNERS: dict[str, Callable[..., Any]] = {}
_BUILTIN_SIM = {"training": "workbench.sim.train:simulate_job", "serving": "workbench.sim.serve:simulate_job"}
_BUILTIN_SEARCH = {"training": "workbench.plan.search:search_job", "serving": "workbench.sim.serve_search:search_job"}
_SEARCHES: dict[str, Callable[..., Any]] = {}
_BUILTIN_RUN = {"training": "workbench.runner.launcher:start_job", "serving": "workbench.serve.runner:start_job"}


def register_simulator(kind: str, fn: Callable[..., Any]) -> None:
    _SIMULATORS[kind] = fn


def register_runner(kind: str, fn: Callable[..., Any]) -> None:
    _RUNNERS[kind] = fn


def register_search(kind: str, fn: Callable[..., Any]) -> None:
    _SEARCHES[kind] = fn


def _find(table: dict[str, Callable[..., Any]], builtin: dict[str, str], kind: str, what: str) -> Callable[..., Any]:
    if kind not in table and kind in builtin:
        module, name = builtin[kind].split(":")
        try:
            table[kind] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise WorkbenchError(f"job.workload: no {what} for {kind!r} jobs is available here ({exc})") from None
    if kind not in table:
        raise WorkbenchError(f"job.workload: no {what} is registered for {kind!r} jobs")
    return table[kind]


def simulator(kind: str) -> Simulator:
    return _find(_SIMULATORS, _BUILTIN_SIM, kind, "simulator")  # type: ignore[return-value]


def runner(kind: str) -> Runner:
    return _find(_RUNNERS, _BUILTIN_RUN, kind, "runner")  # type: ignore[return-value]


def searcher(kind: str) -> Callable[..., Any]:
    """The plan search of a workload kind: `fn(job, top=None, **options) -> DataFrame`."""
    return _find(_SEARCHES, _BUILTIN_SEARCH, kind, "plan search")
