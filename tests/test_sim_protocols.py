"""The simulator's protocol parameters include the transport's measured CUDA IPC rows, and a KV transfer
priced over `cuda_ipc` uses exactly those rows."""

from __future__ import annotations

import math

import pytest

from workbench.data import read_csv
from workbench.errors import WorkbenchError
from workbench.sim import NetParams, write
from workbench.sim.p2p import route
from workbench.sim.params import PROTOCOL_PARAMS, PROTOCOLS
from workbench.topology import load_cluster


def _rows(scope: str) -> dict[str, float]:
    df = read_csv("net_params.csv")
    sel = df[df["scope"] == scope]
    assert (sel["source"].astype(str).str.strip().str.len() > 0).all(), f"{scope}: every row needs a source"
    return {str(r["param"]): float(r["value"]) for r in sel.to_dict("records")}


@pytest.mark.parametrize("proto", ["cuda_ipc", "cuda_ipc-local", "tcp-engine"])
def test_cuda_ipc_rows_are_protocols_with_sources(proto: str) -> None:
    assert proto in PROTOCOLS
    rows = _rows(proto)
    assert set(PROTOCOL_PARAMS) <= set(rows), f"{proto}: missing {set(PROTOCOL_PARAMS) - set(rows)}"
    pp = NetParams.default().protocol(proto)
    for k in PROTOCOL_PARAMS:
        assert getattr(pp, k) == pytest.approx(rows[k]), k
    assert "measured" in NetParams.default().source(proto, "latency_us")


def _closed_form(rows: dict[str, float], lane_GBps: float, wire_us: float, pages: int, page: int) -> float:
    """One paged write over one lane, from the rows alone: latency + wire + posting + the p-norm of the
    op-rate and bandwidth limits."""
    t_ops = pages / (rows["op_rate_M"] * 1e6)
    t_bytes = pages * page / (rows["bw_efficiency"] * lane_GBps * 1e9)
    p = rows["overlap_p"]
    hi, lo = max(t_ops, t_bytes), min(t_ops, t_bytes)
    return hi * (1 + (lo / hi) ** p) ** (1 / p) + (rows["latency_us"] + wire_us + rows["post_us_per_peer"]) * 1e-6


def test_kv_transfer_priced_over_cuda_ipc_uses_its_rows() -> None:
    c = load_cluster("dgx-h100:nodes=1")
    src, dst = "n0.g0", "n0.g1"
    lane = route(c, src, dst).lanes[0]
    pages, page = 256, 32 << 10  # a paged layer write of 256 x 32 KiB KV blocks
    est = write(c, src, dst, pages=pages, page_bytes=page, protocol="cuda_ipc")
    assert est.protocol == "cuda_ipc" and est.messages == pages
    assert est.seconds == pytest.approx(_closed_form(_rows("cuda_ipc"), lane.GBps, lane.latency_us, pages, page))
    # the link's own protocol is what the route prices without the override, and it differs
    nv = write(c, src, dst, pages=pages, page_bytes=page)
    assert nv.protocol == "nvlink" and not math.isclose(nv.seconds, est.seconds, rel_tol=1e-3)
    # change a cuda_ipc row: the price follows it (the rows are read, not copied)
    p = NetParams.default()
    slower = p.replace({("cuda_ipc", "latency_us"): p.protocol("cuda_ipc").latency_us + 1000.0}, source="test")
    again = write(c, src, dst, pages=pages, page_bytes=page, protocol="cuda_ipc", params=slower)
    assert again.seconds == pytest.approx(est.seconds + 1e-3)


def test_unknown_protocol_names_the_known_ones() -> None:
    c = load_cluster("dgx-h100:nodes=1")
    with pytest.raises(WorkbenchError, match="cuda_ipc"):
        write(c, "n0.g0", "n0.g1", 4096, protocol="carrier-pigeon")


def test_serving_plan_kv_transport_prices_the_hand_off_with_the_backends_rows() -> None:
    from workbench.serving import ServingPlan
    from workbench.sim.serve import kv_protocol, simulate_serving

    assert kv_protocol("tcp", "a", "b") == "tcp-engine"
    assert kv_protocol("cuda_ipc", "a", "b") == "cuda_ipc" and kv_protocol("cuda_ipc", "a", "a") == "cuda_ipc-local"
    assert kv_protocol("", "a", "b") is None
    with pytest.raises(WorkbenchError, match="plan.kv_transport"):
        ServingPlan.parse("prefill_workers=1,decode_workers=1,kv_transport=rdma")
    plan = "prefill_workers=1,prefill_tp=1,decode_workers=1,decode_tp=1"
    traffic = "concurrency=2,isl=512,osl=8,requests=8"
    kv = {}
    for t in ("", "cuda_ipc"):
        res = simulate_serving("dgx-h100:nodes=1", "llama3.1-8b", plan + (f",kv_transport={t}" if t else ""), traffic)
        ev = res.events[res.events["op"] == "kv_transfer"]
        kv[t] = float((ev["end"] - ev["start"]).median())
    # NVLink's own rows against the transport's measured cuda_ipc rows (74 us fixed per write over NVLink)
    assert kv["cuda_ipc"] > kv[""]


def test_a_served_job_uses_its_plans_kv_transport(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import workbench as wb
    from workbench.serve import runner
    from workbench.serving import Serving

    seen: dict = {}
    monkeypatch.setattr(runner, "start", lambda *a, **k: seen.update(args=a, kw=k))
    job = wb.Job.create("dgx-h100:nodes=1", "llama3.1-8b", plan="prefill_workers=1,decode_workers=1,kv_transport=cuda_ipc",
                        workload=Serving(traffic="concurrency=1,isl=16,osl=4,requests=2"))
    runner.start_job(job)
    assert seen["args"][2] == "disaggregated" and seen["kw"]["transport"] == "cuda_ipc"
    runner.start_job(job, transport="tcp")  # an explicit option wins
    assert seen["kw"]["transport"] == "tcp"
