"""Property-based tests of the serving inputs (issue 12): traffic specs, SLOs, serving plans and
serving jobs either parse to valid objects or raise `WorkbenchError` naming the field, bounded."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz_parsers import FUZZ, HOSTILE_NUMBERS, clean, near, numbers_text, plain, scalars

serving = pytest.importorskip("workbench.serving")

TRAFFIC_KEYS = ["concurrency", "rate", "burstiness", "requests", "isl", "osl", "dataset", "seed", "scale",
                "max_isl", "max_osl", "min_isl", "max_concurrency", "prefix", "trace"]
PLAN_KEYS = ["tp", "pp", "ep", "dp", "replicas", "precision", "kv_precision", "max_seqs", "max_tokens", "chunk",
             "block", "prefix_caching", "mem_util", "scheduler_us", "prefill_workers", "decode_workers",
             "max_num_seqs", "gpu_memory_utilization"]


def spec(keys: list[str], base: str = "") -> st.SearchStrategy[str]:
    pair = st.tuples(st.sampled_from(keys + ["", "x"]), st.one_of(numbers_text, st.sampled_from(["inf", "conversation"])))
    return st.lists(pair, max_size=4).map(lambda ps: base + ",".join(f"{k}={v}" for k, v in ps))


@FUZZ
@given(st.one_of(spec(TRAFFIC_KEYS, "concurrency=4,isl=16,osl=8,requests=10,"), spec(TRAFFIC_KEYS),
                 st.text(max_size=100), near({"concurrency": 4, "isl": 16, "osl": 8, "requests": 10}), plain))
def test_traffic_specs(value: Any) -> None:
    t = clean(serving.Traffic.parse, value)
    if t is not None:
        assert 1 <= t.requests and t.concurrency >= 0 and (t.rate == math.inf or math.isfinite(t.rate))
        if t.requests <= 1000 and t.trace is None:
            reqs = t.plan()
            assert len(reqs) == t.requests and all(r["input_len"] >= 1 and r["output_len"] >= 1 for r in reqs)


@FUZZ
@given(st.one_of(spec(["ttft", "tpot", "itl", "e2el"]), near({"ttft": 200, "tpot": 50}), plain))
def test_slos(value: Any) -> None:
    s = clean(serving.SLO.parse, value)
    if s is not None:
        assert all(math.isfinite(v) and v > 0 for v in s.to_dict().values())


@FUZZ
@given(st.one_of(spec(PLAN_KEYS), near({"tp": 2, "max_seqs": 64, "mem_util": 0.9, "prefix_caching": True}),
                 plain))
def test_serving_plans(value: Any) -> None:
    p = clean(serving.ServingPlan.parse, value)
    if p is not None:
        assert p.tp >= 1 and p.pp >= 1 and 0 <= p.mem_util


@FUZZ
@given(st.one_of(near({"kind": "serving", "traffic": "concurrency=4,isl=16,osl=8,requests=10", "slo": "ttft=200",
                       "seed": 0}), plain),
       st.one_of(st.just("tp=8"), scalars, st.sampled_from(HOSTILE_NUMBERS).map(lambda v: f"tp={v}")))
def test_serving_jobs(workload: Any, plan: Any) -> None:
    from workbench.core.job import Job

    d = {"cluster": "aws-p5", "model": "llama3-8b", "plan": plan,
         "workload": workload if isinstance(workload, dict) else {"kind": "serving", "traffic": workload}}
    job = clean(Job.from_dict, d)
    if job is not None:
        assert job.kind in ("serving", "training")  # a workload mapping without a kind is training
