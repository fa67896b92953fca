"""Transformer model specs (dense, GQA, gated FFN, MoE, MLA), presets and per-layer costs.

`ModelSpec` is imported eagerly (it is light); presets and costs load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from workbench.models.spec import ModelSpec

_LAZY = {
    **{n: "workbench.models.costs" for n in ("Gemm", "ParamCount", "activation_bytes_per_token",
                                             "forward_flops_per_token", "layer_gemms", "model_flops_per_token",
                                             "parameter_count")},
    **{n: "workbench.models.presets" for n in ("from_hf_config", "load_config", "load_model", "preset",
                                               "preset_names")},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workbench.models' has no attribute {name!r}")


__all__ = ["ModelSpec", *sorted(_LAZY)]
