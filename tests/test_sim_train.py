"""Training-step simulator: schedule, compute model, metrics, memory, CPU clusters, CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.models import load_model
from workbench.plan import Plan, parse_plan
from workbench.plan.search import simulate_train
from workbench.sim.train import TrainContext, evaluate
from workbench.sim.train_schedule import pipeline_times, run_schedule
from workbench.topology import load_cluster

pytestmark = pytest.mark.timeout(300)


# ---------- schedule ----------
@pytest.mark.parametrize("p,v,m", [(4, 1, 8), (8, 1, 32), (4, 2, 8), (8, 4, 16)])
def test_uniform_schedule_matches_closed_form(p: int, v: int, m: int) -> None:
    f, b = 1.0 / v, 2.0 / v  # a chunk holds 1/v of the stage's layers
    z = np.zeros(p * v)
    *_, clock = run_schedule(p, v, m, np.full(p * v, f), np.full(p * v, b), z, z)
    # 1F1B: (m + p − 1)(f + b); interleaved: bubble (p − 1)/v of the per-micro-batch time
    assert clock.max() == pytest.approx((m + (p - 1) / v) * 3.0)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("p,v,m", [(8, 1, 64), (16, 2, 192), (6, 3, 60), (32, 1, 200)])
def test_extrapolated_schedule_close_to_full_simulation(p: int, v: int, m: int, seed: int) -> None:
    # random stage durations: the steady state is reached late, extrapolation is within 1 %
    rng = np.random.default_rng(seed * 1000 + p * 10 + v)
    f, b = rng.uniform(1, 2, p * v), rng.uniform(2, 4, p * v)
    fs, bs = rng.uniform(0, 0.3, p * v), rng.uniform(0, 0.3, p * v)
    exact = pipeline_times(p, v, m, f, b, fs, bs, exact=True)
    fast = pipeline_times(p, v, m, f, b, fs, bs)
    for a, c in zip(exact, fast):
        np.testing.assert_allclose(a, c, rtol=1e-2)


@pytest.mark.parametrize("v", [1, 2])
def test_extrapolation_exact_for_transformer_stages(v: int) -> None:
    # equal middle stages, heavier first (embedding) and last (LM head) chunks: exact
    p, m = 64, 512
    f, b = np.full(p * v, 1.0 / v), np.full(p * v, 2.0 / v)
    f[0] += 0.05
    f[-1] += 0.3
    b[-1] += 0.6
    s = np.full(p * v, 0.01)
    exact = pipeline_times(p, v, m, f, b, s, s, exact=True)
    fast = pipeline_times(p, v, m, f, b, s, s)
    for a, c in zip(exact, fast):
        np.testing.assert_allclose(a, c, rtol=1e-9)


def test_plain_and_compiled_schedules_agree() -> None:
    from workbench.sim import train_schedule as ts

    rng = np.random.default_rng(7)
    p, v, m = 8, 2, 32
    f, b = rng.uniform(1, 2, p * v), rng.uniform(2, 4, p * v)
    fs, bs = rng.uniform(0, 0.3, p * v), rng.uniform(0, 0.3, p * v)
    ts._calls = 0
    plain = ts.run_schedule(p, v, m, f, b, fs, bs)
    ts._calls = ts.JIT_AFTER
    compiled = ts.run_schedule(p, v, m, f, b, fs, bs)
    for a, c in zip(plain, compiled):
        np.testing.assert_array_equal(a, c)


def test_sends_delay_the_pipeline() -> None:
    p, m = 4, 8
    f, b = np.ones(p), 2 * np.ones(p)
    no = run_schedule(p, 1, m, f, b, np.zeros(p), np.zeros(p))[-1].max()
    yes = run_schedule(p, 1, m, f, b, np.full(p, 0.5), np.full(p, 0.5))[-1].max()
    assert yes > no + 2 * (p - 1) * 0.5 - 1e-9


# ---------- compute model ----------
def test_gemm_model_reproduces_measurements() -> None:
    from workbench.sim.compute import GRID, gemm_table

    t = gemm_table()
    grid = t["m"].isin(GRID) & t["n"].isin(GRID) & t["k"].isin(GRID)
    assert t.loc[grid, "error"].abs().median() < 0.01  # on the grid: the (averaged) measurement
    held_out = t.loc[~grid, "error"].abs()  # transformer shapes between grid points
    assert len(held_out) > 50 and held_out.median() < 0.1


def test_other_gpus_scale_with_peak_and_their_measured_best() -> None:
    from workbench.sim.compute import _grid_max, device_model
    from workbench.topology.catalogue import gpu

    h = device_model(gpu("H100-SXM"), "bf16").gemm_seconds(8192, 8192, 8192)
    a = device_model(gpu("A100-80GB"), "bf16").gemm_seconds(8192, 8192, 8192)
    # the A100 takes the H100's shape curve at its own publicly measured best efficiency (85.9 %)
    best_h100 = _grid_max("gemm", "gemm_h100_measured.csv", "H100-SXM")
    dh, da = device_model(gpu("H100-SXM"), "bf16"), device_model(gpu("A100-80GB"), "bf16")
    assert a / h == pytest.approx(989.5 / 312 * best_h100 / 0.859 * dh.sustained / da.sustained, rel=1e-6)
    db = device_model(gpu("B200"), "bf16")
    b = db.gemm_seconds(8192, 8192, 8192)
    assert h / b == pytest.approx(2250 / 989.5 * db.sustained / dh.sustained, rel=1e-6)
    with pytest.raises(WorkbenchError, match="precision"):
        device_model(gpu("A100-80GB"), "fp8")


# ---------- the step ----------
@pytest.fixture(scope="module")
def gpt1t() -> TrainContext:
    return TrainContext(load_cluster("dgx-h100:nodes=384"), load_model("gpt-1t"))


MEGATRON_1T = parse_plan("tp=8,pp=64,dp=6,gbs=3072,mbs=1,recompute=full,zero=1,vpp=1,cp=1,ep=1,offload=0")


def test_1t_step_metrics_are_consistent(gpt1t: TrainContext) -> None:
    e = evaluate(gpt1t, None, MEGATRON_1T)
    m = load_model("gpt-1t")
    assert e.tokens_per_s == pytest.approx(3072 * m.seq / e.step_seconds)
    # full recomputation: hardware FLOPs ≈ 4/3 of model FLOPs (the LM head is not recomputed)
    assert 1.3 < e.hardware_flops / e.model_flops < 4 / 3
    assert e.mfu == pytest.approx(e.model_flops / e.step_seconds / 3072 / 989.5e12)
    assert sum(e.breakdown.values()) == pytest.approx(e.step_seconds, rel=1e-6)
    assert e.breakdown["recompute"] == pytest.approx(e.breakdown["forward"], rel=0.05)
    assert e.breakdown["pipeline_bubble"] > 0 and e.breakdown["tp_comm"] > 0
    assert 0.2 < e.mfu < 0.8 and e.fits
    # weights in bf16 on the binding (first) stage: its 2 layers and the embedding, split over tp=8
    h = m.hidden
    assert e.memory["weights"] == pytest.approx((2 * 12 * h * h + m.vocab * h) / 8 * 2, rel=0.01)


def test_zero_stages_shard_state(gpt1t: TrainContext) -> None:
    base = MEGATRON_1T
    mem = {z: evaluate(gpt1t, None, Plan(**{**base.to_dict(), "zero": z})).memory for z in (0, 1, 2, 3)}
    dp = 6
    assert mem[1]["optimizer"] == pytest.approx(mem[0]["optimizer"] / dp)
    assert mem[2]["gradients"] == pytest.approx(mem[0]["gradients"] / dp)
    assert mem[3]["weights"] == pytest.approx(mem[0]["weights"] / dp)


def test_recompute_trades_memory_for_time() -> None:
    ctx = TrainContext(load_cluster("aws-p5:nodes=8"), load_model("llama3-70b"))
    base = dict(tp=8, pp=4, dp=2, ep=1, cp=1, sp=True, vpp=1, zero=1, mbs=1, gbs=64, precision="bf16", offload=False)
    none = evaluate(ctx, None, Plan(recompute="none", **base))
    full = evaluate(ctx, None, Plan(recompute="full", **base))
    assert full.memory["activations"] < none.memory["activations"] / 5
    assert full.step_seconds > none.step_seconds
    assert full.mfu < none.mfu and full.tflops_per_gpu > full.mfu * 989.5


def test_more_microbatches_shrink_the_bubble() -> None:
    ctx = TrainContext(load_cluster("aws-p5:nodes=4"), load_model("llama3-8b"))
    base = dict(tp=4, pp=8, dp=1, ep=1, cp=1, sp=True, zero=1, recompute="full", mbs=1, precision="bf16",
                offload=False)
    few = evaluate(ctx, None, Plan(gbs=8, vpp=1, **base))
    many = evaluate(ctx, None, Plan(gbs=64, vpp=1, **base))
    inter = evaluate(ctx, None, Plan(gbs=64, vpp=2, **base))
    frac = lambda e: e.breakdown["pipeline_bubble"] / e.step_seconds  # noqa: E731
    assert frac(many) < frac(few) * 0.7  # not (p-1)/(m+p-1): the LM-head stage is heavier, the rest wait
    assert inter.breakdown["pipeline_bubble"] < many.breakdown["pipeline_bubble"]


def test_moe_plan_prices_all_to_all() -> None:
    ctx = TrainContext(load_cluster("aws-p5:nodes=32"), load_model("deepseek-v3"))
    p = parse_plan("tp=1,pp=16,dp=16,ep=16,cp=1,vpp=1,zero=1,recompute=full,mbs=1,gbs=512,precision=bf16,offload=0,sp=0")
    e = evaluate(ctx, None, p)
    assert e.breakdown["ep_comm"] > 0
    assert 0.05 < e.mfu < 0.8


def test_eval_is_fast(gpt1t: TrainContext) -> None:
    evaluate(gpt1t, None, MEGATRON_1T)
    t = time.process_time()  # CPU seconds, so other load on a shared CI machine does not count
    for _ in range(20):
        evaluate(gpt1t, None, MEGATRON_1T)
    assert (time.process_time() - t) / 20 < 0.02  # 2 ms on an idle core; loose for shared CI


def test_invalid_plans_raise(gpt1t: TrainContext) -> None:
    with pytest.raises(WorkbenchError, match="cluster has 3072 GPUs"):
        evaluate(gpt1t, None, parse_plan("tp=8,pp=64,dp=5,gbs=3000,mbs=1"))
    with pytest.raises(WorkbenchError, match="does not fit"):
        evaluate(gpt1t, None, parse_plan("tp=1,pp=1,dp=3072,gbs=3072,mbs=1,zero=0"), check_fit=True)


# ---------- Result and CPU clusters ----------
TINY = "gpt:layers=4,hidden=256,heads=4,vocab=1024,seq=128"


@pytest.mark.parametrize("plan", ["dp=2,tp=1,pp=1", "tp=2,dp=1,pp=1", "pp=2,tp=1,dp=1"])
def test_cpu_cluster_tiny_gpt(plan: str) -> None:
    from workbench.topology.model import CPU_MODEL, Cluster, Fabric, Node

    node = Node(gpu=CPU_MODEL, gpus=2, intra="pcie", nic="ETH-10G", nics=1,
                specs=(("fp32_tflops", 0.05), ("memory_GB", 4.0), ("memory_GBps", 5.0)))
    c = Cluster(name="cpu2", nodes=(node,), fabric=Fabric(kind="switch", switch="ethernet"))
    r = simulate_train(c, TINY, plan + ",gbs=8,precision=fp32,zero=0,recompute=none,offload=0")
    ev = r.events
    assert {"forward", "backward", "optimizer"} <= set(ev["op"])
    assert set(ev["kind"]) <= {"compute", "collective", "transfer", "idle"}
    assert r.metrics["plan"]["precision"] == "fp32" and r.metrics["fits"]
    assert r.metrics["step_seconds"] >= ev["end"].max() - 1e-9
    if plan.startswith("dp"):
        assert "all_reduce" in set(ev["op"])
    if plan.startswith("tp"):
        assert {"all_gather", "reduce_scatter"} <= set(ev["op"])
    if plan.startswith("pp"):
        assert "send_recv" in set(ev["op"]) and ev["rank"].nunique() == 2
    # forward compute of the whole model at the measured rate: 2·params·tokens / rate
    m = load_model(TINY)
    fwd = ev[(ev["op"] == "forward")]
    assert (fwd["end"] - fwd["start"]).sum() > 0
    _ = m


def test_result_events_are_ordered_per_rank() -> None:
    r = simulate_train("aws-p5:nodes=2", "llama3-8b", "tp=8,pp=2,dp=1,gbs=8,mbs=1,vpp=2,zero=1,recompute=full,cp=1,offload=0")
    comp = r.events[r.events["kind"] == "compute"].sort_values(["rank", "start"])
    for _, g in comp.groupby("rank"):
        assert (g["start"].to_numpy()[1:] >= g["end"].to_numpy()[:-1] - 1e-12).all()
    assert r.metrics["step_seconds"] == pytest.approx(r.events["end"].max(), rel=1e-6)


@pytest.mark.slow
def test_partial_plan_is_completed() -> None:
    r = simulate_train("aws-p5:nodes=2", "llama3-8b", "gbs=32")
    plan = r.metrics["plan"]
    assert None not in plan.values() and plan["gbs"] == 32
    assert plan["tp"] * plan["pp"] * plan["dp"] * plan["cp"] == 16


# ---------- CLI ----------
def test_cli_simulate_json(cli) -> None:
    p = cli("simulate", "train", "--cluster", "aws-p5:nodes=4", "--model", "llama3-8b", "--plan",
             "tp=8,pp=1,dp=4,gbs=64,recompute=selective", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for k in ("step_seconds", "tokens_per_s", "tflops_per_gpu", "mfu", "memory_GiB_per_gpu", "fits",
              "breakdown_seconds", "plan"):
        assert k in out
    assert set(out["memory_GiB_per_gpu"]) == {"weights", "gradients", "optimizer", "activations", "buffers", "total"}
    assert isinstance(out["uncertain"], list) and out["plan"]["stack"] == "modern"


def test_cli_bad_plan_exits_2(cli) -> None:
    p = cli("simulate", "train", "--cluster", "aws-p5:nodes=1", "--model", "llama3-8b", "--plan", "tp=3,gbs=8")
    assert p.returncode == 2 and "plan.tp" in p.stderr


@pytest.mark.slow
def test_cli_search_json(cli) -> None:
    p = cli("search", "train", "--cluster", "aws-p5:nodes=1", "--model", "llama3-8b", "--gbs", "16", "--top", "3",
             "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert len(out["top"]) == 3 and out["evaluated"] > out["fitting"] > 0


def test_communication_follows_the_topology() -> None:
    # the same ZeRO-3 plan: over 10 GbE the weight gathers cannot hide behind compute, over NVLink they can
    model = "gpt:layers=8,hidden=2048,heads=16,vocab=32000,seq=2048"
    plan = "tp=1,pp=1,dp=8,cp=1,ep=1,vpp=1,zero=3,recompute=none,mbs=1,gbs=64,precision=bf16,offload=0,sp=0"
    fast = evaluate(TrainContext(load_cluster("dgx-h100:nodes=1"), load_model(model)), None, parse_plan(plan))
    slow_cluster = {"name": "eth", "nodes": [{"gpu": "H100-SXM", "gpus": 1, "intra": "pcie", "nic": "ETH-10G",
                                              "nics": 1, "count": 8}], "fabric": {"kind": "switch", "switch": "ethernet"}}
    from workbench.topology import from_dict

    slow = evaluate(TrainContext(from_dict(slow_cluster), load_model(model)), None, parse_plan(plan))
    assert fast.breakdown["fsdp_comm"] < 0.05 * fast.step_seconds
    assert slow.breakdown["fsdp_comm"] > 0.5 * slow.step_seconds
    assert fast.memory == slow.memory


def test_context_parallel_and_offload() -> None:
    ctx = TrainContext(load_cluster("aws-p5:nodes=4"), load_model("llama3-8b:seq=65536"))
    base = dict(tp=8, pp=1, ep=1, sp=True, vpp=1, zero=1, recompute="none", mbs=1, gbs=16, precision="bf16")
    cp1 = evaluate(ctx, None, Plan(cp=1, dp=4, offload=False, **base))
    cp4 = evaluate(ctx, None, Plan(cp=4, dp=1, offload=False, **base))
    assert cp4.memory["activations"] == pytest.approx(cp1.memory["activations"] / 4, rel=0.05)
    assert cp4.breakdown["cp_comm"] >= 0
    off = evaluate(ctx, None, Plan(cp=4, dp=1, offload=True, **base))
    assert off.memory["activations"] <= cp4.memory["activations"]


def test_estimate_train_matches_simulate_train() -> None:
    from workbench.plan.search import estimate_train

    plan = "tp=8,pp=2,dp=1,gbs=16,mbs=1,vpp=1,zero=1,recompute=full,cp=1,offload=0"
    a = estimate_train("aws-p5:nodes=2", "llama3-8b", plan)
    b = simulate_train("aws-p5:nodes=2", "llama3-8b", plan)
    assert a.step_seconds == pytest.approx(b.metrics["step_seconds"], rel=1e-9)


# ---------- software stacks and the cost terms they switch ----------
def _plan(**kw: object) -> Plan:
    base = dict(tp=8, pp=2, dp=1, ep=1, cp=1, sp=True, vpp=1, zero=1, recompute="none", mbs=1, gbs=16,
                precision="bf16", offload=False)
    base.update(kw)
    return Plan(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def gpt13() -> TrainContext:
    return TrainContext(load_cluster("dgx-a100:nodes=2,gpu=A100-80GB"),
                        load_model("gpt:layers=8,hidden=5120,heads=40,vocab=51200,seq=2048,dropout=1"))


def test_stack_presets_and_bad_names() -> None:
    from workbench.sim.train_stack import load_stack, stack_names

    assert {"modern", "megatron-2021", "llama3", "deepseek-v3"} <= set(stack_names())
    assert load_stack(None).name == "modern" and load_stack("megatron-2021").attention == "unfused"
    with pytest.raises(WorkbenchError, match="plan.stack"):
        load_stack("megatron-1999")
    # field changes after colons: an ablation of one cost term
    st = load_stack("megatron-2021:attention=flash:dp_overlap=1:node_limit=2")
    assert (st.attention, st.dp_overlap, st.node_limit, st.p2p_overlap) == ("flash", True, 2, False)
    for bad in ("modern:foo=1", "modern:dp_overlap=maybe", "modern:attention=xx"):
        with pytest.raises(WorkbenchError, match="stack"):
            load_stack(bad)


def test_unfused_attention_costs_time_and_s2_memory(gpt13: TrainContext) -> None:
    flash = evaluate(gpt13, None, _plan(stack="modern"))
    old = evaluate(gpt13, None, _plan(stack="megatron-2021"))
    sel = evaluate(gpt13, None, _plan(stack="megatron-2021", recompute="selective"))
    assert old.step_seconds > flash.step_seconds * 1.05  # s² GEMMs + softmax/dropout in HBM
    # Korthikanti et al.: 5·a·s/t bytes per token of s² tensors; selective recomputation drops them
    m = gpt13.model
    per_layer = 5 * m.heads / 8 * m.seq * m.seq  # one micro-batch of 2048 tokens
    assert old.memory["activations"] - sel.memory["activations"] >= per_layer * 4 * 0.99  # 4 layers per stage
    assert sel.breakdown["recompute"] > 0 and flash.breakdown["recompute"] == 0


def test_selective_recompute_is_the_attention_core(gpt13: TrainContext) -> None:
    none = evaluate(gpt13, None, _plan())
    sel = evaluate(gpt13, None, _plan(recompute="selective"))
    # flash attention stores no s² tensors: Megatron's selective recomputation costs time and saves nothing
    assert sel.memory["activations"] == pytest.approx(none.memory["activations"])
    assert 0 < sel.breakdown["recompute"] < 0.3 * sel.breakdown["forward"]
    assert sel.hardware_flops > none.hardware_flops


def test_local_ddp_exposes_the_gradient_reduction() -> None:
    ctx = TrainContext(load_cluster("dgx-a100:nodes=4,gpu=A100-80GB"),
                       load_model("gpt:layers=8,hidden=4096,heads=32,vocab=51200,seq=2048"))
    p = dict(tp=8, pp=1, dp=4, zero=0, gbs=64)
    over = evaluate(ctx, None, _plan(**p, stack="modern"))
    local = evaluate(ctx, None, _plan(**p, stack="megatron-2021", sp=False))
    assert local.breakdown["dp_comm"] > 1.2 * over.breakdown["dp_comm"] > 0  # nothing hidden behind the backward


def test_blocking_pipeline_sends_are_exposed(gpt13: TrainContext) -> None:
    one = evaluate(gpt13, None, _plan(gbs=16))
    inter = evaluate(gpt13, None, _plan(gbs=16, vpp=2))
    assert one.breakdown["pp_comm"] > 0  # 1F1B: the sender waits in send_forward_recv_backward
    assert inter.breakdown["pp_comm"] == 0  # interleaved with overlap_p2p_comm
    old = evaluate(gpt13, None, _plan(gbs=16, vpp=2, stack="megatron-2021"))
    assert old.breakdown["pp_comm"] > 0


def test_sp_backward_regathers_the_input(gpt13: TrainContext) -> None:
    from workbench.sim.train import _groups, _layer_cost

    p = evaluate(gpt13, None, _plan()).plan
    f, bw, *_ = _layer_cost(gpt13, p, "dense", 0, _groups(p, 0))
    full = p.mbs * gpt13.model.seq * gpt13.model.hidden * 2
    ag = gpt13.coll("all_gather", full, tuple(range(8)))
    assert f["tp_comm"] == pytest.approx(2 * ag + 2 * gpt13.coll("reduce_scatter", full, tuple(range(8))))
    assert bw["tp_comm"] >= 2 * ag  # the row-parallel gradients' all-gathers, plus what the dgrad GEMMs do not hide


def test_context_parallel_all_gather_is_exposed() -> None:
    ctx = TrainContext(load_cluster("aws-p5:nodes=4"), load_model("llama3-8b:seq=65536"))
    p = dict(tp=8, pp=1, cp=4, dp=1, gbs=8)
    ring = evaluate(ctx, None, _plan(**p, stack="modern"))
    ag = evaluate(ctx, None, _plan(**p, stack="llama3"))
    assert ag.breakdown["cp_comm"] > ring.breakdown["cp_comm"]


def test_dualpipe_hides_expert_all_to_all_and_doubles_parameters() -> None:
    ctx = TrainContext(load_cluster("dgx-h100:nodes=16"), load_model("deepseek-v3:layers=16"))
    p = dict(tp=1, pp=4, dp=32, ep=32, sp=False, gbs=512, precision="fp8", recompute="full")
    one = evaluate(ctx, None, _plan(**p, stack="modern"))
    dual = evaluate(ctx, None, _plan(**p, stack="deepseek-v3"))
    assert dual.breakdown["ep_comm"] < 0.2 * one.breakdown["ep_comm"]
    assert dual.step_seconds < one.step_seconds
    assert dual.memory["weights"] == pytest.approx(2 * one.memory["weights"], rel=0.05)
    with pytest.raises(WorkbenchError, match="plan.pp"):
        evaluate(ctx, None, _plan(**{**p, "pp": 1, "dp": 128, "ep": 64}, stack="deepseek-v3"))
    # the events are laid out to end where the closed-form step ends
    r = simulate_train(ctx.cluster, ctx.model, _plan(**p, stack="deepseek-v3"))
    assert r.events["end"].max() == pytest.approx(r.metrics["step_seconds"], rel=1e-9)


def test_node_limited_fp8_dispatch_moves_fewer_bytes() -> None:
    from workbench.sim.train import _groups, _layer_cost

    ctx = TrainContext(load_cluster("dgx-h100:nodes=16"), load_model("deepseek-v3:layers=16"))
    base = _plan(tp=1, pp=4, dp=32, ep=32, sp=False, gbs=512, precision="fp8")
    out = {}
    for name in ("modern", "deepseek-v3"):
        p = evaluate(ctx, None, Plan(**{**base.to_dict(), "stack": name})).plan
        f, *_ = _layer_cost(ctx, p, "moe", 0, _groups(p, 0))
        out[name] = f["ep_comm"]
    assert out["deepseek-v3"] < 0.75 * out["modern"]


def test_search_flags_uncertainty_and_guards_implausible_mfu() -> None:
    from workbench.plan.search import MFU_MARGIN, mfu_ceiling, search_plans

    df = search_plans("dgx-a100:nodes=2,gpu=A100-80GB", 32, "llama3-8b", fixed={"tp": 8})
    ok = df[df["valid"] & df["fits"]]
    assert (ok["flags"].str.contains("GEMM curve for A100-80GB")).all()
    best = mfu_ceiling(TrainContext(load_cluster("dgx-a100:nodes=2,gpu=A100-80GB"), load_model("llama3-8b")))
    limit = best["bf16"][0] + MFU_MARGIN
    assert not (ok[ok["plausible"].astype(bool)]["mfu"] > limit).any()
    bad = ok[~ok["plausible"].astype(bool)]
    assert (bad["reason"].str.contains("implausible")).all()


def test_cli_published_table_and_ablation(cli) -> None:
    p = cli("simulate", "published", "--only", "korthikanti-22b-a100", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["summary"]["rows"] == 1 and out["rows"][0]["stack"] == "megatron-2021"
    flash = cli("simulate", "published", "--only", "korthikanti-22b-a100", "--json", "--ablate",
                 "megatron-2021=attention=flash")
    assert json.loads(flash.stdout)["rows"][0]["predicted"] > out["rows"][0]["predicted"]
    bad = cli("simulate", "published", "--ablate", "megatron-2021")
    assert bad.returncode == 2 and "--ablate" in bad.stderr
