"""The training step loop of one rank, shared by both engines (native and the hand-written GPT).

Each step is timed on the host between two points at which the device is idle (a CUDA
synchronisation before the first step and after each one), handed to the recorder as
`step_done` (which resolves the step's CUDA timing events against that anchor), and its loss
kept. The loop also carries the two test hooks every engine honours: telemetry off and on in
alternate steps (`telemetry="ab"`, the overhead A/B) and an injected failure
(`fail_rank_at_step=[rank, step]`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.runner.telemetry import Recorder


def run_steps(step: Callable[[int], float | None], job: dict[str, Any], rank: int, rec: Recorder, device: Any, *,
              start_step: int = 0, profile: str | None = None) -> list[float | None]:
    """Run `job["steps"]` steps, `step(start_step + i)` each; returns the losses (None off the last stage).

    `profile`: a file path; the step before the last runs under `torch.profiler` and its table is
    written there. The recorder sees step indices counted from 0 in this run.
    """
    import torch

    cuda = device.type == "cuda"
    fail_at = job.get("fail_rank_at_step")  # fault injection for tests: [rank, step]
    losses: list[float | None] = []
    if cuda:  # every step starts on an idle stream (the recorder's per-step time anchor)
        torch.cuda.synchronize()
    for i in range(job["steps"]):
        if fail_at and fail_at[0] == rank and fail_at[1] == i:
            raise RuntimeError(f"injected failure at step {i}")
        if job["telemetry"] == "ab":  # overhead measurement: telemetry off and on in alternate steps
            rec.enabled = i % 2 == 1
        t0 = time.perf_counter()
        if profile and i == job["steps"] - 2:  # one late step under torch.profiler
            with torch.profiler.profile(record_shapes=False) as prof:
                loss = step(start_step + i)
            sort = "cuda_time_total" if cuda else "cpu_time_total"
            Path(profile).write_text(prof.key_averages().table(sort_by=sort, row_limit=25))
        else:
            loss = step(start_step + i)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        rec.step_done(i, t0, t1, loss)
        losses.append(loss)
    return losses
