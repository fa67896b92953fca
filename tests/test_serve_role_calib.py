"""Serving calibration per worker role, the measured KV hand-off, and the front end as a mechanism of the
simulator (issue 16). No server here: synthetic measured Results shaped like the runner's, and the simulator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import workbench as wb
from workbench.result import Result, events_frame, memory_frame
from workbench.serve.calibrate import _price, calibrate_job, kv_handoff, rated, steps
from workbench.serving import Serving, ServingPlan
from workbench.sim.serve import requests, simulate_serving, workers
from workbench.topology import load_cluster

NODE = "dgx-h100:nodes=1"
MODEL = "llama3.1-8b"
PRE = (9e-3, 2e-3)   # prefill worker: per step, per sequence (s)
DEC = (1e-3, 4e-4)   # decode worker
K = 2.0              # the rate factor both share


@pytest.fixture(scope="module")
def job():  # type: ignore[no-untyped-def]
    return wb.Job.create(NODE, MODEL, plan="prefill_workers=1,decode_workers=1,tp=1,cuda_graph=false",
                         workload=Serving(traffic="concurrency=4,isl=64,osl=16,requests=8"))


def _disaggregated_run(job, tail: float = 0.0, per_byte: float = 0.0):  # type: ignore[no-untyped-def]
    """Prefill steps on rank 0 (isolated, as a prefill worker mostly runs), decode steps back to back on rank 1,
    KV transfers that end `tail + per_byte · layer bytes` after the prefill step that issued them."""
    ev, mem, t = [], [], 0.0
    layers = job.model.layers
    pre = [(64 * n, n) for n in (1, 2, 1, 3, 1, 2, 4, 1)]
    for i, (tok, n) in enumerate(pre):
        dur = PRE[0] + PRE[1] * n + float(_price(job, np.array([tok]), np.array([n]), "prefill", rate=K)[0])
        ev.append({"rank": 0, "device": "cpu", "kind": "compute", "op": "prefill", "bytes": 0, "links": (),
                   "start": t, "end": t + dur, "batch_seqs": n, "batch_tokens": tok})
        mem.append({"rank": 0, "category": "kv_cache", "bytes": 4096, "time": t + dur})  # held while the KV is in flight
        nbytes = (64 + 64 * (i % 3)) * 2 * 8 * 128 * 2 * layers  # prompts of 64..192 tokens, bf16 KV
        ev.append({"rank": 0, "device": "cpu", "kind": "transfer", "op": "kv_transfer", "bytes": nbytes,
                   "links": ("prefill-0->decode-0",), "start": t + dur / 2,
                   "end": t + dur + tail + per_byte * nbytes / layers})
        ev.append({"rank": -1, "device": "client", "kind": "compute", "op": "request", "bytes": 0, "links": (),
                   "start": t, "end": t + 1.0, "ttft": 0.05, "prompt_tokens": 64 + 64 * (i % 3)})
        t += dur + 0.05  # idle between prompts
    t = 0.0
    seqs = np.tile(np.array([1, 2, 3, 4, 6, 8]), 4)
    for i, n in enumerate(seqs):
        dur = DEC[0] + DEC[1] * n + float(_price(job, np.array([n]), np.array([n]), "decode", rate=K)[0])
        ev.append({"rank": 1, "device": "cpu", "kind": "compute", "op": "decode", "bytes": 0, "links": (),
                   "start": t, "end": t + dur, "batch_seqs": int(n), "batch_tokens": int(n)})
        mem.append({"rank": 1, "category": "kv_cache", "bytes": 0 if i == len(seqs) - 1 else 4096, "time": t + dur})
        t += dur
    return Result(events_frame(ev), memory_frame(mem), metrics={}, source="run", fidelity="measured", job=job)


def test_each_role_is_fitted_on_its_own_workers_steps(job) -> None:  # type: ignore[no-untyped-def]
    """The prefill worker's steps price prefill, the decode worker's price decode (before: rank 0's steps, the
    prefill worker's, priced every step, and TPOT after calibration was +707 % in notebook 07)."""
    measured = _disaggregated_run(job)
    st = steps(measured, job)
    assert set(st["role"]) == {"prefill", "decode"}
    cal, f = calibrate_job(job, measured)
    assert f["rate_factor"] == pytest.approx(K, rel=0.05)
    ws = {w.role: w.cost for w in workers(cal.cluster, cal.model, cal.plan)}
    base = {w.role: w.cost for w in workers(rated(job.cluster, K), job.model, job.plan.with_(replicas=1))}
    for n in (1, 4, 8):  # a decode step of n sequences as the decode worker ran it
        want = DEC[0] + DEC[1] * n + base["decode"].step(n, 0.0, 0.0, n, False)
        assert ws["decode"].step(n, 0.0, 0.0, n, False) == pytest.approx(want, rel=0.05)
    want = PRE[0] + PRE[1] * 2 + base["prefill"].step(128, 0.0, 0.0, 2, False)
    assert ws["prefill"].step(128, 0.0, 0.0, 2, False) == pytest.approx(want, rel=0.05)
    assert cal.plan.host("decode") == pytest.approx((DEC[0] * 1e6, DEC[1] * 1e6), rel=0.05)


def test_a_colocated_run_keeps_one_role(job) -> None:  # type: ignore[no-untyped-def]
    colo = job.with_plan("tp=1,replicas=1,cuda_graph=false")
    m = _disaggregated_run(job)
    ev = m.events[m.events["rank"] != 0]  # the decode worker's steps alone, as a colocated worker's
    mem = m.memory[m.memory["rank"] == 1].assign(rank=0)
    res = Result(ev.assign(rank=ev["rank"].where(ev["rank"] < 0, 0)), mem, metrics={}, source="run",
                 fidelity="measured", job=colo)
    cal, f = calibrate_job(colo, res)
    assert set(steps(res, colo)["role"]) == {"colocated"}
    assert f["scheduler_us"] == pytest.approx(DEC[0] * 1e6, rel=0.1) and cal.plan.prefill_scheduler_us is None


def test_kv_handoff_is_measured_and_priced(job) -> None:  # type: ignore[no-untyped-def]
    measured = _disaggregated_run(job, tail=2e-3, per_byte=1 / 0.5e9)  # 2 ms + bytes at 0.5 GB/s per layer write
    kv = kv_handoff(job, measured)
    assert kv["kv_transfers"] == 8
    assert kv["kv_us"] == pytest.approx(2000, rel=0.05)
    assert kv["kv_GBps"] == pytest.approx(0.5 * kv["kv_bytes_ratio"], rel=0.05)
    assert kv["kv_bytes_ratio"] == pytest.approx(1.0, rel=0.3)  # same bf16 KV, pages rounded up
    cal, _ = calibrate_job(job, measured)
    assert cal.plan.kv_us == pytest.approx(kv["kv_us"]) and cal.plan.kv_GBps == pytest.approx(kv["kv_GBps"])


def test_measured_kv_terms_price_the_handoff() -> None:
    node = load_cluster("dgx-h100:nodes=1")
    plan = "prefill_workers=1,decode_workers=1,tp=1"
    spread = "concurrency=1,isl=256,osl=4,requests=4"  # nothing queues
    base = simulate_serving(node, MODEL, plan + ",kv_us=0", spread).metrics
    slow = simulate_serving(node, MODEL, plan + ",kv_us=5000", spread).metrics
    assert slow["mean_ttft_ms"] - base["mean_ttft_ms"] == pytest.approx(5.0, rel=1e-6)  # the last layer's write
    bw = simulate_serving(node, MODEL, plan + ",kv_us=0,kv_GBps=10", spread).metrics
    layer = 256 * 2 * 8 * 128 * 2  # one layer's KV of a 256-token prompt, bf16: the other layers' hide behind prefill
    assert bw["mean_ttft_ms"] - base["mean_ttft_ms"] == pytest.approx(layer / 10e9 * 1e3, rel=1e-3)
    slow = simulate_serving(node, MODEL, plan + ",kv_us=0,kv_GBps=0.01", spread).metrics
    assert slow["mean_ttft_ms"] - base["mean_ttft_ms"] > 0.9 * 32 * layer / 0.01e9 * 1e3 * 31 / 32  # bandwidth-bound


def test_frontend_delivery_adds_its_work_to_ttft_not_tpot() -> None:
    node = load_cluster(NODE)
    spread = "concurrency=1,isl=64,osl=8,requests=6"  # one at a time: no backlog in the front end
    a = simulate_serving(node, MODEL, "tp=1,replicas=1", spread).metrics
    b = simulate_serving(node, MODEL, "tp=1,replicas=1,fe_token_us=300,fe_step_us=200", spread).metrics
    assert b["mean_ttft_ms"] - a["mean_ttft_ms"] == pytest.approx(0.5, rel=1e-6)
    assert b["mean_tpot_ms"] == pytest.approx(a["mean_tpot_ms"], rel=1e-6)


def test_a_saturated_frontend_bounds_throughput() -> None:
    """Streaming tokens at 2 ms each caps output at 500 tok/s however fast the engine is."""
    node = load_cluster(NODE)
    traffic = "concurrency=32,isl=64,osl=64,requests=64"
    free = simulate_serving(node, MODEL, "tp=1,replicas=1", traffic).metrics
    fe = simulate_serving(node, MODEL, "tp=1,replicas=1,fe_token_us=2000", traffic).metrics
    assert free["output_throughput"] > 2000
    assert fe["output_throughput"] == pytest.approx(500, rel=0.05)
    assert fe["mean_tpot_ms"] > 5 * free["mean_tpot_ms"]


def test_a_busy_frontend_slows_the_engine_steps() -> None:
    node = load_cluster(NODE)
    traffic = "concurrency=32,isl=64,osl=64,requests=64"
    plan = "tp=1,replicas=1,scheduler_us=2000,fe_token_us=1000"  # the front end is busy through every step
    a = simulate_serving(node, MODEL, plan, traffic)
    b = simulate_serving(node, MODEL, plan + ",fe_slowdown=0.5", traffic)
    da = a.events[a.events["op"] == "decode"]
    db = b.events[b.events["op"] == "decode"]
    ratio = float((db["end"] - db["start"]).median() / (da["end"] - da["start"]).median())
    assert ratio == pytest.approx(1.5, rel=0.02)


def test_requests_wait_behind_the_frontend_on_their_way_in() -> None:
    """Four requests sent at once, 50 ms of front-end work each: they reach the engine 50 ms apart."""
    node = load_cluster(NODE)
    res = simulate_serving(node, MODEL, "tp=1,replicas=1,fe_request_us=50000", "rate=inf,isl=16,osl=2,requests=4")
    r = requests(res).sort_values("queue_s")
    assert r["queue_s"].to_numpy() == pytest.approx([0.0, 0.05, 0.10, 0.15], abs=1e-9)  # the first's is in request_us
    # one front end, first come first served: the requests that arrived before a token are taken in before it is
    # streamed, so the first three tokens wait for the last request's intake
    assert r["ttft_s"].to_numpy()[:3] == pytest.approx([0.15, 0.15, 0.15], abs=1e-9)
    assert 0.15 < r["ttft_s"].iloc[3] < 0.17


def test_the_frontend_finishes_a_request_after_its_last_token() -> None:
    """A closed-loop client at concurrency 1: 50 ms of front-end work after each request's last token delays the
    client's next send by that much (it reads its stream to the end first), and no request's latencies."""
    node = load_cluster(NODE)
    traffic = "concurrency=1,isl=16,osl=2,requests=3"
    base = requests(simulate_serving(node, MODEL, "tp=1,replicas=1,fe_token_us=1", traffic)).sort_values("request")
    fin = requests(simulate_serving(node, MODEL, "tp=1,replicas=1,fe_token_us=1,fe_finish_us=50000", traffic))
    fin = fin.sort_values("request")
    assert fin["arrival"].to_numpy() - base["arrival"].to_numpy() == pytest.approx([0.0, 0.05, 0.10], abs=1e-9)
    assert fin["ttft_s"].to_numpy() == pytest.approx(base["ttft_s"].to_numpy(), rel=1e-9)
    assert fin["tpot_s"].to_numpy() == pytest.approx(base["tpot_s"].to_numpy(), rel=1e-9)


def test_the_frontends_work_off_the_path_delays_only_what_queues_behind_it() -> None:
    """50 ms of per-request front-end work queued as each request reaches the engine: one request at a time with
    steps longer than that sees none of it; four sent at once reach the engine 50 ms apart."""
    node = load_cluster(NODE)
    one = "concurrency=1,isl=16,osl=2,requests=3"
    plan = "tp=1,replicas=1,fe_token_us=1,scheduler_us=60000"  # every step outlasts the 50 ms
    base = requests(simulate_serving(node, MODEL, plan, one)).sort_values("request")
    off = requests(simulate_serving(node, MODEL, plan + ",fe_async_us=50000", one)).sort_values("request")
    assert off["ttft_s"].to_numpy() == pytest.approx(base["ttft_s"].to_numpy(), rel=1e-9)
    assert off["arrival"].to_numpy() == pytest.approx(base["arrival"].to_numpy(), abs=1e-9)
    burst = requests(simulate_serving(node, MODEL, "tp=1,replicas=1,fe_request_us=1,fe_async_us=50000",
                                      "rate=inf,isl=16,osl=2,requests=4")).sort_values("queue_s")
    assert burst["queue_s"].to_numpy() == pytest.approx([0.0, 0.05, 0.10, 0.15], abs=1e-5)


def test_calibrating_with_a_measured_frontend(job) -> None:  # type: ignore[no-untyped-def]
    colo = job.with_plan("tp=1,replicas=1,cuda_graph=false")
    m = _disaggregated_run(job)
    ev = m.events[m.events["rank"] != 0]
    res = Result(ev.assign(rank=ev["rank"].where(ev["rank"] < 0, 0)), m.memory[m.memory["rank"] == 1].assign(rank=0),
                 metrics={}, source="run", fidelity="measured", job=colo)
    micro = steps(res, colo)[["tokens", "seqs", "period"]].dropna()
    fe = {"fe_request_us": 3000.0, "fe_token_us": 100.0, "fe_step_us": 400.0, "fe_slowdown": 0.0}
    cal, f = calibrate_job(colo, res, micro=micro, overheads={"request_us": 9000.0, "server_request_us": 1.0}, frontend=fe)
    assert cal.plan.request_us == pytest.approx(9000 - 400 - 100)  # the first token's front-end work is the model's
    assert (cal.plan.fe_request_us, cal.plan.fe_token_us, cal.plan.fe_step_us) == (3000.0, 100.0, 400.0)
    assert f["contention"] == pytest.approx(1.0, rel=1e-6)
    assert cal.plan.fe_finish_us == 0.0  # all of it fits inside the hop of a request alone
    # more CPU per request than a request alone takes on its way in: the rest follows its last token
    split, h = calibrate_job(colo, res, micro=micro, overheads={"request_us": 2500.0, "server_request_us": 1.0},
                             frontend=fe)
    assert (split.plan.request_us, split.plan.fe_request_us, split.plan.fe_finish_us) == (2000.0, 2000.0, 1000.0)
    assert split.plan.fe_async_us == 0.0
    # a client measured to send its next request 300 us after a last token: the rest is off every request's path
    turn, _ = calibrate_job(colo, res, micro=micro, frontend=fe,
                            overheads={"request_us": 2500.0, "server_request_us": 1.0, "turnaround_us": 300.0})
    assert (turn.plan.fe_request_us, turn.plan.fe_finish_us, turn.plan.fe_async_us) == (2000.0, 300.0, 700.0)
    slowed, g = calibrate_job(colo, res, micro=micro, overheads={"request_us": 9000.0, "server_request_us": 1.0},
                              frontend=fe | {"fe_slowdown": 1.0, "fe_token_us": 3000.0})
    assert g["fe_mean_slowdown"] > 1.05  # the run's steps were partly the front end's doing
    assert g["contention"] == pytest.approx(1.0 / g["fe_mean_slowdown"], rel=0.1)
    assert slowed.plan.scheduler_us < cal.plan.scheduler_us


def test_plan_role_and_frontend_terms_parse_and_reject_bad_values() -> None:
    p = ServingPlan.parse("prefill_workers=1,decode_workers=1,decode_scheduler_us=250,kv_us=80,kv_GBps=1.5,"
                          "fe_token_us=40,fe_slowdown=0.3")
    assert p.host("decode") == (250.0, 0.0) and p.host("prefill") == (0.0, 0.0)
    assert (p.kv_us, p.kv_GBps, p.fe_token_us, p.fe_slowdown) == (80.0, 1.5, 40.0, 0.3)
    assert ServingPlan.parse(p.to_dict()) == p and ServingPlan.parse(str(p)) == p
    with pytest.raises(wb.WorkbenchError, match="plan.kv_GBps"):
        ServingPlan.parse("tp=1,kv_GBps=0")
    with pytest.raises(wb.WorkbenchError, match="plan.fe_token_us"):
        ServingPlan.parse("tp=1,fe_token_us=-3")
    with pytest.raises(wb.WorkbenchError, match="plan.decode_seq_us"):
        ServingPlan.parse("tp=1,decode_seq_us=nan")


def test_steps_table_has_a_role_per_worker(job) -> None:  # type: ignore[no-untyped-def]
    st = steps(_disaggregated_run(job), job)
    assert isinstance(st, pd.DataFrame)
    pre, dec = st[st["role"] == "prefill"], st[st["role"] == "decode"]
    assert pre["period"].notna().all() and np.allclose(pre["period"], pre["seconds"])
    assert dec["period"].notna().sum() == len(dec) - 1


def test_turnarounds_are_the_gaps_from_a_last_token_to_the_next_send() -> None:
    import pandas as pd

    from workbench.serve.microbench import _turnarounds

    rows = pd.DataFrame({"start": [0.0, 0.5, 0.2], "e2el": [0.1, 0.1, 0.2], "success": [True, True, True]})
    assert _turnarounds(rows) == pytest.approx([0.1, 0.1])
    failed = rows.assign(success=[True, False, True])
    assert _turnarounds(failed) == pytest.approx([0.1])

