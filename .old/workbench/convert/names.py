"""Hugging Face tensor names: which layer a tensor belongs to, which tensors a checkpoint must have,
and which are the linear weights a format like fp8/int8 applies to (Llama, Mistral, Qwen2/3,
Mixtral and Qwen-MoE naming)."""

from __future__ import annotations

import re
from typing import Any

from workbench.errors import WorkbenchError

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def layer_of(name: str) -> int | None:
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A layer's projection or expert matrix (quantisable); not norms, biases or the MoE router."""
    if layer_of(name) is None or len(shape) != 2 or not name.endswith(".weight"):
        return False
    tail = name.rsplit(".", 2)[-2]
    return "norm" not in tail and tail != "gate"  # `*.gate.weight` is a router; `gate_proj` is a projection


def expected_layer_tensors(cfg: dict[str, Any]) -> list[str]:
    """Suffixes every decoder layer must carry (after `model.layers.{i}.`) for this config's architecture."""
    arch = " ".join(cfg.get("architectures") or []) + " " + str(cfg.get("model_type", ""))
    base = ["input_layernorm.weight", "post_attention_layernorm.weight"] + [
        f"self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")]
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    if "Mixtral" in arch or "mixtral" in arch:
        return base + ["block_sparse_moe.gate.weight"] + [
            f"block_sparse_moe.experts.{e}.w{k}.weight" for e in range(experts) for k in (1, 2, 3)]
    if experts and ("Moe" in arch or "moe" in arch):
        return base + ["mlp.gate.weight"] + [
            f"mlp.experts.{e}.{p}_proj.weight" for e in range(experts) for p in ("gate", "up", "down")]
    if any(a in arch for a in ("Llama", "llama", "Mistral", "mistral", "Qwen2", "qwen2", "Qwen3", "qwen3")):
        return base + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    raise WorkbenchError(f"checkpoint: config.json architecture {arch.strip()!r} is not one the converter knows "
                         "(Llama, Mistral, Qwen2/3, Mixtral, Qwen-MoE)")


def missing_tensors(cfg: dict[str, Any], names: set[str]) -> list[str]:
    """Tensors the config says must exist but no shard holds (first the architecture's list, then any
    suffix layer 0 has that another layer lacks)."""
    layers = int(cfg.get("num_hidden_layers", 0))
    need = [EMBED, FINAL_NORM] + ([] if cfg.get("tie_word_embeddings") else [HEAD])
    suffixes = expected_layer_tensors(cfg)
    zero = {LAYER_RE.match(n).group(2) for n in names if layer_of(n) == 0}  # type: ignore[union-attr]
    for s in sorted(zero - set(suffixes)):
        suffixes.append(s)
    need += [f"model.layers.{i}.{s}" for i in range(layers) for s in suffixes]
    return [n for n in need if n not in names]
