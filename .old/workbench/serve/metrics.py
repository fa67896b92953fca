"""Prometheus text exposition with vLLM's metric names under a `workbench:` prefix."""

from __future__ import annotations

import bisect
import threading
from typing import Any

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1


class Metrics:
    PREFIX = "workbench:"

    def __init__(self, model_name: str) -> None:
        self.model = model_name
        self.lock = threading.Lock()
        self.hist = {"time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
                     "inter_token_latency_seconds": Histogram(ITL_BUCKETS),
                     "e2e_request_latency_seconds": Histogram(E2E_BUCKETS),
                     "request_queue_time_seconds": Histogram(E2E_BUCKETS)}
        self.success: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def observe(self, name: str, v: float) -> None:
        with self.lock:
            self.hist[name].observe(v)

    def finished(self, reason: str) -> None:
        with self.lock:
            self.success[reason] = self.success.get(reason, 0) + 1

    def failure(self, reason: str) -> None:
        with self.lock:
            self.failed[reason] = self.failed.get(reason, 0) + 1

    def render(self, gauges: dict[str, Any]) -> str:
        p, lab = self.PREFIX, f'model_name="{self.model}"'
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, rows: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {p}{name} {help_}")
            out.append(f"# TYPE {p}{name} {kind}")
            for labels, v in rows:
                out.append(f"{p}{name}{{{labels}}} {v}")

        metric("num_requests_running", "gauge", "Requests in the running batches.",
               [(lab, gauges["num_requests_running"])])
        metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
               [(lab, gauges["num_requests_waiting"])])
        metric("kv_cache_usage_perc", "gauge", "KV-cache usage (1 = full), the fullest worker.",
               [(lab, gauges["kv_cache_usage_perc"])])
        metric("prompt_tokens_total", "counter", "Prefill tokens processed.", [(lab, gauges["prompt_tokens"])])
        metric("generation_tokens_total", "counter", "Generated tokens.", [(lab, gauges["generation_tokens"])])
        metric("num_preemptions_total", "counter", "Preemptions (KV cache full).", [(lab, gauges["preemptions"])])
        with self.lock:
            metric("request_success_total", "counter", "Finished requests by finish reason.",
                   [(f'{lab},finished_reason="{k}"', v) for k, v in sorted(self.success.items())]
                   or [(f'{lab},finished_reason="stop"', 0)])
            metric("request_failure_total", "counter", "Failed requests by cause.",
                   [(f'{lab},reason="{k}"', v) for k, v in sorted(self.failed.items())]
                   or [(f'{lab},reason="worker_died"', 0)])
            for name, h in self.hist.items():
                out.append(f"# HELP {p}{name} Histogram of {name.replace('_', ' ')}.")
                out.append(f"# TYPE {p}{name} histogram")
                acc = 0
                for b, c in zip(h.buckets, h.counts):
                    acc += c
                    out.append(f'{p}{name}_bucket{{{lab},le="{b}"}} {acc}')
                out.append(f'{p}{name}_bucket{{{lab},le="+Inf"}} {h.n}')
                out.append(f"{p}{name}_sum{{{lab}}} {h.sum}")
                out.append(f"{p}{name}_count{{{lab}}} {h.n}")
        return "\n".join(out) + "\n"
