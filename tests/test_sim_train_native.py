"""The training simulator's terms for PyTorch's own engines (stacks `torch-native`, `torch-native-eager`: host
dispatch, eager elementwise kernels) and the interference terms from the measured sweep; the re-prediction of
the two-H200 runs from their microbenchmarks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from workbench.errors import WorkbenchError
from workbench.models import load_model
from workbench.plan import parse_plan
from workbench.sim.compute import device_model, interference_comm_stretch, interference_slowdown
from workbench.sim.train import TrainContext, _overlap, evaluate
from workbench.sim.train_stack import load_stack
from workbench.topology import load_cluster

pytestmark = pytest.mark.timeout(300)

MODEL = "llama3-8b:layers=16,hidden=2048,heads=16,kv_heads=4,head_dim=128,ffn=8192,vocab=32000,seq=2048"
RUNS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "h200x2-native"


def _ctx(gpus: int = 2, nodes: int = 1) -> TrainContext:
    c = load_cluster(f"dgx-h100:nodes={nodes},gpu=H200")
    c = dataclasses.replace(c, nodes=tuple(dataclasses.replace(n, gpus=gpus) for n in c.nodes))
    return TrainContext(c, load_model(MODEL))


def _est(ctx: TrainContext, plan: str, stack: str) -> object:
    return evaluate(ctx, None, parse_plan(f"{plan},stack={stack}"))


# ---------- the measured interference ----------
def test_comm_stretch_is_the_measured_median() -> None:
    from workbench.data import read_csv

    df = read_csv("interference_measured.csv")
    h200 = df[df["gpu"] == "H200"]
    ratios = sorted((h200["busbw_alone_GBps"] / h200["busbw_beside_GBps"]).tolist())
    n = len(ratios)
    median = (ratios[n // 2] + ratios[(n - 1) // 2]) / 2
    k, basis = interference_comm_stretch("H200")
    assert k == pytest.approx(median) and basis == "measured"
    assert interference_comm_stretch("A100")[1].startswith("assumption")


def test_overlap_stretches_comm_and_exposes_what_compute_cannot_cover() -> None:
    # fits beside the compute: nothing exposed, the compute slowed for the stretched time
    assert _overlap(1.0, 10.0, 0.1, 1.5) == pytest.approx((0.0, 0.15))
    assert _overlap(1.0, 10.0, 0.1) == pytest.approx((0.0, 0.1))
    # longer than the compute: during it the collective does compute/stretch of its work; the rest alone
    exposed, extra = _overlap(10.0, 2.0, 0.1, 2.0)
    assert exposed == pytest.approx(9.0) and extra == pytest.approx(0.2)
    assert _overlap(10.0, 2.0, 0.1, 1.0) == pytest.approx((8.0, 0.2))


def test_stretch_inside_a_node_only() -> None:
    one, two = _ctx(2, 1), _ctx(1, 2)
    st = load_stack("torch-native")
    assert one.stretch(0, st, (0, 1)) == pytest.approx(interference_comm_stretch("H200")[0])
    assert two.stretch(0, st, (0, 1)) == 1.0  # across nodes: NIC-bound, not measured
    assert one.stretch(0, load_stack("deepseek-v3"), (0, 1)) == 1.0  # SMs reserved for communication


# ---------- torch.autocast over fp32 parameters ----------
def test_autocast_casts_cost_their_bytes_per_micro_batch() -> None:
    ctx = _ctx(1)
    params = 1.104e9
    dm = device_model(ctx.spec_of(0), "bf16")
    one = _est(ctx, "dp=1,tp=1,pp=1,mbs=8,gbs=8", "torch-native").step_seconds
    none = _est(ctx, "dp=1,tp=1,pp=1,mbs=8,gbs=8", "torch-native:param_cast=none").step_seconds
    # one micro-batch: a cast each way, 6 + 6 bytes per parameter at the memory bandwidth of one weight
    # matrix's kernel (7 per layer)
    assert (one - none) == pytest.approx(dm.memory_seconds(12 * params, 6 * params / (7 * 16)), rel=0.15)
    four = _est(ctx, "dp=1,tp=1,pp=1,mbs=2,gbs=8", "torch-native").step_seconds
    four0 = _est(ctx, "dp=1,tp=1,pp=1,mbs=2,gbs=8", "torch-native:param_cast=none").step_seconds
    # four micro-batches: 4 × 12 bytes of casts and 3 × 12 bytes of fp32 accumulation = 7 × one's
    assert (four - four0) / (one - none) == pytest.approx(7.0, rel=0.15)
    # the modern (Megatron) stack accumulates in the wgrad GEMM: no such term
    assert _est(ctx, "dp=1,tp=1,pp=1,mbs=8,gbs=8", "modern").step_seconds < one


def test_fsdp_replaces_autocast_casts() -> None:
    ctx = _ctx(2)
    a = _est(ctx, "dp=2,tp=1,pp=1,zero=1,mbs=8,gbs=16", "torch-native")
    b = _est(ctx, "dp=2,tp=1,pp=1,zero=1,mbs=8,gbs=16", "torch-native:param_cast=none")
    assert a.step_seconds == b.step_seconds  # FSDP's policy casts in its copy-in, priced with the gather


# ---------- FSDP2 ----------
def test_fsdp2_gather_prices_exposed_unit_interference_and_copies() -> None:
    ctx = _ctx(2)
    plan = "dp=2,tp=1,pp=1,zero=1,mbs=8,gbs=16"
    fsdp2 = _est(ctx, plan, "torch-native").breakdown["param_gather"]
    mega = _est(ctx, plan, "torch-native:sharding=megatron").breakdown["param_gather"]
    params = 1.104e9
    dm = device_model(ctx.spec_of(0), "bf16")
    # copy-out (read 2 + write 2) and the gradients' cast + chunk_cat (read 2 + write 4), one block per kernel
    copies = dm.memory_seconds(4 * params, 4 * params / 16) + dm.memory_seconds(6 * params, 6 * params / 16)
    first_unit = ctx.coll("all_gather", (2 * 32000 * 2048 + (params - 2 * 32000 * 2048) / 16) * 2, (0, 1))
    assert fsdp2 > copies + first_unit
    assert fsdp2 < copies + first_unit + 0.5 * ctx.coll("all_gather", params * 2, (0, 1))  # the rest hidden
    # Megatron's gather beside the next forward: hidden, but the forward beside it is slowed (measured)
    ag = ctx.coll("all_gather", params * 2, (0, 1))
    k, slow = interference_comm_stretch("H200")[0], interference_slowdown("H200")[0]
    assert mega == pytest.approx(slow * k * ag, rel=1e-3) and mega > 0


def test_fsdp2_zero3_adds_copies_every_micro_batch() -> None:
    ctx = _ctx(2)
    z3 = _est(ctx, "dp=2,tp=1,pp=1,zero=3,mbs=4,gbs=16", "torch-native").step_seconds
    z3m = _est(ctx, "dp=2,tp=1,pp=1,zero=3,mbs=4,gbs=16", "torch-native:sharding=megatron:param_cast=none").step_seconds
    dm = device_model(ctx.spec_of(0), "bf16")
    layer = (1.104e9 - 2 * 32000 * 2048) / 16
    per_mb = 16 * (2 * dm.memory_seconds(4 * layer) + dm.memory_seconds(6 * layer))  # two copy-outs, a chunk_cat
    assert (z3 - z3m) == pytest.approx(2 * per_mb, rel=0.2)  # two micro-batches per rank


# ---------- DTensor sequence parallelism ----------
def test_dtensor_sp_backward_collectives_exposed() -> None:
    ctx = _ctx(2)
    plan = parse_plan("dp=1,tp=2,pp=1,sp=1,mbs=8,gbs=8,stack=torch-native")
    _, det = evaluate(ctx, None, plan, detail=True)
    sc = det["costs"][0]
    assert sc.parts_b["tp_comm"] == pytest.approx(sc.parts_f["tp_comm"])  # each collective's transpose
    meg = parse_plan("dp=1,tp=2,pp=1,sp=1,mbs=8,gbs=8,stack=torch-native:sp_async_backward=1")
    _, det2 = evaluate(ctx, None, meg, detail=True)
    assert det2["costs"][0].parts_b["tp_comm"] < 0.8 * sc.parts_b["tp_comm"]  # Megatron hides part of it


# ---------- the re-prediction of the measured runs ----------
def test_native_runs_repredicted_from_microbenchmarks() -> None:
    from workbench.calibration.native_runs import markdown, validate_runs

    df = validate_runs(RUNS)
    assert len(df) >= 7 and set(df["stack"]) == {"torch-native", "torch-native-eager"}
    assert (df["stack"] == "torch-native-eager").tolist() == (~df["compile"]).tolist()  # the stack that ran
    err = (df["after_s"] - df["measured_s"]) / df["measured_s"] * 100
    assert (err - df["error_after_pct"]).abs().max() < 1e-9
    assert "| dp2-fsdp" in markdown(df)
    # the issue's target on the compiled runs of 1 GPU, FSDP and the pipelines (tp=2 is host-bound: not met)
    main = df[df["compile"] & ~df["name"].str.startswith("tp2")]
    assert len(main) == 4 and main["error_after_pct"].abs().max() < 10.0
    # one GPU eager: the eager elementwise kernels priced (it was -19.6 % without them)
    eager = df[df["name"] == "1gpu-eager"]
    assert len(eager) == 1 and abs(float(eager["error_after_pct"].iloc[0])) < 10.0
    # eager tensor parallelism is host-bound in the simulation (DTensor dispatch), as the profile showed
    tp_eager = df[(df["name"] == "tp2-sp") & ~df["compile"]]
    assert all(bd.get("host_bound", 0.0) > 0 for bd in tp_eager["breakdown_after_ms"])
    old = validate_runs(RUNS, stack="modern")
    assert set(old["stack"]) == {"modern"}


def test_native_runs_bad_input(tmp_path: Path) -> None:
    from workbench.calibration.native_runs import main, validate_runs

    with pytest.raises(WorkbenchError, match="folder"):
        validate_runs(tmp_path)
    with pytest.raises(WorkbenchError, match="plan.stack"):
        validate_runs(RUNS, stack="no-such-stack")
    assert main([str(tmp_path)]) == 2


def test_dp_reduction_beside_backward_stretched_and_slowing_it() -> None:
    ctx = _ctx(2)
    plan = "dp=2,tp=1,pp=1,zero=1,mbs=4,gbs=16"
    with_it = _est(ctx, plan, "modern").breakdown["dp_comm"]
    without = _est(ctx, plan, "modern:comm_sm_fraction=0").breakdown["dp_comm"]  # no interference either way
    k, slow = interference_comm_stretch("H200")[0], interference_slowdown("H200")[0]
    # the buckets run beside the last backward (which outlasts them all but the last): the exposed tail is
    # the last bucket; the backward beside the others is slowed for their stretched time
    assert without > 0 and with_it > without
    sync = ctx.coll("reduce_scatter", (1.104e9 - 2 * 32000 * 2048) / 16 * 4, (0, 1))
    assert with_it - without == pytest.approx(slow * k * 15 * sync, rel=0.2)


# ---------- host dispatch (eager PyTorch, DTensor, compiled blocks) and eager elementwise kernels ----------
def test_host_bound_is_the_latest_of_host_issue_and_gpu_work() -> None:
    from workbench.sim.train_host import host_bound

    assert host_bound([(1.0, 2.0), (1.0, 2.0), (0.0, 1.0)]) == pytest.approx(5.0)  # host ahead: the GPU's work
    # host behind: everything issued after 6 s, the GPU finishes what is left of the last segment after that
    assert host_bound([(3.0, 1.0), (3.0, 1.0), (0.0, 1.0)]) == pytest.approx(7.0)
    # a slow forward issue exposes it once; the GPU then runs the backward and the tail
    assert host_bound([(4.0, 1.0), (1.0, 5.0), (0.0, 1.0)]) == pytest.approx(10.0)
    assert host_bound([]) == 0.0


def test_host_time_is_counted_ops_times_measured_cost() -> None:
    from workbench.sim.train_host import KINDS, host_costs, host_seconds, op_counts

    c = host_costs("H200")
    assert c.basis == "measured"
    assert 1e-6 < c.plain[0] < 1e-4 and c.dtensor["tp-sp"][0] > 2 * c.plain[0]  # sharding propagation per op
    n = op_counts("tp-sp")
    assert n[("fwd", "layer", "dtensor")] > 0 and n[("fwd", "layer", "collective")] > 0
    f, b = host_seconds(c, "eager", 2, True, 16, True)
    per = {"plain": c.plain[0], "dtensor": c.dtensor["tp-sp"][0], "collective": c.collective}
    want = sum((16 * n[("fwd", "layer", k)] + n[("fwd", "rest", k)]) * per[k] for k in KINDS)
    assert f == pytest.approx(want)
    fc, _ = host_seconds(c, "compiled", 1, False, 16, False)
    assert fc == pytest.approx(16 * c.region["eager"][0])  # a compiled block: one measured call
    assert host_costs("A100").basis.startswith("assumption")


@pytest.mark.parametrize("mbs", [1, 2, 8, 16])
def test_host_bound_regime_iff_host_issue_exceeds_gpu_time(mbs: int) -> None:
    from workbench.sim.train_host import host_costs, host_seconds

    ctx = _ctx(2)
    plan = parse_plan(f"dp=1,tp=2,pp=1,sp=1,mbs={mbs},gbs={mbs},stack=torch-native-eager")
    est, det = evaluate(ctx, None, plan, detail=True)
    hf, hb = host_seconds(host_costs("H200"), "eager", 2, True, 16, True)
    gf, gb = float(det["fdur"][0]), float(det["bdur"][0])
    tail = sum(det["tails"][0])
    host_bound_expected = hf > gf or hf + hb > gf + gb
    assert (est.breakdown["host_bound"] > 0) == host_bound_expected
    assert est.step_seconds == pytest.approx(max(gf + gb, hf + gb, hf + hb) + tail, rel=1e-9)
    off = evaluate(ctx, None, parse_plan(f"dp=1,tp=2,pp=1,sp=1,mbs={mbs},gbs={mbs},stack=torch-native-eager:host=none"))
    assert off.breakdown["host_bound"] == 0.0 and off.step_seconds == pytest.approx(gf + gb + tail, rel=1e-9)


def test_host_bound_at_small_batches_of_eager_tp_not_at_large() -> None:
    ctx = _ctx(2)
    small = _est(ctx, "dp=1,tp=2,pp=1,sp=1,mbs=1,gbs=1", "torch-native-eager")
    big = _est(ctx, "dp=1,tp=2,pp=1,sp=1,mbs=64,gbs=64", "torch-native-eager")
    assert small.breakdown["host_bound"] > 0.5 * small.step_seconds
    assert big.breakdown["host_bound"] == 0.0
    # one GPU eager: ~200 plain ops per layer at ~10 us each is far below the GPU's work at mbs=8
    one = _est(_ctx(1), "dp=1,tp=1,pp=1,mbs=8,gbs=8", "torch-native-eager")
    assert one.breakdown["host_bound"] == 0.0
    # the Megatron stacks do not price the host (the published-run validation is unchanged)
    assert _est(ctx, "dp=1,tp=2,pp=1,sp=1,mbs=1,gbs=1", "modern").breakdown["host_bound"] == 0.0


def test_eager_elementwise_bytes_match_the_bytes_counted_at_the_validated_shape() -> None:
    from workbench.data import read_csv
    from workbench.sim.train_host import eager_layer_bytes

    m = load_model(MODEL)
    df = read_csv("host_dispatch_measured.csv")
    params_local = {1: 60.8e6, 2: 30.4e6}  # one layer's weights per rank (their autocast casts: param_cast)
    for prog, tp in (("eager", 1), ("tp-sp", 2)):
        d = df[(df["measure"] == "ew_bytes") & (df["program"] == prog) & (df["run"] == 1)]
        v = {(r.phase, int(r.layers)): float(r.value) for r in d.itertuples()}
        f, b = eager_layer_bytes(m, tp, tp > 1, 8 * m.seq)
        counted_f = v[("fwd", 2)] - v[("fwd", 1)] - 6 * params_local[tp]
        counted_b = v[("bwd", 2)] - v[("bwd", 1)] - 6 * params_local[tp]
        assert f == pytest.approx(counted_f, rel=0.05) and b == pytest.approx(counted_b, rel=0.05)


def test_eager_elementwise_costs_more_than_fused() -> None:
    ctx = _ctx(1)
    eager = _est(ctx, "dp=1,tp=1,pp=1,mbs=8,gbs=8", "torch-native-eager:host=none")
    fused = _est(ctx, "dp=1,tp=1,pp=1,mbs=8,gbs=8", "torch-native")
    assert eager.breakdown["forward"] > fused.breakdown["forward"] + 0.01  # ~1.8 ms more per layer at mbs=8
    assert eager.breakdown["backward"] > fused.breakdown["backward"] + 0.02


@pytest.mark.slow
def test_op_counts_come_from_the_model() -> None:
    pytest.importorskip("torch")
    import torch.distributed as dist

    if dist.is_initialized():  # the counter needs its own fake 2-rank group
        pytest.skip("a process group is already initialised in this process")
    from workbench.calibration.op_counts import REFERENCE, per_layer
    from workbench.sim.train_host import op_counts

    rows = per_layer(load_model(REFERENCE), "tp-sp")  # counted now, on CPU, over a fake 2-rank group
    got = {(r["phase"], r["where"], r["kind"]): r["count"] for r in rows}
    assert got[("fwd", "layer", "dtensor")] > 0 and got[("bwd", "layer", "dtensor")] > got[("fwd", "layer", "dtensor")]
    # DTensor SequenceParallel + Colwise/Rowwise: 2 all-gathers and 2 reduce-scatters per layer each way
    cuda = op_counts("tp-sp")
    for phase in ("fwd", "bwd"):
        assert got[(phase, "layer", "collective")] == cuda[(phase, "layer", "collective")] == 4


def test_op_counts_match_the_profile_of_the_real_tp2_step() -> None:
    """The ops counted on the tiny model, scaled to 16 layers, against torch.profiler's counts in one real
    eager tp=2 step on the two H200s (rank 0): DTensor ops (`PythonSubclass` calls) and NCCL collectives."""
    import re

    from workbench.sim.train_host import op_counts

    text = (RUNS / "profile-tp2-sp.txt").read_text()

    def calls(name: str) -> int:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name))
        return int(re.split(r"\s+", line.strip())[-1])

    n = op_counts("tp-sp")
    dtensor = sum(16 * n[(ph, "layer", "dtensor")] + n[(ph, "rest", "dtensor")] for ph in ("fwd", "bwd"))
    launches = sum(16 * n[(ph, "layer", "collective")] + n[(ph, "rest", "collective")] for ph in ("fwd", "bwd"))
    assert dtensor == pytest.approx(calls("PythonSubclass"), rel=0.02)
    assert launches == calls("_c10d_functional::all_gather_into_tensor") + calls("_c10d_functional::reduce_scatter_tensor")


def test_host_wait_shows_as_an_idle_event_ending_the_step() -> None:
    from workbench.core.job import Job, Training
    from workbench.sim.train import simulate_job

    ctx = _ctx(2)
    r = simulate_job(Job.create(ctx.cluster, MODEL, "dp=1,tp=2,pp=1,sp=1,mbs=8,gbs=8,stack=torch-native-eager",
                                Training()))
    idle = r.events[r.events["kind"] == "idle"]
    assert list(idle["op"]) == ["host_dispatch"]
    wait = float((idle["end"] - idle["start"]).iloc[0])
    assert wait == pytest.approx(r.metrics["breakdown_seconds"]["host_bound"], rel=1e-6)
    assert float(r.events["end"].max()) == pytest.approx(r.metrics["step_seconds"], rel=1e-9)


def test_native_train_benchmark_predicts_with_the_stack_each_run_used(tmp_path: Path) -> None:
    import importlib.util
    import shutil

    from workbench.calibration.native_runs import validate_runs

    script = RUNS.parents[2] / "benchmarks" / "native_train.py"
    spec = importlib.util.spec_from_file_location("native_train_bench", script)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shutil.copy(RUNS / "native.json", tmp_path / "native.json")
    rep = mod.resimulate(tmp_path / "native.json", RUNS)
    df = validate_runs(RUNS)
    rows = [r for r in rep["plans"] if "sim_step_seconds_after" in r]
    assert len(rows) == len(df)
    for r in rows:
        want = df[(df["name"] == r["name"]) & (df["run"] == int(r.get("run", 1)))].iloc[0]
        assert r["sim_stack"] == want["stack"] == ("torch-native" if r["compile"] else "torch-native-eager")
        assert r["sim_error_pct_after"] == pytest.approx(want["error_after_pct"], abs=1e-6)
