"""A corpus of bad invocations of every `workbench` command, run in-process (issue 12).

Each must exit 2 with one bounded `error:` line naming the field, without a traceback, quickly,
and without writing anything. `{d}` is a scratch folder holding the hostile files below.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest

SIM = ["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "llama3-8b"]
GPT = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"
P2P = ["simulate", "p2p", "--cluster", "aws-p5:nodes=2"]
COLL = ["simulate", "collective", "--cluster", "aws-p5:nodes=2", "--op", "all_reduce"]
SEARCH = ["search", "train", "--cluster", "aws-p5:nodes=2", "--model", "llama3-8b"]
RUN = ["run", "train", "--no-sim", "--overhead", "none"]
BENCH_SERVE = ["bench", "serve", "--url", "http://127.0.0.1:9"]
DEPLOY = ["deploy", "k8s", "--cluster", "aws-p5:nodes=2", "--model", "llama3-8b", "--plan", "tp=8,dp=2"]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9))
FILES = {
    "inf.yaml": "nodes: [{gpu: H100-SXM, gpus: .inf}]\n",
    "huge.yaml": "nodes: [{gpu: CPU, gpus: 1000000000}]\n",
    "nan_specs.yaml": "nodes: [{gpu: CPU, gpus: 1, specs: {fp32_tflops: .nan}}]\n",
    "bomb.yaml": BOMB,
    "deep.json": "[" * 1000 + "]" * 1000,
    "deep.yaml": "- " * 500 + "x\n",
    "dup.yaml": "nodes: [{gpu: H100-SXM}]\nnodes: [{gpu: A100-80GB}]\n",
    "list.yaml": "- 1\n- 2\n",
    "hf_nan.json": '{"num_hidden_layers": NaN, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}',
    "hf_big.json": '{"num_hidden_layers": 1000000000000, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}',
    "hf_frac.json": '{"num_hidden_layers": 32.5, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100}',
    "hf_str.json": '{"num_hidden_layers": 2, "hidden_size": "64", "num_attention_heads": 4, "vocab_size": 100}',
    "hf_tie.json": '{"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100, '
                   '"tie_word_embeddings": "no"}',
    "hf_list.json": "[]",
    "hf_null.json": "null",
    "hf_text.json": '"llama"',
    "job_dup.yaml": "cluster: aws-p5\nmodel: llama3-8b\nplan: tp=8,tp=4\n",
    "job_nan.yaml": "cluster: aws-p5\nmodel: llama3-8b\nworkload: {kind: training, lr: .nan}\n",
    "job_list.yaml": "[1, 2]\n",
    "job_kind.yaml": "cluster: aws-p5\nmodel: llama3-8b\nkind: cooking\n",
    # checkpoint folders `workbench serve` must refuse before starting a worker
    "ckpt_noweights/config.json": '{"architectures": ["LlamaForCausalLM"], "vocab_size": 258, "hidden_size": 64, '
                                  '"intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}',
    "ckpt_gpt2/config.json": '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2}',
    "ckpt_gpt2/model.safetensors": "not read: the architecture is refused first",
    "ckpt_bin/config.json": '{"model_type": "llama", "vocab_size": 258, "hidden_size": 64, "intermediate_size": 128, '
                            '"num_hidden_layers": 2, "num_attention_heads": 4}',
    "ckpt_bin/pytorch_model.bin": "a pickle the server does not load",
    "ckpt_badjson/config.json": '{"architectures": ["LlamaForCausalLM"],',
    "ckpt_nokeys/config.json": '{"architectures": ["LlamaForCausalLM"]}',
}
BINARY = {"bin.yaml": b"\xff\xfe\x00\x81garbage", "bin.json": bytes(range(256))}

# (argv, a piece of the message that names the field)
CORPUS: list[Any] = [
    # ---- numbers in cluster specs
    (["topology", "show", "aws-p5:oversubscription=nan"], "aws-p5.oversubscription"),
    (["topology", "show", "aws-p5:oversubscription=inf"], "aws-p5.oversubscription"),
    (["topology", "show", "aws-p5:oversubscription=-2"], "aws-p5.oversubscription"),
    (["topology", "show", "aws-p5:oversubscription=1e400"], "aws-p5.oversubscription"),
    (["topology", "show", "aws-p5:nodes=100000"], "aws-p5.nodes"),
    (["topology", "show", "aws-p5:nodes=0"], "aws-p5.nodes"),
    (["topology", "show", "aws-p5:nodes=-3"], "aws-p5.nodes"),
    (["topology", "show", "aws-p5:nodes=2.5"], "aws-p5.nodes"),
    (["topology", "show", "aws-p5:nodes=２"], "aws-p5.nodes"),
    (["topology", "show", "aws-p5:nodes=" + "9" * 5000], "aws-p5"),
    (["topology", "show", "aws-p5:nodes=" + "9" * 500], "aws-p5.nodes"),
    (["topology", "show", "aws-p5:nodes=2,nodes=3"], "aws-p5"),
    (["topology", "show", "aws-p5:nics=-1"], "aws-p5.nics"),
    (["topology", "show", "aws-p5:leaf_ports=0"], "aws-p5.leaf_ports"),
    (["topology", "show", "aws-p5:gpu=" + "X" * 10000], "aws-p5"),
    (["topology", "show", "aws-p5:gpu=" + "X" * 1000], "aws-p5.gpu"),
    (["topology", "show", "aws-p5:racks=2"], "aws-p5"),
    (["topology", "show", "aws-p5:nodes"], "aws-p5"),
    (["topology", "show", "aws-p5:=2"], "aws-p5"),
    (["topology", "show", "x" * 300], "cluster"),
    (["topology", "show", "x" * 100000 + ":nodes=2"], "cluster"),
    (["topology", "show", "{d}"], "cluster"),
    (["topology", "show", "{d}/missing.yaml"], "cluster"),
    # ---- cluster files
    (["topology", "validate", "{d}/inf.yaml"], "nodes[0].gpus"),
    (["topology", "validate", "{d}/huge.yaml"], "nodes[0].gpus"),
    (["topology", "validate", "{d}/nan_specs.yaml"], "nodes[0].specs.fp32_tflops"),
    (["topology", "validate", "{d}/bomb.yaml"], "cluster file"),
    (["topology", "validate", "{d}/deep.json"], "cluster file"),
    (["topology", "validate", "{d}/deep.yaml"], "cluster file"),
    (["topology", "validate", "{d}/dup.yaml"], "cluster file"),
    (["topology", "validate", "{d}/list.yaml"], "cluster"),
    (["topology", "validate", "{d}/bin.yaml"], "cluster"),
    (["topology", "validate", "{d}/bin.json"], "cluster"),
    (["topology", "validate", "{d}"], "cluster"),
    (["topology", "validate", "/dev/zero"], "cluster"),
    (["topology", "validate", "{d}/" + "a" * 300 + ".yaml"], "cluster"),
    (["topology", "show", "{d}/bomb.yaml"], "cluster file"),
    (["topology", "path", "aws-p5:nodes=2", "n0.g0", "n1.g0", "--lane", "-1"], "--lane"),
    (["topology", "path", "aws-p5:nodes=2", "n0.g0", "n1.g0", "--lane", "99999"], "--lane"),
    (["topology", "path", "aws-p5:nodes=nan", "n0.g0", "n1.g0"], "aws-p5.nodes"),
    # ---- sizes and counts of the network simulators
    (P2P + ["--bytes", "1e400"], "--bytes"),
    (P2P + ["--bytes", "1e-9"], "--bytes"),
    (P2P + ["--bytes", "nan"], "--bytes"),
    (P2P + ["--bytes", "-1"], "--bytes"),
    (P2P + ["--bytes", "１KiB"], "--bytes"),
    (P2P + ["--bytes", "4XiB"], "--bytes"),
    (P2P + ["--bytes", "9" * 100000], "--bytes"),
    (P2P + ["--page-size", "0.5"], "--page-size"),
    (P2P + ["--pages", "-1"], "--pages"),
    (P2P + ["--pages", "1.5"], "--pages"),
    (P2P + ["--peers", "nan"], "--peers"),
    (COLL + ["--bytes", "1e400"], "--bytes"),
    (COLL + ["--bytes", "inf"], "--bytes"),
    (COLL + ["--bytes", "1MiB", "--gpus", "0"], "--gpus"),
    (COLL + ["--bytes", "1MiB", "--gpus", "-1"], "--gpus"),
    (COLL + ["--bytes", "1MiB", "--gpus", "9" * 5000], "--gpus"),
    (["simulate", "collective", "--cluster", "aws-p5:nodes=2", "--op", "x" * 5000, "--bytes", "1MiB"], "--op"),
    # ---- models
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", GPT + ",ffn=-100000", "--plan", "tp=1"],
     "model.ffn"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", GPT + ",head_dim=-1", "--plan", "tp=1"],
     "model.head_dim"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", GPT + ",layers=1e12", "--plan", "tp=1"],
     "model"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", GPT + ",gated=maybe", "--plan", "tp=1"],
     "model.gated"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", GPT + ",colour=red", "--plan", "tp=1"],
     "model"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "llama3-8b:seq=nan", "--plan", "tp=8"],
     "model.seq"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "llama3-8b:seq=0", "--plan", "tp=8"],
     "model.seq"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "y" * 300, "--plan", "tp=8"], "model"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}", "--plan", "tp=8"], "model"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_nan.json", "--plan", "tp=1"],
     "model.num_hidden_layers"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_big.json", "--plan", "tp=1"],
     "model.num_hidden_layers"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_frac.json", "--plan", "tp=1"],
     "model.num_hidden_layers"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_str.json", "--plan", "tp=1"],
     "model.hidden_size"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_tie.json", "--plan", "tp=1"],
     "model.tie_word_embeddings"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_list.json", "--plan", "tp=1"], "model"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_null.json", "--plan", "tp=1"], "model"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/hf_text.json", "--plan", "tp=1"], "model"),
    (["simulate", "train", "--cluster", "aws-p5:nodes=2", "--model", "{d}/bin.json", "--plan", "tp=1"], "model"),
    # ---- plans
    (SIM + ["--plan", "tp=8,tp=4"], "plan"),
    (SIM + ["--plan", "tp=nan"], "plan.tp"),
    (SIM + ["--plan", "tp=inf"], "plan.tp"),
    (SIM + ["--plan", "tp=-8"], "plan.tp"),
    (SIM + ["--plan", "tp=1.5"], "plan.tp"),
    (SIM + ["--plan", "tp=８"], "plan.tp"),
    (SIM + ["--plan", "dp=" + "9" * 5000], "plan"),
    (SIM + ["--plan", "dp=" + "9" * 500], "plan.dp"),
    (SIM + ["--plan", "gbs=1e400"], "plan.gbs"),
    (SIM + ["--plan", "zero=4"], "plan.zero"),
    (SIM + ["--plan", "fsdp=maybe"], "plan.fsdp"),
    (SIM + ["--plan", "sp=2"], "plan.sp"),
    (SIM + ["--plan", "recompute=" + "r" * 3000], "plan.recompute"),
    (SIM + ["--plan", "colour=red"], "plan"),
    (SIM + ["--plan", "tp=8", "--trace", "/nonexistent/dir/t.json"], "--trace"),
    (SIM + ["--plan", "tp=8", "--trace", "{d}"], "--trace"),
    (SIM + ["--plan", "tp=8", "--trace", "/proc/t.json"], "--trace"),
    (SIM + ["--plan", "tp=8,dp=2,gbs=16", "--trace", "/dev/full"], "--trace"),  # a full disk: results, then the error
    (SEARCH + ["--gbs", "-1"], "--gbs"),
    (SEARCH + ["--gbs", "nan"], "--gbs"),
    (SEARCH + ["--gbs", "64", "--top", "-1"], "--top"),
    (SEARCH + ["--gbs", "64", "--fix", "tp=nan"], "plan.tp"),
    (SEARCH + ["--gbs", "64", "--csv", "/nonexistent/c.csv"], "--csv"),
    # ---- real runs: rejected at the edge, before any rank starts
    (RUN + ["--plan", "dp=2", "--lr", "nan"], "--lr"),
    (RUN + ["--plan", "dp=2", "--lr", "-1"], "--lr"),
    (RUN + ["--plan", "dp=2", "--lr", "inf"], "--lr"),
    (RUN + ["--plan", "dp=2", "--lr", "100"], "workload.lr"),
    (RUN + ["--plan", "dp=2", "--timeout", "0"], "--timeout"),
    (RUN + ["--plan", "dp=2", "--timeout", "nan"], "--timeout"),
    (RUN + ["--plan", "dp=2", "--steps", "0"], "steps"),
    (RUN + ["--plan", "dp=2", "--steps", "３"], "--steps"),
    (RUN + ["--plan", "dp=2,dp=4"], "plan"),
    (RUN + ["--plan", "dp=nan"], "plan.dp"),
    (RUN + ["--plan", "dp=2", "--model", GPT + ",ffn=-1"], "model.ffn"),
    (RUN + ["--plan", "dp=2", "--trace", "/nonexistent/run.json"], "--trace"),
    (RUN + ["--plan", "dp=2", "--trace", "/proc/run.json"], "--trace"),
    (RUN + ["--plan", "dp=2", "--cluster", "aws-p5:nodes=nan"], "aws-p5.nodes"),
    # ---- other commands
    (["demo", "--out", "/nonexistent/dir/x.html"], "--out"),
    (["demo", "--out", "{d}"], "--out"),
    (["bench", "sim", "--out", "/nonexistent/s.json"], "--out"),
    (["bench", "kernels", "--out", "/nonexistent/k.json"], "--out"),
    (["bench", "dashboard", "--out", "/nonexistent/d.json"], "--out"),
    (["bench", "dashboard", "--rate", "nan"], "--rate"),
    (["bench", "transport", "--lanes", "-1"], "--lanes"),
    (["bench", "transport", "--trace", "/nonexistent/t.json"], "--trace"),
    (["emulate", "--hosts", "-2"], "--hosts"),
    (["emulate", "--delay-ms", "nan"], "--delay-ms"),
    (["emulate", "--rate", "nan"], "--rate"),
    (["emulate", "--rate", "1e400gbit"], "--rate"),
    (["calibrate", "nccl-tests", "--cluster", "aws-p5:nodes=2", "{d}/bin.yaml"], "nccl-tests output"),
    (["calibrate", "nccl-tests", "--cluster", "aws-p5:nodes=2", "{d}"], "nccl-tests output"),
    (["calibrate", "nccl-tests", "--cluster", "aws-p5:nodes=nan", "{d}/list.yaml"], "aws-p5.nodes"),
    (DEPLOY + ["--out", "/nonexistent/dir/sub"], "--out"),
    (DEPLOY + ["--out", "{d}/inf.yaml"], "--out"),
    (DEPLOY + ["--target-waiting", "-1", "--out", "{d}/o"], "--target-waiting"),
    (["deploy", "k8s", "--job", "{d}/job_dup.yaml", "--out", "{d}/o"], "plan"),
    (["deploy", "k8s", "--job", "{d}/job_nan.yaml", "--out", "{d}/o"], "workload.lr"),
    (["deploy", "k8s", "--job", "{d}/job_list.yaml", "--out", "{d}/o"], "job"),
    (["deploy", "k8s", "--job", "{d}/job_kind.yaml", "--out", "{d}/o"], "workload.kind"),
    (["deploy", "k8s", "--job", "{d}/bomb.yaml", "--out", "{d}/o"], "job"),
    (["deploy", "k8s", "--job", "{d}/bin.yaml", "--out", "{d}/o"], "job"),
    (["deploy", "swarm", "--job", "{d}", "--out", "{d}/o"], "job"),
    # ---- serving
    (BENCH_SERVE + ["--traffic", "concurrency=4,isl=8,osl=8", "--slo", "ttft=-1"], "slo"),
    (BENCH_SERVE + ["--traffic", "concurrency=4,isl=8,osl=8,requests=1e400"], "traffic"),
    (BENCH_SERVE + ["--traffic", "concurrency=4,isl=8,osl=8,requests=nan"], "traffic"),
    (BENCH_SERVE + ["--traffic", "concurrency=-4,isl=8,osl=8"], "traffic"),
    (BENCH_SERVE + ["--traffic", "rate=4,concurrency=4,isl=8,osl=8"], "traffic"),
    (BENCH_SERVE + ["--traffic", "concurrency=4,isl=8,osl=8", "--save-requests", "/nonexistent/r.csv"],
     "--save-requests"),
    (["serve", "demo", "--port", "99999999"], "--port"),
    (["serve", "demo", "--max-seqs", "-1"], "--max-seqs"),
    (["serve", "{d}/missing"], "model"),
    (["serve", "{d}"], "model"),  # no config.json: refused before any worker starts
    (["serve", "{d}/ckpt_noweights"], "model"),
    (["serve", "{d}/ckpt_gpt2"], "model"),
    (["serve", "{d}/ckpt_bin", "--replicas", "1:2"], "model"),
    (["serve", "{d}/ckpt_badjson"], "model"),
    (["serve", "{d}/ckpt_nokeys"], "model"),
]


def _id(argv: list[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 100 else f"{text[:60]}…{text[-39:]}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    for name, text in FILES.items():
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_text(text)
    for name, data in BINARY.items():
        (d / name).write_bytes(data)
    return d


def run_cli(argv: list[str]) -> tuple[int, str]:
    from workbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize(("argv", "field"), CORPUS,
                         ids=[_id(c.values[0] if hasattr(c, "values") else c[0]) for c in CORPUS])
def test_bad_invocation_is_a_clean_error(scratch: Path, argv: list[str], field: str) -> None:
    argv = [a.replace("{d}", str(scratch)) for a in argv]
    before = set(os.listdir(scratch))
    t0 = time.perf_counter()
    code, text = run_cli(argv)
    took = time.perf_counter() - t0
    assert code == 2, f"exit {code}: {text[-500:]}"
    assert "Traceback" not in text, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert "error: " in last and field in last, last[:500]
    assert len(last) <= 2100 and len(text) <= 5000, len(text)
    assert took < 30, took
    assert set(os.listdir(scratch)) == before, "a failed command created files"


def test_corpus_is_large() -> None:
    assert len(CORPUS) >= 100
