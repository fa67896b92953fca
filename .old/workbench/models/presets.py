"""Model presets (`datasets/models.yaml`), Hugging Face `config.json` files and inline specs.

`load_model("llama3-405b:seq=131072")`, `load_model("path/to/config.json")`,
`load_model("gpt:layers=24,hidden=2304,heads=24,vocab=51200,seq=2048")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workbench.data import read_yaml
from workbench.errors import WorkbenchError
from workbench.io import check_path, is_dir, is_file, read_structured
from workbench.models.spec import MAX_NAME, RANGES, ModelSpec
from workbench.options import parse_options
from workbench.validate import show, whole

DEFAULT_CONFIG_SEQ = 4096


def preset_names() -> list[str]:
    return list(read_yaml("models.yaml"))


def preset(name: str, **overrides: Any) -> ModelSpec:
    table = read_yaml("models.yaml")
    if name not in table:
        raise WorkbenchError(
            f"model: unknown preset {show(name)} (known: {', '.join(table)}; or a config.json path, or gpt:layers=..)")
    spec = ModelSpec(name=name, **table[name])
    return spec.with_overrides(**overrides) if overrides else spec


def from_hf_config(cfg: Any, name: str = "hf", seq: int | None = None) -> ModelSpec:
    """A `ModelSpec` from a Hugging Face `config.json` dict (Llama, Mistral/Mixtral, Qwen2/3(-MoE), DeepSeek-V2/V3, GPT-2...).

    Types are checked: the top level (and `text_config`) must be mappings, sizes whole numbers,
    `tie_word_embeddings` a true/false; a wrong type is an error naming the key, not a guess."""
    if not isinstance(cfg, Mapping):
        raise WorkbenchError(f"model: a config.json must hold a mapping of settings, got {show(cfg)}")
    if "text_config" in cfg and "hidden_size" not in cfg:
        if not isinstance(cfg["text_config"], Mapping):
            raise WorkbenchError(f"model.text_config: expected a mapping, got {show(cfg['text_config'])}")
        cfg = {**cfg, **cfg["text_config"]}

    def key(*keys: str) -> str | None:
        return next((k for k in keys if cfg.get(k) is not None), None)

    def num(*keys: str, default: int = 0) -> int:
        k = key(*keys)
        if k is None:
            return default
        v = cfg[k]
        if isinstance(v, (str, bool)):
            raise WorkbenchError(f"model.{k}: expected a whole number in config.json, got {show(v)}")
        lo, hi = _HF_RANGE.get(k, (0, 2**31))
        return whole(v, f"model.{k}", lo, hi)

    def word(*keys: str, default: str = "") -> str:
        k = key(*keys)
        if k is None:
            return default
        if not isinstance(cfg[k], str):
            raise WorkbenchError(f"model.{k}: expected text in config.json, got {show(cfg[k])}")
        return cfg[k][:200]

    missing = [k[0] for k in (("num_hidden_layers", "n_layer", "num_layers"), ("hidden_size", "n_embd", "d_model"),
                              ("num_attention_heads", "n_head"), ("vocab_size",)) if key(*k) is None]
    if missing:
        raise WorkbenchError(f"model: config.json lacks {', '.join(missing)} (is it a decoder transformer's config?)")
    layers = num("num_hidden_layers", "n_layer", "num_layers")
    hidden = num("hidden_size", "n_embd", "d_model")
    heads = num("num_attention_heads", "n_head")
    vocab = num("vocab_size")
    mtype = word("model_type")
    act = word("hidden_act", "activation_function", default="silu")
    gated = mtype not in ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "gpt_bigcode") and act in (
        "silu", "swiglu", "swish", "gelu_pytorch_tanh", "geglu") or mtype in ("llama", "mistral", "mixtral", "qwen2",
                                                                               "qwen3", "qwen3_moe", "deepseek_v3")
    experts = num("n_routed_experts", "num_local_experts", "num_experts")
    dense_layers = num("first_k_dense_replace")
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list):
        raise WorkbenchError(f"model.mlp_only_layers: expected a list of layer numbers, got {show(mlp_only)}")
    if experts and mlp_only:
        dense_layers = max(dense_layers, len(mlp_only))
    ffn = num("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    shared = num("n_shared_experts")
    expert_ffn = num("moe_intermediate_size") or (ffn if experts else 0)
    shared_w = num("shared_expert_intermediate_size")
    if experts and shared_w and not shared and expert_ffn:
        shared = max(shared_w // expert_ffn, 1)
    if seq is None:
        seq = min(num("max_position_embeddings", "n_positions", "seq_length", default=DEFAULT_CONFIG_SEQ),
                  DEFAULT_CONFIG_SEQ) or DEFAULT_CONFIG_SEQ
    tie = key("tie_word_embeddings")
    if tie is not None and not isinstance(cfg[tie], bool):
        raise WorkbenchError(f"model.tie_word_embeddings: expected true or false in config.json, got {show(cfg[tie])}")
    tied = bool(cfg[tie]) if tie is not None else mtype == "gpt2"
    kv_lora = num("kv_lora_rank")
    return ModelSpec(
        name=name, layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq=int(seq),
        kv_heads=num("num_key_value_heads") or heads,
        head_dim=0 if kv_lora else num("head_dim"), ffn=ffn, gated=bool(gated), tied=tied,
        experts=experts, top_k=num("num_experts_per_tok", "moe_topk") if experts else 0,
        shared_experts=shared if experts else 0, expert_ffn=expert_ffn if experts else 0,
        dense_layers=dense_layers if experts else 0,
        q_lora_rank=num("q_lora_rank") if kv_lora else 0, kv_lora_rank=kv_lora,
        qk_nope_dim=num("qk_nope_head_dim") if kv_lora else 0,
        qk_rope_dim=num("qk_rope_head_dim") if kv_lora else 0,
        v_head_dim=num("v_head_dim") if kv_lora else 0,
        source=f"Hugging Face config.json ({mtype or 'unknown model_type'})",
    )


_HF_RANGE = {"num_hidden_layers": RANGES["layers"], "n_layer": RANGES["layers"], "num_layers": RANGES["layers"],
             "hidden_size": RANGES["hidden"], "n_embd": RANGES["hidden"], "d_model": RANGES["hidden"],
             "num_attention_heads": RANGES["heads"], "n_head": RANGES["heads"], "vocab_size": RANGES["vocab"],
             "num_key_value_heads": RANGES["kv_heads"], "head_dim": RANGES["head_dim"],
             "max_position_embeddings": (0, 2**40), "n_positions": (0, 2**40), "seq_length": (0, 2**40)}


def load_config(path: str | Path, **overrides: Any) -> ModelSpec:
    p = check_path(path, "model")
    cfg = read_structured(p, "model")
    name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
    spec = from_hf_config(cfg, name=name[:200])
    return spec.with_overrides(**overrides) if overrides else spec


def inline_model(kind: str, options: dict[str, Any]) -> ModelSpec:
    """`gpt:` (GELU FFN, tied embeddings), `llama:` (SwiGLU, untied) or `moe:` models from key=value options."""
    from dataclasses import fields

    from workbench.models.spec import _convert

    types = {f.name: type(getattr(_TEMPLATE, f.name)) for f in fields(ModelSpec)}
    vals: dict[str, Any] = {"gated": kind != "gpt", "tied": kind == "gpt", "source": "inline"}
    for k, v in options.items():
        if k not in types or k in ("name", "source"):
            raise WorkbenchError(
                f"model: unknown field {show(k, 40)} (known: {', '.join(t for t in types if t not in ('name', 'source'))})")
        vals[k] = _convert(k, v, types[k])
    label = kind + ":" + ",".join(f"{k}={v}" for k, v in options.items())
    return ModelSpec(name=label[:MAX_NAME], **vals)


_TEMPLATE = ModelSpec(name="t", layers=1, hidden=1, heads=1, vocab=1, seq=1)


def load_model(spec: str | Path | ModelSpec) -> ModelSpec:
    """A model from a preset (with `:key=value` overrides), a config.json path, `gpt:...` inline, or a ModelSpec."""
    if isinstance(spec, ModelSpec):
        return spec
    if not isinstance(spec, (str, Path)):
        raise WorkbenchError(f"model: expected a preset spec, a config.json path or a ModelSpec, got {show(spec)}")
    text = str(spec).strip()
    if text.endswith(".json") or is_file(text) or is_dir(text):
        return load_config(text)
    head, _, opts = text.partition(":")
    if head.endswith(".json") or is_file(head):
        return load_config(head, **parse_options(opts, "model", "seq=4096"))
    if head in ("gpt", "llama", "moe"):
        o: dict[str, Any] = parse_options(opts, "model", "seq=4096")
        for need in ("layers", "hidden", "heads", "vocab", "seq"):
            if need not in o:
                raise WorkbenchError(f"model.{need}: inline {head} models need {need}=..., e.g. "
                                     "gpt:layers=24,hidden=2304,heads=24,vocab=51200,seq=2048")
        return inline_model(head, o)
    if head not in read_yaml("models.yaml"):  # before its options, so messages start with a known name
        preset(head)
    return preset(head, **parse_options(opts, head, "seq=4096"))
