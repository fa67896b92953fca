"""Benchmarks of the serving simulator, registered into `workbench.bench.sim` (`workbench bench sim --only serve`)."""

from __future__ import annotations

import os
import time
from typing import Any

from workbench.bench.record import Measured
from workbench.bench.sim import register

CLUSTER = "dgx-h100:nodes=1"
MODEL = "llama3.1-70b"
PLAN = "tp=8"


@register("serve")
def bench_serve() -> Measured:
    """`serve_10k_requests_s`: wall time to simulate 10,000 conversation-length requests of Llama-3.1-70B at TP8
    on one 8×H100 node, open loop (Poisson) at 95 % of the simulated saturation rate (found first with every
    request queued at t=0); the Result tables included. `serve_10k_requests_cpu_s` the same in CPU seconds of
    this process (the machine may be shared: `serve_load_average_1min` says how busy). Baselines in the same
    run: 1,000 and 3,000 requests at the same rate (cost per request should stay flat) and the kernel's
    first call (numba cache load or compile). `serve_search_configs_per_s`: a full `search serve` of the
    same model on the node (every candidate simulated on 300 requests), wall and per CPU second."""
    from workbench.sim.serve import simulate_serving
    from workbench.sim.serve_search import search_serving
    from workbench.topology import load_cluster

    load = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    cluster = load_cluster(CLUSTER)
    t = time.perf_counter()
    simulate_serving(cluster, MODEL, PLAN, "rate=4,isl=64,osl=8,requests=8")
    first = time.perf_counter() - t
    sat = simulate_serving(cluster, MODEL, PLAN, "rate=inf,dataset=conversation,requests=3000,seed=1")
    rate = 0.95 * sat.metrics["request_throughput"]
    per_req = {}
    for n in (1000, 3000, 10000):
        t, c = time.perf_counter(), time.process_time()
        res = simulate_serving(cluster, MODEL, PLAN, f"rate={rate:.4f},dataset=conversation,requests={n},seed=0")
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        m = res.metrics
        per_req[n] = (wall, cpu)
        rows.append({"requests": n, "rate": rate, "wall_s": wall, "cpu_s": cpu, "us_per_request": wall / n * 1e6,
                     "steps": int((res.events["op"].isin(["prefill", "decode", "mixed"])).sum()),
                     "request_throughput": m["request_throughput"], "mean_ttft_ms": m["mean_ttft_ms"],
                     "mean_tpot_ms": m["mean_tpot_ms"], "peak_kv_usage": m["peak_kv_usage"]})
    t, c = time.perf_counter(), time.process_time()
    df = search_serving(cluster, MODEL, f"rate={rate / 2:.4f},dataset=conversation,requests=300", "ttft=2000,tpot=100")
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rows.append({"search_configs": len(df), "wall_s": wall, "cpu_s": cpu, "configs_meeting_slo": int(df["ok"].sum()),
                 "best": str(df.iloc[0]["plan"])})
    return Measured({"serve_10k_requests_s": per_req[10000][0], "serve_10k_requests_cpu_s": per_req[10000][1],
                     "serve_1k_requests_s": per_req[1000][0], "serve_saturation_req_per_s": sat.metrics["request_throughput"],
                     "serve_kernel_first_call_s": first, "serve_search_configs_per_s": len(df) / wall,
                     "serve_search_configs_per_cpu_s": len(df) / cpu, "serve_load_average_1min": load}, rows)
