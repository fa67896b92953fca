"""The native engine: the Llama model equals Hugging Face's, every sharding by torch's engines trains the
same model as one process, checkpoints resume, the export loads in `transformers`, plans it cannot run
name their field, and GPU calibration from sweeps moves the GPU's parameters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from workbench.core.job import Job, Training  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.models.costs import parameter_count  # noqa: E402
from workbench.models.presets import load_model  # noqa: E402
from workbench.runner import run_train  # noqa: E402
from workbench.runner.launcher import runnable_plan  # noqa: E402
from workbench.runner.llama import build, hf_config, hf_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "llama3-8b:layers=2,hidden=64,heads=4,kv_heads=2,head_dim=16,ffn=160,vocab=512,seq=32"
RESULTS = ROOT / "benchmarks" / "results" / "h200x2-native"


@pytest.mark.slow
def test_llama_equals_transformers_llama_and_counts_the_simulators_parameters() -> None:
    transformers = pytest.importorskip("transformers")
    spec = load_model(LLAMA)
    ours = build(spec, seed=3)
    assert ours.num_params() == parameter_count(spec).total
    cfg = {k: v for k, v in hf_config(spec).items() if k not in ("architectures", "model_type", "torch_dtype")}
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float()
    missing = ref.load_state_dict(hf_state_dict(ours.state_dict(), spec, torch.float32), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randint(0, spec.vocab, (2, spec.seq))
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x).logits, atol=1e-5)
    moe = spec.with_overrides(experts=4, top_k=2, expert_ffn=32, shared_experts=1, dense_layers=1)
    m = build(moe)
    assert m.num_params() == parameter_count(moe).total and m(x).shape == (2, spec.seq, spec.vocab)


def test_corpus_is_tokenised_with_a_trained_bpe_and_batches_shift_by_one(tmp_path: Path) -> None:
    from workbench.runner import data

    c = data.prepare(data.default_corpus(), 1000, tmp_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(c.tokenizer))
    text = "The simulator and the runner take the same Job."
    assert tok.decode(tok.encode(text).ids) == text and tok.get_vocab_size() <= 1000
    ids = c.load()
    assert len(ids) > 10_000 and int(ids.max()) < 1000
    x, y = data.batch(ids, step=3, size=4, seq=16, seed=1)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.batch(ids, step=3, size=4, seq=16, seed=1)
    assert torch.equal(x, x2)  # the same batch on every rank
    raw = data.prepare(data.default_corpus(), 128, tmp_path)
    assert raw.tokenizer is None and int(raw.load().max()) < 128
    with pytest.raises(WorkbenchError, match="workload.corpus"):
        data.corpus_files(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("plan,workload,field", [
    ("cp=2", {}, "plan.cp"), ("ep=2", {}, "plan.ep"), ("precision=fp8", {}, "plan.precision"),
    ("offload=1", {}, "plan.offload"), ("tp=3", {}, "plan.tp"), ("pp=2,vpp=2,mbs=1,gbs=3", {}, "plan.gbs"),
    ("pp=5,vpp=1", {}, "plan.pp")])
def test_plans_the_native_engine_cannot_run_name_the_field(plan: str, workload: dict, field: str) -> None:
    job = Job.create("dgx-h100", LLAMA.replace("layers=2", "layers=4"), plan, Training(**workload))
    with pytest.raises(WorkbenchError, match=field.replace(".", r"\.")):
        runnable_plan(job)


def test_native_plan_accepts_what_torch_does() -> None:
    job = Job.create("dgx-h100", LLAMA, "dp=2,tp=2,zero=3,recompute=selective,mbs=1,gbs=4", Training())
    p = runnable_plan(job)
    assert (p.sp, p.zero, p.recompute, p.precision) == (True, 3, "selective", "fp32")
    with pytest.raises(WorkbenchError, match="workload.engine"):
        Training(engine="jax")
    with pytest.raises(WorkbenchError, match="workload.export_dir"):
        Training(engine="megatron", export_dir="/tmp/x")


def _frozen_corpus(tmp_path: Path) -> str:
    """A copy of the default corpus (the repo's docs), so edits to docs/ during a test change nothing."""
    from workbench.runner import data

    f = tmp_path / "corpus.md"
    f.write_text("\n\n".join(p.read_text() for p in data.default_corpus()))
    return str(f)


def _patterned_corpus(tmp_path: Path) -> str:
    """A fixed, strongly patterned text: three steps lower its loss whatever the repo's docs say (the docs
    corpus changes with every docs edit, and three steps on it need not)."""
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "theta"]
    f = tmp_path / "patterned.md"
    f.write_text("\n\n".join(" ".join(f"{words[(i * 3 + j) % 8]}{(i + j) % 13}" for j in range(40))
                              for i in range(400)))
    return str(f)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_sharding_trains_the_same_model_as_one_process(tmp_path: Path) -> None:
    corpus = _patterned_corpus(tmp_path)

    def losses(plan: str) -> list[float]:
        r = run_train(model=LLAMA.replace("layers=2", "layers=4"), plan=plan, steps=3, lr=3e-3, timeout=150,
                      corpus=corpus)
        assert r.metrics["engine"] == "native" and r.metrics["steps"] == 3
        ev = r.events
        assert {"forward", "backward", "optimizer"} <= set(ev["op"]) and (ev["end"] >= ev["start"]).all()
        assert (ev.loc[ev["op"] == "forward", "flops"] > 0).all() and "stage" in ev.columns
        return list(r.metrics["losses"])

    ref = losses("dp=1,mbs=2,gbs=4")
    assert ref[-1] < ref[0]
    for plan in ("tp=2,mbs=2,gbs=4", "pp=2,vpp=2,mbs=1,gbs=4", "dp=2,zero=3,recompute=full,mbs=1,gbs=4"):
        assert losses(plan) == pytest.approx(ref, rel=2e-4), plan


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_resumes_and_the_export_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ck, hf, corpus = tmp_path / "ck", tmp_path / "hf", _frozen_corpus(tmp_path)
    spec = LLAMA.replace("vocab=512", "vocab=600")  # ≥ 300 tokens: a trained BPE tokenizer is exported too
    kw = {"model": spec, "plan": "dp=2,mbs=2,gbs=8", "lr": 3e-3, "timeout": 150, "corpus": corpus}
    whole = run_train(steps=4, **kw).metrics["losses"]
    run_train(steps=2, checkpoint_dir=str(ck), **kw)
    assert (ck / "step-2" / ".metadata").exists()
    resumed = run_train(steps=2, checkpoint_dir=str(ck), export_dir=str(hf), **kw).metrics["losses"]
    assert resumed == pytest.approx(whole[2:], rel=1e-4)  # steps 3-4 after a restart = steps 3-4 of one run
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    ids = torch.tensor([tok.encode("The simulator and the runner take the same Job.")])
    loss = float(model(ids, labels=ids).loss)
    assert math.isfinite(loss) and loss < math.log(600) + 0.5


@pytest.mark.slow
def test_gpu_calibration_from_the_h200_sweeps_moves_compute_and_link() -> None:
    from workbench.calibration.nccl_tests import read_nccl_tests
    from workbench.calibration.run import fit_nccl_sweep, from_sweeps, predict_nccl
    from workbench.core.engines import simulator
    from workbench.topology.model import Cluster, Fabric, Node

    host = Cluster(name="local (2x H200)", nodes=(Node(gpu="H200", gpus=2, intra="nvswitch"),),
                   fabric=Fabric(kind="switch", switch="ethernet"))
    gemm = pd.read_csv(RESULTS / "gemm.csv")
    nccl = pd.concat([read_nccl_tests(f, f.stem.removeprefix("nccl-")) for f in sorted(RESULTS.glob("nccl-*.txt"))])
    cal = from_sweeps(host, gemm, nccl, ranks=2)
    specs = dict(cal.nodes[0].specs)
    assert {"bf16_tflops", "memory_GBps", "nvlink_GBps", "nvlink_latency_us"} <= set(specs)
    spec = cal.nodes[0].gpu_spec
    assert spec.peak("bf16") == specs["bf16_tflops"] and spec.memory_GBps == specs["memory_GBps"]
    big = nccl[nccl["size"] >= 64 << 20]
    err = np.abs(np.log(predict_nccl(cal, big, 2) / (big["time_us"].to_numpy(float) * 1e-6)))
    assert float(np.median(err)) < 0.15  # the fitted link reproduces the bandwidth-bound rows
    # a synthetic sweep from known rates is fitted back to them
    truth = Cluster(name="t", nodes=(Node(gpu="H200", gpus=2, intra="nvswitch", specs=(
        ("nvlink_GBps", 600.0), ("nvlink_latency_us", 40.0))),), fabric=host.fabric)
    rows = pd.DataFrame([{"op": op, "size": 4**i} for op in ("all_reduce", "all_gather") for i in range(5, 16)])
    rows["time_us"] = predict_nccl(truth, rows, 2) * 1e6
    fit = fit_nccl_sweep(host, rows, 2)
    assert fit["nvlink_GBps"] == pytest.approx(600, rel=0.02) and fit["nvlink_latency_us"] == pytest.approx(40, rel=0.05)
    job = Job.create(host, "llama3-8b:layers=16,hidden=2048,heads=16,kv_heads=4,head_dim=128,ffn=8192,vocab=32000,"
                     "seq=2048", "tp=2,sp=1,dp=1,pp=1,mbs=8,gbs=8,zero=0,precision=bf16", Training(backend="nccl"))
    sim = simulator("training")
    before, after = sim(job), sim(job.with_cluster(cal))
    assert before.metrics["step_seconds"] != after.metrics["step_seconds"]


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_native_bf16_step_on_cuda() -> None:
    if torch.cuda.device_count() < 1:
        pytest.skip("no CUDA GPU")
    r = run_train(model=LLAMA, plan="dp=1,mbs=2,gbs=4", steps=3, backend="nccl", timeout=200)
    assert r.metrics["plan"]["precision"] == "bf16" and len(r.metrics["losses"]) == 3 and r.metrics["mfu"] > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_native_worker_under_plain_torchrun_and_load_run(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    from workbench.runner import load_run
    from workbench.runner.launcher import _free_port
    from workbench.topology import discover

    out = tmp_path / "job"
    subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "workbench.runner.worker",
                    "--model", LLAMA, "--plan", "pp=2,mbs=1,gbs=4", "--steps", "3", "--out", str(out),
                    "--corpus", _frozen_corpus(tmp_path)], check=True, capture_output=True, timeout=200)
    r = load_run(out, cluster=discover(cpu_ranks=2, measure=False))
    assert r.metrics["engine"] == "native" and r.metrics["steps"] == 3 and r.metrics["ranks"] == 2
    fwd = r.events[r.events["op"] == "forward"]
    assert set(fwd["stage"]) == {0, 1} and len(fwd) == 2 * 3 * 4  # 2 stages × 3 steps × 4 micro-batches
