"""Transformer model specs (dense, GQA, gated FFN, MoE, MLA), presets and per-layer costs."""

from workbench.models.costs import (
    Gemm,
    ParamCount,
    activation_bytes_per_token,
    forward_flops_per_token,
    layer_gemms,
    model_flops_per_token,
    parameter_count,
)
from workbench.models.presets import from_hf_config, load_config, load_model, preset, preset_names
from workbench.models.spec import ModelSpec

__all__ = [
    "Gemm", "ModelSpec", "ParamCount", "activation_bytes_per_token", "forward_flops_per_token", "from_hf_config",
    "layer_gemms", "load_config", "load_model", "model_flops_per_token", "parameter_count", "preset", "preset_names",
]
