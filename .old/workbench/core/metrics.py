"""One vocabulary of metric keys: the same names from a simulation and from a run.

Training: a simulator and a runner both report these in `Result.metrics`. Serving: the names
and definitions of `vllm bench serve`, so numbers compare with theirs without a dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    meaning: str


TRAINING = (
    Metric("step_seconds", "s", "wall time of one optimizer step (steady state)"),
    Metric("tokens_per_s", "tok/s", "training tokens processed per second, whole job"),
    Metric("tflops_per_gpu", "TFLOP/s", "model FLOPs (no recomputation) per second per GPU"),
    Metric("mfu", "fraction", "tflops_per_gpu over the GPU's dense peak at the job's precision"),
    Metric("memory_GiB", "GiB", "peak memory of the most loaded rank"),
    Metric("fits", "bool", "the peak fits in device memory"),
    Metric("bubble_fraction", "fraction", "pipeline bubble share of the step"),
    Metric("exposed_comm_seconds", "s", "communication not hidden behind compute, per step"),
)

_LAT = ("ttft", "tpot", "itl", "e2el")
SERVING = (
    Metric("completed", "requests", "requests finished"),
    Metric("failed", "requests", "requests that failed"),
    Metric("request_throughput", "req/s", "completed requests per second"),
    Metric("request_goodput", "req/s", "completed requests per second meeting every SLO"),
    Metric("output_throughput", "tok/s", "generated tokens per second"),
    Metric("total_token_throughput", "tok/s", "prompt + generated tokens per second"),
    *(Metric(f"{stat}_{lat}_ms", "ms", f"{stat} of {lat.upper()}") for lat in _LAT
      for stat in ("mean", "median", "std", "p99")),
)

KEYS: dict[str, Metric] = {m.key: m for m in (*TRAINING, *SERVING)}
