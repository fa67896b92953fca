"""Model presets (`datasets/models.yaml`), Hugging Face `config.json` files and inline specs.

`load_model("llama3-405b:seq=131072")`, `load_model("path/to/config.json")`,
`load_model("gpt:layers=24,hidden=2304,heads=24,vocab=51200,seq=2048")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workbench.data import read_yaml
from workbench.errors import WorkbenchError
from workbench.models.spec import ModelSpec
from workbench.options import parse_options

DEFAULT_CONFIG_SEQ = 4096


def preset_names() -> list[str]:
    return list(read_yaml("models.yaml"))


def preset(name: str, **overrides: Any) -> ModelSpec:
    table = read_yaml("models.yaml")
    if name not in table:
        raise WorkbenchError(
            f"model: unknown preset {name!r} (known: {', '.join(table)}; or a config.json path, or gpt:layers=..)")
    spec = ModelSpec(name=name, **table[name])
    return spec.with_overrides(**overrides) if overrides else spec


def from_hf_config(cfg: dict[str, Any], name: str = "hf", seq: int | None = None) -> ModelSpec:
    """A `ModelSpec` from a Hugging Face `config.json` dict (Llama, Mistral/Mixtral, Qwen2/3(-MoE), DeepSeek-V2/V3, GPT-2...)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg, **cfg["text_config"]}

    def get(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        return default

    layers = get("num_hidden_layers", "n_layer", "num_layers")
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    missing = [k for k, v in (("num_hidden_layers", layers), ("hidden_size", hidden),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
    if missing:
        raise WorkbenchError(f"model: config.json lacks {', '.join(missing)} (is it a decoder transformer's config?)")
    mtype = str(get("model_type", default=""))
    act = str(get("hidden_act", "activation_function", default="silu"))
    gated = mtype not in ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "gpt_bigcode") and act in (
        "silu", "swiglu", "swish", "gelu_pytorch_tanh", "geglu") or mtype in ("llama", "mistral", "mixtral", "qwen2",
                                                                               "qwen3", "qwen3_moe", "deepseek_v3")
    experts = int(get("n_routed_experts", "num_local_experts", "num_experts", default=0) or 0)
    dense_layers = int(get("first_k_dense_replace", default=0) or 0)
    mlp_only = get("mlp_only_layers", default=[]) or []
    if experts and mlp_only:
        dense_layers = max(dense_layers, len(mlp_only))
    ffn = int(get("intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * hidden)
    shared = int(get("n_shared_experts", default=0) or 0)
    expert_ffn = int(get("moe_intermediate_size", default=0) or (ffn if experts else 0))
    shared_w = get("shared_expert_intermediate_size")
    if experts and shared_w and not shared and expert_ffn:
        shared = max(int(shared_w) // expert_ffn, 1)
    if seq is None:
        seq = min(int(get("max_position_embeddings", "n_positions", "seq_length", default=DEFAULT_CONFIG_SEQ)),
                  DEFAULT_CONFIG_SEQ)
    kv_lora = int(get("kv_lora_rank", default=0) or 0)
    return ModelSpec(
        name=name, layers=int(layers), hidden=int(hidden), heads=int(heads), vocab=int(vocab), seq=int(seq),
        kv_heads=int(get("num_key_value_heads", default=heads) or heads),
        head_dim=0 if kv_lora else int(get("head_dim", default=0) or 0), ffn=ffn, gated=bool(gated),
        tied=bool(get("tie_word_embeddings", default=mtype == "gpt2")),
        experts=experts, top_k=int(get("num_experts_per_tok", "moe_topk", default=0) or 0) if experts else 0,
        shared_experts=shared if experts else 0, expert_ffn=expert_ffn if experts else 0,
        dense_layers=dense_layers if experts else 0,
        q_lora_rank=int(get("q_lora_rank", default=0) or 0) if kv_lora else 0, kv_lora_rank=kv_lora,
        qk_nope_dim=int(get("qk_nope_head_dim", default=0) or 0) if kv_lora else 0,
        qk_rope_dim=int(get("qk_rope_head_dim", default=0) or 0) if kv_lora else 0,
        v_head_dim=int(get("v_head_dim", default=0) or 0) if kv_lora else 0,
        source=f"Hugging Face config.json ({mtype or 'unknown model_type'})",
    )


def load_config(path: str | Path, **overrides: Any) -> ModelSpec:
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"model: no such file {str(p)!r}") from None
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"model: {str(p)!r} is not valid JSON ({exc})") from None
    name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
    spec = from_hf_config(cfg, name=name)
    return spec.with_overrides(**overrides) if overrides else spec


def inline_model(kind: str, options: dict[str, Any]) -> ModelSpec:
    """`gpt:` (GELU FFN, tied embeddings), `llama:` (SwiGLU, untied) or `moe:` models from key=value options."""
    from dataclasses import fields

    from workbench.models.spec import _convert

    types = {f.name: type(getattr(_TEMPLATE, f.name)) for f in fields(ModelSpec)}
    vals: dict[str, Any] = {"gated": kind != "gpt", "tied": kind == "gpt", "source": "inline"}
    for k, v in options.items():
        if k not in types or k == "name":
            raise WorkbenchError(f"model: unknown field {k!r} (known: {', '.join(t for t in types if t != 'name')})")
        vals[k] = _convert(k, v, types[k])
    label = kind + ":" + ",".join(f"{k}={v}" for k, v in options.items())
    return ModelSpec(name=label, **vals)


_TEMPLATE = ModelSpec(name="t", layers=1, hidden=1, heads=1, vocab=1, seq=1)


def load_model(spec: str | Path | ModelSpec) -> ModelSpec:
    """A model from a preset (with `:key=value` overrides), a config.json path, `gpt:...` inline, or a ModelSpec."""
    if isinstance(spec, ModelSpec):
        return spec
    text = str(spec).strip()
    if text.endswith(".json") or Path(text).is_file():
        return load_config(text)
    head, _, opts = text.partition(":")
    if head.endswith(".json") or Path(head).is_file():
        return load_config(head, **parse_options(opts, "model", "seq=4096"))
    if head in ("gpt", "llama", "moe"):
        o: dict[str, Any] = parse_options(opts, "model", "seq=4096")
        for need in ("layers", "hidden", "heads", "vocab", "seq"):
            if need not in o:
                raise WorkbenchError(f"model.{need}: inline {head} models need {need}=..., e.g. "
                                     "gpt:layers=24,hidden=2304,heads=24,vocab=51200,seq=2048")
        return inline_model(head, o)
    return preset(head, **parse_options(opts, head, "seq=4096"))
