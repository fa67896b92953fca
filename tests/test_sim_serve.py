"""The serving simulator: traffic, plans, the engine's invariants, disaggregation, the Job path, CLI, search,
presets and the validation table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.models import load_model
from workbench.models.costs import parameter_count
from workbench.serving import SLO, Serving, ServingPlan, Traffic
from workbench.sim.serve import requests, simulate_serving
from workbench.topology import load_cluster

NODE = "dgx-h100:nodes=1"


@pytest.fixture(scope="module")
def node():  # type: ignore[no-untyped-def]
    return load_cluster(NODE)


# ------------------------------------------------------------------ presets
PUBLISHED = {  # total parameters (billions) as their sources state them, and the tolerance of the comparison
    "llama3.1-8b": (8.03, 0.01),  # Dubey et al. 2024 Table 3 / HF model card
    "llama3.1-70b": (70.6, 0.01),
    "llama3.1-405b": (405.9, 0.01),
    "qwen3-32b": (32.8, 0.01),  # Qwen3 model card: 32.8B
    "qwen3-235b-a22b": (235.0, 0.01),
    "deepseek-v3": (671.0, 0.01),  # 671B main model (685B with the MTP module)
    "deepseek-r1": (671.0, 0.01),
    "kimi-k2": (1040.0, 0.02),  # 1.04T (Kimi K2 tech report)
    "gpt-oss-120b": (116.8, 0.01),  # OpenAI model card
    "mixtral-8x7b": (46.7, 0.01),  # Jiang et al. 2024
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_their_sources(name: str) -> None:
    want, tol = PUBLISHED[name]
    got = parameter_count(load_model(name)).total / 1e9
    assert abs(got / want - 1) <= tol, (name, got, want)
    assert load_model(name).source


# ------------------------------------------------------------------ traffic, plans, SLOs
def test_traffic_is_seeded_and_parses_every_mode(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = Traffic.parse("rate=4,dataset=conversation,requests=200,seed=3").draw()
    b = Traffic.parse("rate=4,dataset=conversation,requests=200,seed=3").draw()
    assert np.array_equal(a.isl, b.isl) and np.array_equal(a.arrival, b.arrival)
    assert np.all(np.diff(a.arrival) >= 0) and a.closed == 0
    # the mean gap is about 1/rate (Poisson); lengths follow the trace's median
    assert 0.15 < float(np.mean(np.diff(a.arrival))) < 0.4
    assert 700 < float(np.median(a.isl)) < 1400
    c = Traffic.parse("concurrency=16,isl=1024,osl=128,requests=64").draw()
    assert c.closed == 16 and set(c.isl.tolist()) == {1024}
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 5.0, "input_length": 10, "output_length": 3}\n'
                     '{"timestamp": 4.0, "input_length": 20, "output_length": 1}\n')
    t = Traffic.parse(f"trace={trace}").draw()
    assert t.arrival.tolist() == [0.0, 1.0] and t.isl.tolist() == [20, 10]
    assert Traffic.parse(Traffic.parse("rate=inf,isl=5,osl=5").spec()) == Traffic.parse("rate=inf,isl=5,osl=5")


@pytest.mark.parametrize("spec, field", [
    ("rate=-3,isl=4,osl=4", "traffic.rate"), ("rat=3", "traffic"), ("rate=3,isl=4,osl=4,requests=0", "traffic.requests"),
    ("concurrency=4,rate=2,isl=4,osl=4", "traffic.rate"), ("rate=2,dataset=nope", "traffic.dataset"),
    ("rate=2", "traffic.isl"), ("trace=/no/such/file", "traffic.trace"), ("rate=nan,isl=4,osl=4", "traffic.rate"),
])
def test_bad_traffic_names_the_field(spec: str, field: str) -> None:
    with pytest.raises(WorkbenchError, match=field.replace(".", r"\.")):
        Traffic.parse(spec)


def test_plans_and_slos_parse_and_reject_bad_values() -> None:
    p = ServingPlan.parse("tp=8,max_num_seqs=128,kv_cache_dtype=fp8,prefix_caching=0")
    assert (p.tp, p.max_seqs, p.kv_precision, p.prefix_caching) == (8, 128, "fp8", False)
    assert ServingPlan.parse(str(p)) == p
    for bad, field in [("tp=0", "plan.tp"), ("precision=fp7", "plan.precision"), ("foo=1", "plan"),
                       ("prefill_workers=1", "plan.prefill_workers"), ("max_seqs=512,max_tokens=256", "plan.max_tokens"),
                       ("mem_util=1.5", "plan.mem_util")]:
        with pytest.raises(WorkbenchError, match=field.replace(".", r"\.")):
            ServingPlan.parse(bad)
    assert SLO.parse("ttft=200,tpot=50").to_dict() == {"ttft": 200.0, "tpot": 50.0}
    with pytest.raises(WorkbenchError, match="slo"):
        SLO.parse("ttft=-1")


def test_impossible_plans_name_the_field_and_the_fix(node) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WorkbenchError, match=r"plan\.tp: 3-way .* 64 heads"):
        simulate_serving(node, "llama3.1-70b", "tp=3", "rate=1,isl=8,osl=8,requests=4")
    with pytest.raises(WorkbenchError, match=r"does not fit .* raise tp/pp, use precision=fp8"):
        simulate_serving(node, "llama3.1-405b", "tp=2", "rate=1,isl=8,osl=8,requests=4")
    with pytest.raises(WorkbenchError, match=r"plan\.replicas: .* need 16 GPUs; the cluster has 8"):
        simulate_serving(node, "llama3.1-8b", "tp=8,replicas=2", "rate=1,isl=8,osl=8,requests=4")
    with pytest.raises(WorkbenchError, match=r"plan\.precision: .*A100.* no fp8"):
        simulate_serving("dgx-a100:nodes=1", "llama3.1-8b", "precision=fp8", "rate=1,isl=8,osl=8,requests=4")
    with pytest.raises(WorkbenchError, match=r"plan\.ep"):
        simulate_serving(node, "llama3.1-8b", "ep=2,tp=2", "rate=1,isl=8,osl=8,requests=4")


# ------------------------------------------------------------------ the engine
def test_every_request_completes_with_consistent_latencies(node) -> None:  # type: ignore[no-untyped-def]
    res = simulate_serving(node, "llama3.1-70b", "tp=8", "rate=6,dataset=conversation,requests=400,seed=1",
                           "ttft=1000,tpot=60")
    m, r = res.metrics, requests(res)
    assert m["completed"] == 400 and m["failed"] == 0 and len(r) == 400
    assert (r["queue_s"] >= 0).all() and (r["ttft_s"] > 0).all() and (r["e2el_s"] >= r["ttft_s"]).all()
    tp = r["tpot_s"].dropna()
    assert math.isclose(m["mean_tpot_ms"], tp.mean() * 1e3, rel_tol=1e-9)
    # throughputs are totals over the benchmark's duration, as vllm bench serve defines them
    dur = float((r["arrival"] + r["e2el_s"]).max() - r["arrival"].min())
    assert math.isclose(m["output_throughput"], r["output_tokens"].sum() / dur, rel_tol=1e-9)
    assert math.isclose(m["total_token_throughput"], (r["output_tokens"] + r["input_tokens"]).sum() / dur, rel_tol=1e-9)
    assert 0 < m["request_goodput"] <= m["request_throughput"] + 1e-12
    for key in ("completed", "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "mean_itl_ms", "p99_e2el_ms", "peak_kv_usage", "preemptions", "sim_seconds"):
        assert key in m
    # step events tile each worker's busy time without overlap
    steps = res.events[res.events["op"].isin(["prefill", "decode", "mixed"])].sort_values("start")
    assert (steps["end"] > steps["start"]).all()
    assert (steps["start"].to_numpy()[1:] >= steps["end"].to_numpy()[:-1] - 1e-12).all()
    kv = res.memory[res.memory["category"] == "kv_cache"]
    assert len(kv) and (kv["bytes"] <= kv["capacity"] * 1.0001).all()
    # the TP all-reduces load every GPU's NVSwitch link, within its capacity
    assert res.links["link"].str.contains("nvsw").sum() > 0
    assert ((res.links["utilisation"] > 0) & (res.links["utilisation"] <= 1)).all()


def test_one_request_decodes_at_the_cost_models_step_time(node) -> None:  # type: ignore[no-untyped-def]
    from workbench.sim.serve import workers

    res = simulate_serving(node, "llama3.1-8b", "tp=1,replicas=1", "concurrency=1,isl=512,osl=65,requests=1")
    r = requests(res).iloc[0]
    cost = workers(node, load_model("llama3.1-8b"), ServingPlan.parse("tp=1,replicas=1"))[0].cost
    prefill = cost.step(512, 512 * 256.0, 0.0, 1, False)
    decodes = sum(cost.step(1, 0.0, 512 + j + 1, 1, True) for j in range(64))
    assert math.isclose(r["ttft_s"], prefill, rel_tol=1e-9)
    assert math.isclose(r["e2el_s"], prefill + decodes, rel_tol=1e-9)


def test_requests_longer_than_the_context_or_the_pool_fail(node) -> None:  # type: ignore[no-untyped-def]
    m = simulate_serving(node, "llama3-70b", "tp=8,max_model_len=8192", "rate=2,isl=8000,osl=500,requests=5").metrics
    assert m["failed"] == 5 and m["completed"] == 0
    m = simulate_serving(node, "llama3.1-8b", "tp=1,replicas=1,mem_util=0.25", "rate=2,isl=120000,osl=8,requests=3").metrics
    assert m["failed"] == 3


def test_closed_loop_keeps_at_most_concurrency_requests_in_flight(node) -> None:  # type: ignore[no-untyped-def]
    res = simulate_serving(node, "llama3.1-8b", "tp=1,replicas=1", "concurrency=8,isl=256,osl=32,requests=80")
    r = requests(res)
    start, end = r["arrival"].to_numpy(), (r["arrival"] + r["e2el_s"]).to_numpy()
    for t in np.linspace(0, end.max(), 200):
        assert ((start <= t) & (end > t)).sum() <= 8
    assert (r["arrival"] > 0).sum() == 72  # every later request is sent when an earlier one finishes


def test_more_load_means_longer_waits(node) -> None:  # type: ignore[no-untyped-def]
    lo = simulate_serving(node, "llama3.1-70b", "tp=8", "rate=2,dataset=conversation,requests=300").metrics
    hi = simulate_serving(node, "llama3.1-70b", "tp=8", "rate=40,dataset=conversation,requests=300").metrics
    assert hi["mean_ttft_ms"] > lo["mean_ttft_ms"] and hi["mean_tpot_ms"] > lo["mean_tpot_ms"]
    assert hi["request_throughput"] > lo["request_throughput"]


def test_kv_pressure_preempts_and_both_modes_finish(node) -> None:  # type: ignore[no-untyped-def]
    out = {}
    tr = "rate=inf,isl=2000,osl=1000,requests=120"  # 360k tokens: over the KV pool at mem_util=0.5, under at 0.9
    for mode in ("recompute", "swap"):
        res = simulate_serving(node, "llama3.1-70b", f"tp=4,replicas=1,mem_util=0.5,max_seqs=512,preemption={mode}", tr)
        out[mode] = res.metrics
        assert res.metrics["completed"] == 120 and res.metrics["preemptions"] > 0
        assert 0.9 < res.metrics["peak_kv_usage"] <= 1.0
    roomy = simulate_serving(node, "llama3.1-70b", "tp=4,replicas=1,max_seqs=512", tr).metrics
    assert roomy["kv_capacity_tokens"] > 360_000
    assert roomy["preemptions"] == 0 and roomy["output_throughput"] > out["recompute"]["output_throughput"]


def test_guaranteed_no_evict_never_preempts(node) -> None:  # type: ignore[no-untyped-def]
    tr = "rate=inf,isl=2000,osl=1000,requests=120"
    m = simulate_serving(node, "llama3.1-70b", "tp=4,replicas=1,mem_util=0.5,max_seqs=512,policy=guaranteed_no_evict",
                         tr).metrics
    assert m["completed"] == 120 and m["preemptions"] == 0 and m["peak_kv_usage"] <= 1.0


def test_prefix_caching_hits_and_shortens_prefill(node) -> None:  # type: ignore[no-untyped-def]
    tr = "rate=10,isl=3000,osl=50,prefix=2048,requests=200"
    on = simulate_serving(node, "llama3.1-8b", "tp=1,replicas=1", tr).metrics
    off = simulate_serving(node, "llama3.1-8b", "tp=1,replicas=1,prefix_caching=0", tr).metrics
    assert on["prefix_cache_hit_rate"] > 0.5 and off["prefix_cache_hit_rate"] == 0
    assert on["mean_ttft_ms"] < off["mean_ttft_ms"]


def test_chunked_prefill_off_and_cuda_graphs_off_change_what_they_should(node) -> None:  # type: ignore[no-untyped-def]
    tr = "rate=6,dataset=conversation,requests=300,seed=2"
    base = simulate_serving(node, "llama3.1-70b", "tp=8", tr).metrics
    nochunk = simulate_serving(node, "llama3.1-70b", "tp=8,chunked_prefill=0", tr).metrics
    assert nochunk["p99_itl_ms"] > base["p99_itl_ms"]  # whole prompts stall the decodes
    # a small model decodes faster than the host launches its kernels one by one: graphs pay off
    small = "gpt:layers=24,hidden=1024,heads=16,vocab=32000,seq=4096"
    graph = simulate_serving(node, small, "tp=1,replicas=1", "concurrency=4,isl=128,osl=64,requests=16").metrics
    eager = simulate_serving(node, small, "tp=1,replicas=1,cuda_graph=0", "concurrency=4,isl=128,osl=64,requests=16").metrics
    assert eager["median_itl_ms"] > 1.2 * graph["median_itl_ms"]


def test_pipeline_and_moe_plans_run(node) -> None:  # type: ignore[no-untyped-def]
    pp = simulate_serving(node, "llama3.1-70b", "tp=4,pp=2", "rate=4,dataset=conversation,requests=100").metrics
    moe = simulate_serving(node, "mixtral-8x7b", "tp=2,ep=2", "rate=4,dataset=conversation,requests=100").metrics
    mla = simulate_serving("dgx-h100:nodes=2", "deepseek-v3", "tp=16,ep=16,dp=16,precision=fp8",
                           "rate=4,dataset=conversation,requests=100").metrics
    for m in (pp, moe, mla):
        assert m["completed"] == 100 and m["mean_tpot_ms"] > 0


def test_mixed_hardware_cluster_simulates() -> None:
    res = simulate_serving("mixed:nodes=2", "llama3.1-8b", "tp=2", "rate=2,dataset=conversation,scale=0.2,requests=60")
    assert res.metrics["completed"] == 60
    assert res.events["device"].astype(str).str.startswith("n").any()


# ------------------------------------------------------------------ disaggregated
def test_disaggregated_moves_kv_over_the_links_and_counts_it_in_ttft() -> None:
    cl = load_cluster("aws-p5en:nodes=2")
    res = simulate_serving(cl, "llama3.1-70b", "prefill_workers=1,prefill_tp=8,decode_workers=1,decode_tp=8",
                           "rate=4,dataset=conversation,requests=150")
    m, ev = res.metrics, res.events
    assert m["completed"] == 150 and m["num_gpus"] == 16
    kv = ev[ev["op"] == "kv_transfer"]
    assert len(kv) == 150 and (kv["end"] >= kv["start"]).all()
    per_token = 2 * 8 * 128 * 2 * 80  # K and V, 8 KV heads of 128, bf16, 80 layers
    r = requests(res)
    assert (kv["bytes"].to_numpy() == r["input_tokens"].to_numpy() * per_token).all()
    assert not res.links.empty and res.links["link"].str.contains("nic").any()
    assert (res.links["utilisation"] <= 1.0).all()
    # the first token comes after the KV landed
    assert (r["ttft_s"].to_numpy() + r["arrival"].to_numpy() >= kv["end"].to_numpy() - 1e-9).all()
    # a closed loop converges to a consistent schedule
    closed = simulate_serving(cl, "llama3.1-70b", "prefill_workers=1,prefill_tp=8,decode_workers=1,decode_tp=8",
                              "concurrency=16,isl=1000,osl=100,requests=96").metrics
    assert closed["completed"] == 96


# ------------------------------------------------------------------ the job, the trace, the CLI, the search
def test_job_path_round_trip_and_perfetto(tmp_path) -> None:  # type: ignore[no-untyped-def]
    job = wb.Job.create(NODE, "llama3.1-8b", plan="tp=1,replicas=2",
                        workload=Serving(traffic="concurrency=4,isl=128,osl=16,requests=16", slo="ttft=500"))
    assert job.kind == "serving"
    again = wb.Job.from_dict(json.loads(job.dumps("json")))
    assert again.plan == job.plan and again.workload == job.workload
    res = wb.simulate(job)
    assert res.metrics["completed"] == 16 and res.job is job
    path = res.to_perfetto(tmp_path / "t.json")
    names = {e["name"] for e in json.loads(path.read_text())["traceEvents"]}
    assert {"request", "prefill", "decode"} <= names


def test_cli_json_and_exit_codes(cli, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = cli("simulate", "serve", "--cluster", NODE, "--model", "llama3.1-8b", "--plan", "tp=1,replicas=1",
              "--traffic", "rate=5,isl=256,osl=32,requests=50", "--slo", "ttft=500,tpot=50", "--json",
              "--requests-csv", str(tmp_path / "r.csv"))
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    assert m["completed"] == 50 and "request_goodput" in m and "sim_seconds" in m
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 51
    for bad in (["--plan", "tp=3"], ["--traffic", "rate=-1"], ["--traffic", "rate=1,isl=8,osl=8,bogus=1"]):
        args = ["simulate", "serve", "--cluster", NODE, "--model", "llama3.1-70b", "--plan", "tp=8",
                "--traffic", "rate=1,isl=8,osl=8,requests=4"]
        k = args.index(bad[0])
        args[k + 1] = bad[1]
        r = cli(*args)
        assert r.returncode == 2 and "error" in r.stderr.lower()


def test_search_ranks_by_goodput_and_gives_reasons(node) -> None:  # type: ignore[no-untyped-def]
    from workbench.sim.serve_search import search_serving

    df = search_serving(node, "llama3.1-70b", "rate=6,dataset=conversation,requests=200", "ttft=2000,tpot=100",
                        requests=120)
    assert df.attrs["evaluated"] == len(df) > 20
    ok = df[df["ok"]]
    assert len(ok) and (ok["goodput_per_gpu"].diff().dropna() <= 1e-12).all()
    bad = df[~df["ok"]]
    assert bad["reason"].str.contains("does not fit").any()
    assert (bad["reason"].str.len() > 0).all()
    assert {"colocated", "disaggregated"} <= set(df["mode"])


# ------------------------------------------------------------------ validation (reported, never fitted)
@pytest.mark.slow
def test_validation_table_is_computed_within_a_loose_bound() -> None:
    from workbench.sim.serve_validation import validation_table

    df = validation_table(requests=600)
    assert len(df) >= 9 and df["predicted_tok_s"].gt(0).all()
    # a sanity bound, not a fit: every prediction within a factor of 3 of the published measurement
    assert ((df["predicted_tok_s"] / df["measured_tok_s"]).between(1 / 3, 3)).all(), df


def test_a_mixed_gpu_placement_simulates_stage_by_stage() -> None:
    from workbench.plan.placement import Placement
    from workbench.sim.serve_placement import simulate_placement

    cl = "mixed:nodes=2"  # a node of 4 RTX 3090s and a node of 8 A100s on 10 GbE
    pl = Placement.from_dict({"model": "llama3.1-8b", "num_layers": 32, "replicas": [
        {"weight": 1, "stages": [{"devices": ["n0.g0", "n0.g1"], "layers": [0, 11]},
                                 {"devices": ["n1.g0", "n1.g1"], "layers": [12, 31]}]},
        {"weight": 3, "stages": [{"devices": ["n1.g2", "n1.g3"], "layers": [0, 31]}]}]})
    res = simulate_placement(cl, "llama3.1-8b", pl, "rate=4,dataset=conversation,scale=0.3,requests=200")
    m = res.metrics
    assert m["completed"] == 200 and m["num_gpus"] == 6
    r = requests(res)
    assert set(r["worker"]) == {"replica0", "replica1"}
    assert abs((r["worker"] == "replica1").mean() - 0.75) < 0.02
    # the pipeline across the 10 GbE hop is slower per token than the A100 pair
    tpot = r.groupby("worker")["tpot_s"].mean()
    assert tpot["replica0"] > tpot["replica1"]
    with pytest.raises(WorkbenchError, match="stage 0"):
        bad = Placement.from_dict({"model": "llama3.1-70b", "num_layers": 80, "replicas": [
            {"stages": [{"devices": ["n0.g0"], "layers": [0, 79]}]}]})
        simulate_placement(cl, "llama3.1-70b", bad, "rate=1,isl=8,osl=8,requests=4")
