"""Model specs: presets against published parameter counts, closed-form FLOPs/activations, HF configs."""

from __future__ import annotations

import json

import pytest

from workbench.errors import WorkbenchError
from workbench.models import load_model, model_flops_per_token, parameter_count, preset_names
from workbench.models.costs import activation_bytes_per_token, layer_gemms
from workbench.models.presets import from_hf_config

# (preset, total params, active params) as published by the model authors
PUBLISHED = {
    "gpt3-175b": (175e9, 175e9), "gpt-1t": (1008e9, 1008e9), "llama3-8b": (8.03e9, 8.03e9),
    "llama3-70b": (70.6e9, 70.6e9), "llama3-405b": (405.9e9, 405.9e9), "deepseek-v3": (671e9, 37e9),
    "kimi-k2": (1.04e12, 32.6e9), "qwen3-235b-a22b": (235e9, 22e9), "mixtral-8x7b": (46.7e9, 12.9e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_match_published(name: str) -> None:
    pc = parameter_count(load_model(name))
    total, active = PUBLISHED[name]
    assert pc.total == pytest.approx(total, rel=0.02)
    assert pc.active == pytest.approx(active, rel=0.03)


def test_every_preset_has_a_source() -> None:
    for name in preset_names():
        assert load_model(name).source, name


def test_gpt_flops_match_narayanan_formula() -> None:
    # F = 72 B s l h^2 (1 + s/(6h) + V/(16 l h)) per iteration, i.e. per token / s·B
    m = load_model("gpt3-175b")
    n, h, s, v = m.layers, m.hidden, m.seq, m.vocab
    per_token = 72 * n * h * h * (1 + s / (6 * h) + v / (16 * n * h))
    assert model_flops_per_token(m) == pytest.approx(per_token, rel=1e-3)


def test_activation_bytes_match_korthikanti() -> None:
    m = load_model("gpt3-175b")  # dropout, MHA, GELU FFN of 4h: 34·h bytes per token without the s² term
    h = m.hidden
    assert activation_bytes_per_token(m, "dense", tp=1, sp=False) == pytest.approx(34 * h)
    assert activation_bytes_per_token(m, "dense", tp=8, sp=True) == pytest.approx(34 * h / 8)
    # without sequence parallelism: 10 h replicated + 24 h / t  (Korthikanti et al. eq. 2 minus 5as/h)
    assert activation_bytes_per_token(m, "dense", tp=8, sp=False) == pytest.approx(10 * h + 24 * h / 8)
    assert activation_bytes_per_token(m, "dense", tp=8, sp=True, recompute="full") == pytest.approx(2 * h / 8)


def test_moe_gemms_scale_with_ep() -> None:
    m = load_model("mixtral-8x7b")
    one = {g.name: g for g in layer_gemms(m, "moe", 4096, tp=1, ep=1)}
    two = {g.name: g for g in layer_gemms(m, "moe", 4096, tp=1, ep=2)}
    assert one["expert_up"].count == 8 and two["expert_up"].count == 4
    # the same work per rank: each rank's tokens·top_k rows spread over its local experts
    assert one["expert_up"].flops == pytest.approx(two["expert_up"].flops, rel=0.01)


LLAMA3_8B_CONFIG = {  # meta-llama/Meta-Llama-3-8B config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}
DEEPSEEK_V3_CONFIG = {  # deepseek-ai/DeepSeek-V3 config.json (abridged: quantization and rope fields dropped)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "tie_word_embeddings": False,
    "topk_group": 4, "v_head_dim": 128, "vocab_size": 129280,
}


QWEN3_MOE_CONFIG = {  # Qwen/Qwen3-235B-A22B config.json (abridged: rope and sliding-window fields dropped)
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "decoder_sparse_step": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "moe_intermediate_size": 1536, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 94, "num_key_value_heads": 4,
    "tie_word_embeddings": False, "vocab_size": 151936,
}
MIXTRAL_CONFIG = {  # mistralai/Mixtral-8x7B-v0.1 config.json (abridged)
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "tie_word_embeddings": False, "vocab_size": 32000,
}


@pytest.mark.parametrize("cfg,preset", [(LLAMA3_8B_CONFIG, "llama3-8b"), (DEEPSEEK_V3_CONFIG, "deepseek-v3"),
                                        (QWEN3_MOE_CONFIG, "qwen3-235b-a22b"), (MIXTRAL_CONFIG, "mixtral-8x7b")])
def test_hf_config_matches_preset(cfg: dict, preset: str, tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    m = load_model(str(path))
    ref = parameter_count(load_model(preset))
    assert parameter_count(m).total == ref.total
    assert parameter_count(m).active == ref.active
    assert from_hf_config(cfg).is_mla == (preset == "deepseek-v3")
    assert load_model(f"{path}:seq=2048").seq == 2048


def test_overrides_and_inline() -> None:
    m = load_model("llama3-405b:seq=131072")
    assert m.seq == 131072 and m.layers == 126
    g = load_model("gpt:layers=24,hidden=2304,heads=24,vocab=51200,seq=2048")
    assert (g.layers, g.hidden, g.heads, g.kv_heads, g.ffn, g.gated) == (24, 2304, 24, 24, 4 * 2304, False)


@pytest.mark.parametrize("spec,field", [
    ("no-such-model", "unknown preset"), ("llama3-8b:bogus=1", "bogus"), ("llama3-8b:seq=abc", "model.seq"),
    ("gpt:layers=2,hidden=100,heads=3,vocab=10,seq=8", "model.heads"), ("gpt:layers=2", "model.hidden"),
    ("llama3-8b:kv_heads=5", "model.kv_heads"),
])
def test_bad_models_name_the_field(spec: str, field: str) -> None:
    with pytest.raises(WorkbenchError, match=field):
        load_model(spec)


def test_missing_config_file() -> None:
    with pytest.raises(WorkbenchError, match="no such file"):
        load_model("/nonexistent/config.json")
