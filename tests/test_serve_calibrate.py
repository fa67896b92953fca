"""Calibrating the serving simulator: the step fit, busy periods, the HTTP hop, and the host-cost terms it
sets in the simulator (per step, per sequence, per request). No server here: the live path is in test_serve."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import workbench as wb
from workbench.result import Result, events_frame, memory_frame
from workbench.serve.calibrate import _price, calibrate_job, fit, fit_steps, hop_seconds, pool_runs, steps
from workbench.serving import Serving, ServingPlan
from workbench.sim.serve import requests, simulate_serving, workers
from workbench.topology import load_cluster

NODE = "dgx-h100:nodes=1"
MODEL = "llama3.1-8b"


@pytest.fixture(scope="module")
def job():  # type: ignore[no-untyped-def]
    return wb.Job.create(NODE, MODEL, plan="tp=1,replicas=1,cuda_graph=false",
                         workload=Serving(traffic="concurrency=2,isl=48,osl=16,requests=8"))


def _table(job, s: float, q: float, k: float, noise: float = 0.0) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    seqs = np.tile(np.array([1, 2, 3, 4, 6, 8, 12, 16], float), 6)
    tokens = seqs.copy()
    tokens[::3] = seqs[::3] * 48  # prefill steps: many tokens for few sequences
    y = s + q * seqs + _price(job, tokens, seqs, rate=k)  # the steps as the simulator prices them at rate factor k
    y = y * (1 + noise * rng.uniform(-1, 1, len(y)))
    return pd.DataFrame({"tokens": tokens, "seqs": seqs, "period": y})


def test_step_fit_recovers_known_host_costs(job) -> None:  # type: ignore[no-untyped-def]
    f = fit_steps(job, _table(job, 2e-3, 5e-4, 3.0, noise=0.02))
    assert f["scheduler_us"] == pytest.approx(2000, rel=0.1)
    assert f["seq_us"] == pytest.approx(500, rel=0.1)
    assert f["rate_factor"] == pytest.approx(3.0, rel=0.1)
    assert f["r2"] > 0.95


def test_too_few_busy_steps_is_a_clear_error(job) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(wb.WorkbenchError, match="busy engine steps"):
        fit_steps(job, _table(job, 1e-3, 1e-4, 1.0).head(3))


def _measured(job, table: pd.DataFrame, gap: float = 1e-3, client_extra: float = 0.0):  # type: ignore[no-untyped-def]
    """A Result shaped like a serving run's: steps back to back (KV held after each but the last), requests."""
    ev, mem, t = [], [], 0.0
    for i, r in enumerate(table.itertuples()):
        dur = float(r.period) - gap
        ev.append({"rank": 0, "device": "cpu", "kind": "compute", "op": "decode", "bytes": 0, "links": (),
                   "start": t, "end": t + dur, "batch_seqs": int(r.seqs), "batch_tokens": int(r.tokens)})
        mem.append({"rank": 0, "category": "kv_cache", "bytes": 0 if i == len(table) - 1 else 4096, "time": t + dur})
        t += float(r.period)
    ttft = [0.05, 0.07, 0.06]
    for x in ttft:
        ev.append({"rank": -1, "device": "client", "kind": "compute", "op": "request", "bytes": 0, "links": (),
                   "start": 0.0, "end": 0.2, "ttft": x})
    res = Result(events_frame(ev), memory_frame(mem), metrics={}, source="run", fidelity="measured", job=job)
    res.requests = pd.DataFrame({"ttft": [x + client_extra for x in ttft], "success": True})  # type: ignore[attr-defined]
    return res


def test_periods_only_where_the_worker_went_straight_on(job) -> None:  # type: ignore[no-untyped-def]
    table = _table(job, 2e-3, 5e-4, 3.0).head(5)
    res = _measured(job, table)
    ev = res.events
    mem = res.memory.copy()
    mem.loc[2, "bytes"] = 0  # after step 2 nothing held KV pages: the worker waited for requests
    res = Result(ev, mem, metrics={}, source="run", fidelity="measured", job=job)
    st = steps(res)
    assert np.allclose(st["period"].to_numpy()[:2], table["period"].to_numpy()[:2])
    assert math.isnan(st["period"][2]) and math.isnan(st["period"][4])
    assert st["period"][3] == pytest.approx(table["period"][3])


def test_microbenchmark_shape_scaled_by_the_runs_contention(job) -> None:  # type: ignore[no-untyped-def]
    micro = _table(job, 2e-3, 5e-4, 3.0)
    run = _table(job, 2e-3, 5e-4, 3.0).head(20)
    run["period"] *= 1.5  # the run met a busier machine than the microbenchmark
    f = fit(job, _measured(job, run), micro)
    assert f["contention"] == pytest.approx(1.5, rel=0.02)
    assert f["seq_us"] == pytest.approx(750, rel=0.05)
    assert f["scheduler_us"] == pytest.approx(3000, rel=0.05)


def test_runs_of_one_level_pool_into_one_measurement(job) -> None:  # type: ignore[no-untyped-def]
    """Alternated runs of one level: their steps on one clock (no period across two runs), the contention of all of
    them together, the hop over all requests, the metrics their mean."""
    micro = _table(job, 2e-3, 5e-4, 3.0)
    slow, fast = _table(job, 2e-3, 5e-4, 3.0).head(12), _table(job, 2e-3, 5e-4, 3.0).head(12)
    slow["period"] *= 1.5  # the machine was slower during one run than during the other
    a, b = _measured(job, slow, client_extra=0.002), _measured(job, fast, client_extra=0.006)
    a.metrics = {"mean_ttft_ms": 10.0, "mode": "colocated", "failures": {"timeout": 1}}
    b.metrics = {"mean_ttft_ms": 20.0, "mode": "colocated", "failures": {"timeout": 2, "http_500": 1}}
    pooled = pool_runs([a, b])
    st = steps(pooled)
    assert len(st) == len(steps(a)) + len(steps(b)) and st["period"].notna().sum() == 22  # each run's last is idle
    # the KV gauge sampled before a run's last step still showed pages held: that step's period is still not the
    # gap to the next run's first step
    stale = Result(a.events, a.memory.assign(bytes=a.memory["bytes"].max()), metrics=a.metrics, source="run",
                   fidelity="measured", job=job)
    st = steps(pool_runs([stale, b]))
    assert math.isnan(st["period"][11]) and st["period"].notna().sum() == 22
    assert st["start"].min() == 0.0 and st.loc[12:, "start"].min() > st.loc[:11, "end"].max()
    assert pooled.metrics["mean_ttft_ms"] == 15.0 and pooled.metrics["runs"] == 2
    assert pooled.metrics["failures"] == {"timeout": 3, "http_500": 1}
    assert hop_seconds(pooled) == pytest.approx(0.004)
    both = fit(job, [a, b], micro)["contention"]
    assert fit(job, b, micro)["contention"] < both < fit(job, a, micro)["contention"]
    assert pool_runs([a]) is a
    with pytest.raises(wb.WorkbenchError, match="no runs"):
        pool_runs([])
    # the notebook verb takes the same list; repeats of one job only
    cal = wb.calibrate([a, b])
    assert cal.plan.seq_us == pytest.approx(calibrate_job(job, [a, b])[1]["seq_us"])
    other = _measured(job.with_workload(traffic="concurrency=6,isl=48,osl=16,requests=8"), fast)
    with pytest.raises(wb.WorkbenchError, match="different jobs"):
        wb.calibrate([a, other])


def test_hop_is_client_minus_server_ttft_and_becomes_request_us(job) -> None:  # type: ignore[no-untyped-def]
    measured = _measured(job, _table(job, 2e-3, 5e-4, 3.0), client_extra=0.004)
    assert hop_seconds(measured) == pytest.approx(0.004)
    cal, f = calibrate_job(job, measured, overheads={"server_request_us": 1500.0})
    assert f["request_us"] == pytest.approx(5500.0)
    assert cal.plan.request_us == pytest.approx(5500.0) and cal.plan.seq_us == pytest.approx(f["seq_us"])
    spec, base = cal.cluster.nodes[0].gpu_spec, job.cluster.nodes[0].gpu_spec
    assert spec.memory_GBps == pytest.approx(base.memory_GBps / f["rate_factor"])


def test_request_us_adds_to_ttft_and_to_the_closed_loop_turnaround() -> None:
    node = load_cluster(NODE)
    spread = "rate=0.5,isl=64,osl=8,requests=6"  # requests seconds apart: nothing queues
    a = simulate_serving(node, MODEL, "tp=1,replicas=1", spread).metrics
    b = simulate_serving(node, MODEL, "tp=1,replicas=1,request_us=5000", spread).metrics
    assert b["mean_ttft_ms"] - a["mean_ttft_ms"] == pytest.approx(5.0, rel=1e-6)
    assert b["mean_tpot_ms"] == pytest.approx(a["mean_tpot_ms"], rel=1e-9)
    closed = "concurrency=1,isl=64,osl=8,requests=6"
    a = simulate_serving(node, MODEL, "tp=1,replicas=1", closed).metrics
    b = simulate_serving(node, MODEL, "tp=1,replicas=1,request_us=5000", closed).metrics
    assert b["duration_s"] - a["duration_s"] == pytest.approx(6 * 0.005, rel=1e-6)  # one turnaround per request
    assert b["mean_e2el_ms"] - a["mean_e2el_ms"] == pytest.approx(5.0, rel=1e-6)


def test_seq_us_prices_every_sampled_sequence_of_a_step() -> None:
    node = load_cluster(NODE)
    plan = ServingPlan.parse("tp=1,replicas=1,seq_us=1000,scheduler_us=300")
    cost = workers(node, wb.models.load_model(MODEL), plan)[0].cost
    base = workers(node, wb.models.load_model(MODEL), plan.with_(seq_us=0.0, scheduler_us=0.0))[0].cost
    for n in (1, 4, 16):
        want = base.step(n, 0.0, n * 100.0, n, True) + 0.0003 + n * 0.001
        assert cost.step(n, 0.0, n * 100.0, n, True) == pytest.approx(want, rel=1e-12)
        assert float(cost.step_seconds(n, 0.0, n * 100.0, n, True)) == pytest.approx(want, rel=1e-12)
    res = simulate_serving(node, MODEL, plan, "concurrency=1,isl=512,osl=65,requests=1")
    r = requests(res).iloc[0]  # the compiled scheduler prices steps as WorkerCost.step does
    prefill = cost.step(512, 512 * 256.0, 0.0, 1, False)
    decodes = sum(cost.step(1, 0.0, 512 + j + 1, 1, True) for j in range(64))
    assert math.isclose(r["e2el_s"], prefill + decodes, rel_tol=1e-9)


def test_host_terms_parse_and_reject_bad_values() -> None:
    p = ServingPlan.parse("tp=1,seq_us=250,request_us=4000")
    assert (p.seq_us, p.request_us) == (250.0, 4000.0) and "seq_us=250" in str(p)
    with pytest.raises(wb.WorkbenchError, match="plan.seq_us"):
        ServingPlan.parse("tp=1,seq_us=-1")
    with pytest.raises(wb.WorkbenchError, match="plan.request_us"):
        ServingPlan.parse("tp=1,request_us=nan")


def test_a_short_run_without_busy_periods_fits_the_step_durations(job) -> None:  # type: ignore[no-untyped-def]
    table = _table(job, 2e-3, 5e-4, 3.0).head(6)
    res = _measured(job, table, gap=0.0)
    mem = res.memory.assign(bytes=0)  # the worker idled after every step: no period is known
    f = fit(job, Result(res.events, mem, metrics={}, source="run", fidelity="measured", job=job))
    assert f["steps"] == 6
