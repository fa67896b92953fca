"""The engine step's own log (composition and phase times), the composition sweep that drives the real worker
through the compositions a server forms, and the step fit that prices each step by what it held."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import workbench as wb
from workbench.serve.calibrate import COMPOSITION, _price, fit_steps
from workbench.serving import Serving

SPEC = {"page_size": 16, "max_batched_tokens": 256, "max_seqs": 64, "threads": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.serve.checkpoints import random_llama

    return random_llama(tmp_path_factory.mktemp("tiny") / "m", hidden=64, layers=2, heads=4, kv_heads=2,
                        intermediate=128, max_position=512, dtype="float32")


def test_a_mixed_step_logs_what_it_held_and_its_phases(ckpt: Path) -> None:
    import torch

    from workbench.serve.engine import STEP_FIELDS, Engine, EngineConfig, Seq
    from workbench.serve.model import Model
    from workbench.serve.sampling import SamplingParams

    eng = Engine(Model.load(ckpt), EngineConfig(num_pages=64, page_size=16))
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with torch.inference_mode():
        eng.add(Seq("a", list(range(1, 21)), greedy))
        eng.add(Seq("b", list(range(5, 15)), greedy))
        eng.step()                                          # both prompts: two prefill chunks
        first = dict(eng.last_step)
        assert sorted(i for i, _ in eng.last_admitted) == ["a", "b"]
        eng.add(Seq("c", list(range(3, 10)), greedy))       # arrives beside two decoding sequences
        eng.step()
        mixed = dict(eng.last_step)
        assert [i for i, _ in eng.last_admitted] == ["c"]
    assert set(STEP_FIELDS) <= set(mixed)
    assert (first["prefill_seqs"], first["prefill_tokens"], first["decode_seqs"]) == (2, 30, 0)
    assert first["prefill_work"] == pytest.approx(20 * 10 + 10 * 5)     # Σ chunk·(context before + chunk/2)
    assert (mixed["prefill_seqs"], mixed["prefill_tokens"], mixed["decode_seqs"], mixed["sampled"]) == (1, 7, 2, 3)
    assert mixed["decode_kv"] == (20 + 1) + (10 + 1)                   # each decode reads its context + itself
    assert mixed["prefill_work"] == pytest.approx(7 * 3.5)
    assert all(mixed[k] >= 0 for k in STEP_FIELDS if k.startswith("t_"))
    assert mixed["t_forward"] > 0


@pytest.fixture(scope="module")
def job():  # type: ignore[no-untyped-def]
    return wb.Job.create("dgx-h100:nodes=1", "llama3.1-8b", plan="tp=1,replicas=1,cuda_graph=false",
                         workload=Serving(traffic="concurrency=2,isl=48,osl=16,requests=8"))


def _steps(d: np.ndarray, pf: np.ndarray) -> pd.DataFrame:
    """Steps of d decodes (context 64) and one prefill chunk of pf tokens where pf > 0."""
    chunks = (pf > 0).astype(float)
    return pd.DataFrame({"tokens": d + pf, "seqs": d + chunks, "prefill_seqs": chunks, "prefill_tokens": pf,
                         "prefill_work": pf * pf / 2, "decode_seqs": d, "decode_kv": d * 65.0, "sampled": d + chunks})


def test_composition_prices_prefill_work_and_kv_reads(job) -> None:  # type: ignore[no-untyped-def]
    t = _steps(np.array([4.0, 4.0, 32.0]), np.array([0.0, 512.0, 0.0]))
    with_comp = _price(job, t["tokens"].to_numpy(), t["seqs"].to_numpy(), composition=t)
    tokens_only = _price(job, t["tokens"].to_numpy(), t["seqs"].to_numpy())
    assert with_comp[1] > tokens_only[1]           # the prompt's attention is priced
    assert with_comp[2] > tokens_only[2]           # the decodes' KV reads are priced
    partial = t.drop(columns=["decode_kv"])        # a table without the full composition: by tokens alone
    assert np.allclose(_price(job, t["tokens"].to_numpy(), t["seqs"].to_numpy(), composition=partial), tokens_only)


def test_step_fit_on_compositions_recovers_known_costs(job) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    d = np.tile(np.array([0, 1, 2, 4, 8, 16], float), 8)
    pf = np.tile(np.array([0.0, 16.0, 48.0, 128.0]), 12)
    t = _steps(d, pf)
    t = t[t["seqs"] > 0].reset_index(drop=True)
    s, q, k = 4e-3, 3e-4, 2.5
    y = s + q * t["seqs"] + _price(job, t["tokens"].to_numpy(), t["seqs"].to_numpy(), composition=t, rate=k)
    t["period"] = y * (1 + 0.01 * rng.uniform(-1, 1, len(y)))
    f = fit_steps(job, t)
    assert f["scheduler_us"] == pytest.approx(4000, rel=0.05)
    assert f["seq_us"] == pytest.approx(300, rel=0.1)
    assert f["rate_factor"] == pytest.approx(2.5, rel=0.05)


def test_the_composition_sweep_forms_the_steps_it_names(ckpt: Path) -> None:
    from workbench.serve.microbench import measure_compositions

    df = measure_compositions(str(ckpt), decodes=(0, 2), prefills=((1, 16), (2, 24)), context=20, repeat=1,
                              between=1, passes=2, **SPEC)
    assert set(COMPOSITION) <= set(df.columns)
    # two passes, the second in reverse: 0, 2, 2, 0
    order = df["decodes"].to_numpy()
    assert [int(order[0]), int(order[-1])] == [0, 0] and (df["decodes"] == 2).sum() > 0
    alone = df[(df["decodes"] == 0) & (df["prompt"] == 16)]
    assert (alone["decode_seqs"] == 0).all() and alone["prefill_tokens"].tolist() == [16, 16]
    mixed = df[(df["decodes"] == 2) & (df["prefill_seqs"] > 0)]
    # the new prompts join a step beside the two running decodes (two prompts sent together may reach the
    # worker one step apart: each step that takes one still holds both decodes)
    assert (mixed["decode_seqs"] == 2).all()
    assert mixed.loc[mixed["prompt"] == 16, "prefill_tokens"].tolist() == [16, 16]
    assert mixed.loc[mixed["prompt"] == 24, "prefill_tokens"].sum() == 96
    with pytest.raises(wb.WorkbenchError, match="passes=0"):
        measure_compositions(str(ckpt), passes=0, **SPEC)
    dec = df[(df["decodes"] == 2) & (df["prefill_seqs"] == 0)]
    assert len(dec) >= 2 and (dec["decode_seqs"] == 2).all()
    busy = df.dropna(subset=["period"])
    assert (busy["period"] >= busy["seconds"]).all()
    assert not math.isnan(float(busy["g_send"].median()))
    if Path("/proc/thread-self/schedstat").exists():   # the worker's thread: on a core, and waiting for one
        assert (df["t_cpu"] >= 0).all() and (df["t_runq"] >= 0).all() and df["t_cpu"].sum() > 0
        assert (df["t_cpu"] + df["t_runq"] <= df["seconds"] * 1.05 + 1e-3).all()


@pytest.mark.parametrize("role", ["colocated", "prefill", "decode"])
def test_warm_up_leaves_the_engine_empty(ckpt: Path, role: str) -> None:
    from workbench.serve.engine import Engine, EngineConfig
    from workbench.serve.model import Model
    from workbench.serve.worker import warm_up

    eng = Engine(Model.load(ckpt), EngineConfig(num_pages=8, page_size=16, role=role))
    warm_up(eng)
    assert not eng.has_work and not eng.seqs
    assert eng.alloc.free == eng.alloc.num_pages   # every page back, a prefill worker's too
    assert eng.last_step == {} and eng.last_batch == (0, 0) and eng.preemptions == 0


def _compositions(chunks: tuple[float, ...], prompts: tuple[float, ...]) -> pd.DataFrame:
    """96 synthetic steps: 0-16 decodes (context 64) beside `chunks` prefill chunks of `prompts` tokens each, cycled."""
    d = np.tile(np.array([0, 1, 2, 4, 8, 16], float), 16)
    n = np.tile(np.array(chunks), 96 // len(chunks))
    pf = np.tile(np.array(prompts), 20)[:96]
    t = pd.DataFrame({"tokens": d + n * pf, "seqs": d + n, "prefill_seqs": n, "prefill_tokens": n * pf,
                      "prefill_work": n * pf * pf / 2, "decode_seqs": d, "decode_kv": d * 65.0, "sampled": d + n})
    return t[t["seqs"] > 0].reset_index(drop=True)


def test_step_fit_recovers_a_cost_per_prefill_chunk(job) -> None:  # type: ignore[no-untyped-def]
    """An engine whose prefill attention runs per chunk (each chunk ~8 ms of host calls, as on one H200): the fit
    finds that cost per chunk instead of a slower GPU, and the simulator then charges it per chunk."""
    rng = np.random.default_rng(2)
    t = _compositions((0.0, 1.0, 2.0, 4.0), (16.0, 48.0, 128.0, 256.0, 48.0))
    s, q, c, k = 4e-3, 3e-4, 8e-3, 2.5
    price = _price(job, t["tokens"].to_numpy(), t["seqs"].to_numpy(), composition=t, rate=k)
    t["period"] = (s + q * t["seqs"] + c * t["prefill_seqs"] + price) * (1 + 0.01 * rng.uniform(-1, 1, len(t)))
    f = fit_steps(job, t)
    assert f["chunk_us"] == pytest.approx(8000, rel=0.05)
    assert f["scheduler_us"] == pytest.approx(4000, rel=0.1)
    assert f["rate_factor"] == pytest.approx(2.5, rel=0.1)
    # the simulator's step: the plan's chunk_us per prefill chunk, nothing for a decode-only step
    from workbench.sim.serve import workers

    w = workers(job.cluster, job.model, job.plan.with_(chunk_us=8000.0))[0]
    w0 = workers(job.cluster, job.model, job.plan)[0]
    args = (np.array([100.0, 100.0]), np.array([2304.0, 2304.0]), np.array([0.0, 0.0]), np.array([2.0, 2.0]),
            np.array([False, False]))
    extra = w.cost.step_seconds(*args, np.array([0.0, 2.0])) - w0.cost.step_seconds(*args, np.array([0.0, 2.0]))
    assert extra == pytest.approx([0.0, 0.016])
    assert w.cost.step(100.0, 2304.0, 0.0, 2.0, False, 2.0) == pytest.approx(float(w.cost.step_seconds(*args, 2.0)[0]))


def test_step_fit_recovers_a_cost_per_prefill_step(job) -> None:  # type: ignore[no-untyped-def]
    """An engine without CUDA graphs whose step costs the host a set-up once when it holds any prefill chunk (3 ms,
    as the 2-vCPU VM's sweep shows), beside 1 ms per chunk: the fit finds both apart, and the simulator charges the
    plan's `prefill_step_us` once per such step in all three of its prices (arrays, one step, the compiled loop)."""
    from workbench.sim import serve_kernel as K
    from workbench.sim.serve import workers

    rng = np.random.default_rng(4)
    t = _compositions((0.0, 1.0, 2.0, 4.0), (16.0, 48.0, 128.0, 256.0, 48.0))
    s, q, c, a, k = 4e-3, 3e-4, 1e-3, 3e-3, 2.5
    price = _price(job, t["tokens"].to_numpy(), t["seqs"].to_numpy(), composition=t, rate=k)
    t["period"] = ((s + q * t["seqs"] + c * t["prefill_seqs"] + a * (t["prefill_seqs"] > 0) + price)
                   * (1 + 0.01 * rng.uniform(-1, 1, len(t))))
    f = fit_steps(job, t)
    assert f["prefill_step_us"] == pytest.approx(3000, rel=0.1)
    assert f["chunk_us"] == pytest.approx(1000, rel=0.25)
    assert f["rate_factor"] == pytest.approx(2.5, rel=0.1)
    graphs = job.with_plan(job.plan.with_(cuda_graph=True))
    assert fit_steps(graphs, t)["prefill_step_us"] == 0.0      # with CUDA graphs `eager_us` is that term
    w = workers(job.cluster, job.model, job.plan.with_(prefill_step_us=3000.0))[0]
    w0 = workers(job.cluster, job.model, job.plan)[0]
    args = (np.array([100.0, 100.0, 200.0]), np.array([2304.0, 2304.0, 4608.0]), np.zeros(3), np.full(3, 2.0),
            np.zeros(3, bool))
    chunks = np.array([0.0, 1.0, 2.0])
    extra = w.cost.step_seconds(*args, chunks) - w0.cost.step_seconds(*args, chunks)
    assert extra == pytest.approx([0.0, 0.003, 0.003])
    fp, tables = w.cost.kernel_params(), w.cost.kernel_tables()
    for i in range(3):
        want = float(w.cost.step_seconds(*args, chunks)[i])
        assert w.cost.step(*(float(x[i]) for x in args[:4]), False, float(chunks[i])) == pytest.approx(want)
        assert K.step_price(fp, *tables, *(float(x[i]) for x in args[:4]), False, float(chunks[i])) == \
            pytest.approx(want)


def test_step_fit_recovers_a_cost_per_eager_step() -> None:
    """An engine that replays its decode-only steps as CUDA graphs and runs the others eagerly (each eager step ~20
    ms of host launches, overlapping its GPU work, as on one H200): with the plan's `cuda_graph` the fit finds that
    cost (plan `eager_us`) apart from the per-chunk one — also where long prefills make some eager steps GPU-bound,
    the host's time hidden under theirs — and the simulator charges it on eager steps only (the compiled scheduler's
    price too). Without `cuda_graph` there is no such column: every step is eager."""
    from workbench.serve.calibrate import rated
    from workbench.sim import serve_kernel as K
    from workbench.sim.serve import workers

    job = wb.Job.create("dgx-h100:nodes=1", "llama3.1-8b", plan="tp=1,replicas=1,cuda_graph=true",
                        workload=Serving(traffic="concurrency=2,isl=48,osl=16,requests=8"))
    rng = np.random.default_rng(3)
    t = _compositions((0.0, 0.0, 1.0, 2.0), (16.0, 48.0, 128.0, 256.0, 2048.0))
    truth = job.plan.with_(scheduler_us=300.0, seq_us=100.0, chunk_us=2000.0, eager_us=20000.0)
    w = workers(rated(job.cluster, 2.5), job.model, truth)[0]
    period = w.cost.step_seconds(t["tokens"].to_numpy(), t["prefill_work"].to_numpy(), t["decode_kv"].to_numpy(),
                                 t["sampled"].to_numpy(), (t["prefill_seqs"] == 0).to_numpy(),
                                 t["prefill_seqs"].to_numpy())
    gpu_bound = (t["prefill_tokens"] >= 2048).to_numpy()
    hidden = w.cost.step_seconds(t["tokens"].to_numpy(), t["prefill_work"].to_numpy(), t["decode_kv"].to_numpy(),
                                 t["sampled"].to_numpy(), np.ones(len(t), bool), t["prefill_seqs"].to_numpy())
    assert (period[gpu_bound] == hidden[gpu_bound]).all()     # those steps' GPU work outlasts the host's 20 ms
    t["period"] = period * (1 + 0.01 * rng.uniform(-1, 1, len(t)))
    f = fit_steps(job, t)
    assert f["eager_us"] == pytest.approx(20000, rel=0.05)
    assert f["chunk_us"] == pytest.approx(2000, rel=0.25)
    assert f["rate_factor"] == pytest.approx(2.5, rel=0.1)
    assert fit_steps(job.with_plan(job.plan.with_(cuda_graph=False)), t)["eager_us"] == 0.0
    w = workers(job.cluster, job.model, job.plan.with_(eager_us=20000.0))[0]
    w0 = workers(job.cluster, job.model, job.plan)[0]
    args = (np.array([2.0, 100.0]), np.array([0.0, 2304.0]), np.array([130.0, 0.0]), np.array([2.0, 2.0]),
            np.array([True, False]))
    extra = w.cost.step_seconds(*args) - w0.cost.step_seconds(*args)   # nothing on the graph; on the eager step,
    assert extra[0] == 0.0 and 0.015 < extra[1] <= 0.02 + 1e-12       # the 20 ms less what the GPU hid of it
    assert w.cost.step(100.0, 2304.0, 0.0, 2.0, False) == pytest.approx(float(w.cost.step_seconds(*args)[1]))
    fp, tables = w.cost.kernel_params(), w.cost.kernel_tables()
    for i in range(2):
        got = K.step_price(fp, *tables, float(args[0][i]), float(args[1][i]), float(args[2][i]), float(args[3][i]),
                           bool(args[4][i]), 0.0)
        assert got == pytest.approx(float(w.cost.step_seconds(*args)[i]))


def test_the_frontend_fit_takes_each_runs_median_over_its_passes(ckpt: Path) -> None:
    from workbench.serve.microbench import measure_frontend

    fe = measure_frontend(str(ckpt), runs=((1, 1, 3), (2, 6, 4), (2, 1, 6)), repeats=2, **SPEC)
    assert fe["runs"] == 3 and fe["repeats"] == 2
    assert fe["spread"] >= 1.0 and math.isfinite(fe["spread"])
    assert fe["fe_request_us"] + fe["fe_token_us"] > 0   # the server process spends CPU on a request


def _graph_job(model: str = "llama3.1-8b") -> wb.Job:
    return wb.Job.create("dgx-h100:nodes=1", model, plan="tp=1,replicas=1,cuda_graph=true",
                         workload=Serving(traffic="concurrency=2,isl=48,osl=16,requests=8"))


def _small_llama(tmp_path: Path) -> str:
    """The config of the 1.2 B Llama the GPU calibration serves (its steps bound by the host, not the GPU)."""
    import json

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 258,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path / "config.json")


def _periods(job: wb.Job, t: pd.DataFrame, graph_host: float, eager_host: float, **costs: float) -> np.ndarray:
    """The simulator's step periods of `t` under `costs`, the terms every step has (the rates too) times
    `graph_host` and an eager step's own terms (`chunk_us`, `eager_us`) times `eager_host`: a host whose eager
    launching drifted apart."""
    from workbench.serve.calibrate import rated
    from workbench.sim.serve import workers

    c = dict(costs)
    plan = job.plan.with_(scheduler_us=c["scheduler_us"] * graph_host, seq_us=c["seq_us"] * graph_host,
                          chunk_us=c["chunk_us"] * eager_host, eager_us=c["eager_us"] * eager_host)
    w = workers(rated(job.cluster, graph_host), job.model, plan)[0]
    return np.asarray(w.cost.step_seconds(t["tokens"].to_numpy(), t["prefill_work"].to_numpy(),
                                          t["decode_kv"].to_numpy(), t["sampled"].to_numpy(),
                                          (t["prefill_seqs"] == 0).to_numpy(), t["prefill_seqs"].to_numpy()))


def test_the_terms_every_step_has_come_from_the_graph_steps(tmp_path: Path) -> None:
    """An engine whose eager steps cost the host more per running decode than its graph steps do (the sweep's
    eager steps drifted with its passes, more decodes later: 91 µs a sequence fitted jointly on one H200 against
    36 for its graph steps): the per-step and per-sequence costs come from the graph steps alone, so the eager
    steps' extra does not leak into them."""
    from workbench.serve.calibrate import fit_steps

    job = _graph_job(_small_llama(tmp_path))
    t = _compositions((0.0, 0.0, 1.0, 2.0), (16.0, 48.0, 128.0, 48.0, 16.0))
    costs = dict(scheduler_us=1500.0, seq_us=40.0, chunk_us=1000.0, eager_us=8000.0)
    eager = (t["prefill_seqs"] > 0).to_numpy()
    t["period"] = _periods(job, t, 1.0, 1.0, **costs) + eager * 300e-6 * t["decode_seqs"].to_numpy()
    f = fit_steps(job, t)
    g = ~eager
    got = (f["scheduler_us"] + f["seq_us"] * t["seqs"][g]) * 1e-6 + _price(
        job, t["tokens"][g].to_numpy(), t["seqs"][g].to_numpy(), composition=t[g], rate=f["rate_factor"])
    assert np.abs(got / t["period"][g] - 1).max() < 0.02   # the graph steps priced as they ran
    assert f["seq_us"] < 60                                 # a joint fit: 200 µs a sequence


def test_a_run_gives_one_contention_for_graph_steps_and_one_for_eager_steps() -> None:
    """The run's own steps scale the sweep's fit to the machine's state then: with CUDA graphs and both kinds of
    step, the decode-only steps scale the terms every step has and the eager steps their own terms."""
    from workbench.serve.calibrate import with_contention

    job = _graph_job()
    t = _compositions((0.0, 0.0, 0.0, 1.0), (48.0,) * 5)
    costs = dict(scheduler_us=1500.0, seq_us=40.0, chunk_us=1000.0, eager_us=8000.0)
    t["period"] = _periods(job, t, 1.2, 0.7, **costs)
    f = {"rate_factor": 1.0, **costs}
    out = with_contention(job, f, t)
    assert out["contention_graph"] == pytest.approx(1.2, rel=0.02)
    assert out["contention_eager"] == pytest.approx(0.7, rel=0.05)
    assert out["seq_us"] == pytest.approx(48, rel=0.02) and out["eager_us"] == pytest.approx(5600, rel=0.05)
    plain = with_contention(job.with_plan(job.plan.with_(cuda_graph=False)), f, t)   # every step eager: one factor
    assert "contention_graph" not in plain and plain["contention"] > 0
