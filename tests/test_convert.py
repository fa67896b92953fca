"""The converter (checkpoint → package laid out by a placement) and the loader, on small random
Llama and Mixtral checkpoints written by Hugging Face `transformers` (CPU, fp32).

Stated tolerance for quantised layers (fp8 e4m3 / int8, one fp32 scale per 128×128 block): every
dequantised weight equals the torch reference quantise→dequantise of the original exactly, and
the logits' relative RMS error ‖Δ‖/‖ref‖ stays below 0.10 (fp8) and 0.02 (int8) on these models.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from workbench.cli import main  # noqa: E402
from workbench.convert import convert, load_package, load_stage, read_manifest, verify  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.plan.placement import Placement, Replica, Stage  # noqa: E402

IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 1, 64, 128, 5, 33, 200]])


def _tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    m.save_pretrained(d, max_shard_size="300KB")  # sharded, with model.safetensors.index.json
    _tokenizer(d)
    with torch.no_grad():
        ref = m(IDS).logits
    return d, cfg, ref


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    d = tmp_path_factory.mktemp("mixtral")
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    torch.manual_seed(1)
    m = MixtralForCausalLM(cfg).eval()
    m.save_pretrained(d)  # one file, no index
    with torch.no_grad():
        ref = m(IDS).logits
    return d, cfg, ref


def _pl(n: int, splits: list[tuple[int, int, str]]) -> Placement:
    return Placement("t", n, (Replica(tuple(Stage((f"n0.g{k}",), (a, b), p, "bf16") for k, (a, b, p) in enumerate(splits))),))


def _logits(cls_name: str, cfg, tensors) -> torch.Tensor:
    cls = getattr(transformers, cls_name)
    m = cls(cfg).eval()
    # load through transformers' own checkpoint reader, as a user would
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as t:
        cfg.save_pretrained(t)
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{t}/model.safetensors")
        m = cls.from_pretrained(t).eval()
    with torch.no_grad():
        return m(IDS).logits


def test_full_precision_llama_reproduces_logits_exactly(llama, tmp_path):
    d, cfg, ref = llama
    res = convert(d, _pl(4, [(0, 0, "fp32"), (1, 2, "fp32"), (3, 3, "fp32")]), tmp_path / "pkg", progress=False)
    assert res["stages"] == 3 and res["bytes_read"] > 0
    got = _logits("LlamaForCausalLM", cfg, load_package(tmp_path / "pkg"))
    assert torch.equal(got, ref)
    s0, s2 = load_stage(tmp_path / "pkg", 0), load_stage(tmp_path / "pkg", 2)
    assert "model.embed_tokens.weight" in s0 and "lm_head.weight" not in s0
    assert {k.split(".")[2] for k in s0 if k.startswith("model.layers.")} == {"0"}
    assert "lm_head.weight" in s2 and "model.norm.weight" in s2 and "model.embed_tokens.weight" not in s2
    m = read_manifest(tmp_path / "pkg")
    assert m["converter_version"] and m["config"]["num_hidden_layers"] == 4 and m["placement"]["num_layers"] == 4
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(m["copied"])
    assert (tmp_path / "pkg" / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    for row in m["files"].values():
        assert len(row["sha256"]) == 64 and all(t["precision"] == "fp32" for t in row["tensors"].values())


def test_full_precision_mixtral_reproduces_logits_exactly(mixtral, tmp_path):
    d, cfg, ref = mixtral
    convert(d, _pl(3, [(0, 1, "fp32"), (2, 2, "fp32")]), tmp_path / "pkg", progress=False)
    got = _logits("MixtralForCausalLM", cfg, load_package(tmp_path / "pkg"))
    assert torch.equal(got, ref)


def test_qwen2_naming_with_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path / "qwen"
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(2)
    m = Qwen2ForCausalLM(cfg).eval()
    m.save_pretrained(d)
    with torch.no_grad():
        ref = m(IDS).logits
    convert(d, _pl(2, [(0, 0, "fp32"), (1, 1, "int8")]), tmp_path / "pkg", progress=False)
    raw = load_stage(tmp_path / "pkg", 1, dequantize=False)
    assert raw["model.layers.1.self_attn.q_proj.bias"].dtype == torch.float32  # biases are not quantised
    assert raw["model.layers.1.self_attn.q_proj.weight"].dtype == torch.int8
    got = _logits("Qwen2ForCausalLM", cfg, load_package(tmp_path / "pkg"))
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


@pytest.mark.parametrize("fmt, tol", [("fp8", 0.10), ("int8", 0.02)])
def test_quantised_layers_within_stated_tolerance(llama, tmp_path, fmt, tol):
    from kernels.quant import dequantize_reference, quantize_reference

    d, cfg, ref = llama
    convert(d, _pl(4, [(0, 1, fmt), (2, 3, "fp32")]), tmp_path / "pkg", progress=False)
    raw = load_stage(tmp_path / "pkg", 0, dequantize=False)
    orig = {}
    for f in d.glob("*.safetensors"):
        orig.update(load_file(str(f)))
    q = "model.layers.1.mlp.down_proj.weight"
    assert raw[q].dtype == (torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
    assert raw[q + "_scale_inv"].shape == (1, 2)  # 128 x 256 in 128 x 128 blocks
    assert raw["model.layers.1.input_layernorm.weight"].dtype == torch.float32  # norms keep the checkpoint dtype
    tensors = load_package(tmp_path / "pkg")
    codes, scales = quantize_reference(orig[q], fmt)
    assert torch.equal(tensors[q], dequantize_reference(codes, scales, fmt))  # kernels.quant == torch reference
    got = _logits("LlamaForCausalLM", cfg, tensors)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < tol, rel
    m = read_manifest(tmp_path / "pkg")
    info = m["files"][m["stages"][0]["file"]]["tensors"][q]
    assert info["precision"] == fmt and info["quantized"]["scale"] == q + "_scale_inv"


def test_replicas_share_identical_stage_files(llama, tmp_path):
    d, _, _ = llama
    pl = Placement("t", 4, (Replica((Stage(("n0.g0",), (0, 3), "fp32"),)), Replica((Stage(("n0.g1",), (0, 3), "fp32"),))))
    convert(d, pl, tmp_path / "pkg", progress=False)
    m = read_manifest(tmp_path / "pkg")
    assert m["stages"][0]["file"] == m["stages"][1]["file"] and len(m["files"]) == 1


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not (out.parent / f".{out.name}.partial").exists()


def test_truncated_and_corrupt_shards_name_the_file(llama, tmp_path):
    d, _, _ = llama
    bad = tmp_path / "ck"
    shutil.copytree(d, bad)
    shard = sorted(bad.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    out = tmp_path / "pkg"
    with pytest.raises(WorkbenchError, match=f"{shard.name} is truncated or corrupt"):
        convert(bad, _pl(4, [(0, 3, "fp32")]), out, progress=False)
    _no_leftovers(out)
    shard.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + data[28:])
    with pytest.raises(WorkbenchError, match=f"{shard.name} is corrupt"):
        convert(bad, _pl(4, [(0, 3, "fp32")]), out, progress=False)
    _no_leftovers(out)


def test_missing_tensor_and_missing_gpu_are_clear_errors(llama, tmp_path):
    d, _, _ = llama
    bad = tmp_path / "ck"
    shutil.copytree(d, bad)
    tensors = {}
    for f in bad.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
        f.unlink()
    (bad / "model.safetensors.index.json").unlink()
    del tensors["model.layers.2.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(bad / "model.safetensors"))
    out = tmp_path / "pkg"
    with pytest.raises(WorkbenchError, match="model.layers.2.mlp.up_proj.weight is missing"):
        convert(bad, _pl(4, [(0, 3, "fp32")]), out, progress=False)
    _no_leftovers(out)
    pl = Placement("t", 4, (Replica((Stage(("n0.g0",), (0, 1), "fp32"), Stage(("n5.g0",), (2, 3), "fp32"))),),
                   cluster="mixed:nodes=2")
    with pytest.raises(WorkbenchError, match=r"stage 1 \(replica 0\).devices: n5.g0 is not a GPU"):
        convert(d, pl, out, progress=False)
    _no_leftovers(out)
    with pytest.raises(WorkbenchError, match="num_hidden_layers=4"):
        convert(d, _pl(5, [(0, 4, "fp32")]), out, progress=False)


def test_interrupted_run_leaves_nothing_and_restarts_clean(llama, tmp_path, monkeypatch):
    import workbench.convert.package as pkg

    d, cfg, ref = llama
    out = tmp_path / "pkg"
    real = pkg._converted
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pkg, "_converted", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(d, _pl(4, [(0, 3, "fp32")]), out, progress=False)
    _no_leftovers(out)
    monkeypatch.setattr(pkg, "_converted", real)
    stale = tmp_path / ".pkg.partial"  # as a killed process would leave it
    stale.mkdir()
    (stale / "stage-000.safetensors").write_bytes(b"junk")
    convert(d, _pl(4, [(0, 3, "fp32")]), out, progress=False)
    assert not stale.exists() and torch.equal(_logits("LlamaForCausalLM", cfg, load_package(out)), ref)
    with pytest.raises(WorkbenchError, match="already exists"):
        convert(d, _pl(4, [(0, 3, "fp32")]), out, progress=False)


def test_loader_verifies_checksums(llama, tmp_path):
    d, _, _ = llama
    out = tmp_path / "pkg"
    convert(d, _pl(4, [(0, 1, "fp32"), (2, 3, "fp32")]), out, progress=False)
    verify(out)
    f = out / read_manifest(out)["stages"][1]["file"]
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    load_stage(out, 0)  # the other stage still loads
    with pytest.raises(WorkbenchError, match="fails its checksum"):
        load_stage(out, 1)
    with pytest.raises(WorkbenchError, match="not a stage of this package"):
        load_stage(out, 7)
    (out / "manifest.json").unlink()
    with pytest.raises(WorkbenchError, match="not a complete model package"):
        read_manifest(out)


def test_tp_shards_reassemble(llama, tmp_path):
    d, _, _ = llama
    convert(d, _pl(4, [(0, 3, "fp32")]), tmp_path / "pkg", progress=False)
    full = load_stage(tmp_path / "pkg", 0)
    shards = [load_stage(tmp_path / "pkg", 0, tp_rank=r, tp_size=2, check=False) for r in range(2)]
    q, o = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(torch.cat([s[q] for s in shards], 0), full[q])
    assert torch.equal(torch.cat([s[o] for s in shards], 1), full[o])
    n = "model.layers.1.input_layernorm.weight"
    assert torch.equal(shards[1][n], full[n])
    with pytest.raises(WorkbenchError, match="not divisible by tp=3"):
        load_stage(tmp_path / "pkg", 0, tp_rank=0, tp_size=3, check=False)


def test_cli_convert_and_exit_2(llama, tmp_path, capsys):
    d, _, _ = llama
    _pl(4, [(0, 1, "fp32"), (2, 3, "int8")]).save(tmp_path / "p.yaml")
    rc = main(["convert", str(d), "--placement", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "pkg"), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["stages"] == 2
    rc = main(["convert", str(tmp_path / "nope"), "--placement", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a folder" in err and "Traceback" not in err
    _no_leftovers(tmp_path / "x")


@pytest.mark.gpu
def test_load_stage_onto_cuda(llama, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    d, _, _ = llama
    convert(d, _pl(4, [(0, 1, "fp8"), (2, 3, "fp32")]), tmp_path / "pkg", progress=False)
    cpu, gpu = load_stage(tmp_path / "pkg", 0), load_stage(tmp_path / "pkg", 0, "cuda:0")
    for k, v in cpu.items():
        assert gpu[k].device.type == "cuda" and torch.equal(gpu[k].cpu(), v)
