"""`ModelSpec`: a transformer's shape (dense, GQA, gated FFN, MoE, MLA) as a frozen value object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench.validate import boolean, show, text, whole

MAX_NAME = 1000
RANGES: dict[str, tuple[int, int]] = {
    "layers": (1, 4096), "hidden": (1, 2**20), "heads": (1, 2**16), "vocab": (1, 2**24), "seq": (1, 2**24),
    "kv_heads": (0, 2**16), "head_dim": (0, 2**16), "ffn": (0, 2**22), "experts": (0, 2**16),
    "top_k": (0, 2**16), "shared_experts": (0, 1024), "expert_ffn": (0, 2**22), "dense_layers": (0, 4096),
    "q_lora_rank": (0, 2**20), "kv_lora_rank": (0, 2**20), "qk_nope_dim": (0, 2**16), "qk_rope_dim": (0, 2**16),
    "v_head_dim": (0, 2**16),
}
"""Each whole-number field's allowed range (0 means "derive it" where the docstring says so)."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer.

    Dense: `layers`, `hidden`, `heads`, `kv_heads` (GQA; 0 = `heads`), `head_dim` (0 = hidden/heads),
    `ffn` (FFN width), `gated` (SwiGLU: 3 matrices), `vocab`, `seq`, `tied` embeddings,
    `dropout` (stores masks). MoE (when `experts` > 0): `top_k` routed experts per token of
    `expert_ffn` width, `shared_experts` always-on experts, the first `dense_layers` layers dense.
    MLA (when `kv_lora_rank` > 0): DeepSeek's latent attention dimensions.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    kv_heads: int = 0
    head_dim: int = 0
    ffn: int = 0
    gated: bool = False
    tied: bool = False
    dropout: bool = False
    experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    expert_ffn: int = 0
    dense_layers: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("name", "source"):
            v = getattr(self, f)
            if not isinstance(v, str) or len(v) > MAX_NAME:
                raise WorkbenchError(f"model.{f}: expected text of at most {MAX_NAME} characters, got {show(v)}")
        for f, (lo, hi) in RANGES.items():
            v = getattr(self, f)
            if isinstance(v, str):  # strings are read once at the edge (with_overrides, inline specs)
                raise WorkbenchError(f"model.{f}: expected a whole number >= {lo} and <= {hi}, got {show(v)}")
            object.__setattr__(self, f, whole(v, f"model.{f}", lo, hi))
        for f in ("gated", "tied", "dropout"):
            if not isinstance(getattr(self, f), bool):
                raise WorkbenchError(f"model.{f}: expected true or false, got {show(getattr(self, f))}")
        if self.kv_heads > self.heads:
            raise WorkbenchError(f"model.kv_heads: must be at most heads ({self.heads}), got {self.kv_heads}")
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.head_dim == 0:
            if self.hidden % self.heads and not self.is_mla:
                raise WorkbenchError(
                    f"model.heads: hidden {self.hidden} is not divisible by heads {self.heads} (set head_dim)")
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.ffn == 0:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        if self.heads % self.kv_heads:
            raise WorkbenchError(f"model.kv_heads: heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.experts:
            if not 0 < self.top_k <= self.experts:
                raise WorkbenchError(f"model.top_k: must be 1..experts ({self.experts}), got {self.top_k}")
            if self.expert_ffn == 0:
                object.__setattr__(self, "expert_ffn", self.ffn)
            if not 0 <= self.dense_layers < self.layers:
                raise WorkbenchError(f"model.dense_layers: must be 0..layers-1, got {self.dense_layers}")
        if self.is_mla and not (self.qk_nope_dim and self.qk_rope_dim and self.v_head_dim):
            raise WorkbenchError("model.kv_lora_rank: MLA needs qk_nope_dim, qk_rope_dim and v_head_dim too")

    # ---- derived shape ----
    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (the attention output fed to the output projection)."""
        return self.heads * (self.v_head_dim if self.is_mla else self.head_dim)

    @property
    def kv_dim(self) -> int:
        """Width of all key (= value) heads together (MHA/GQA)."""
        return self.kv_heads * self.head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_dim + self.qk_rope_dim if self.is_mla else self.head_dim

    def with_overrides(self, **overrides: Any) -> ModelSpec:
        """A copy with fields replaced; values given as strings are converted and checked."""
        known = {f.name: f for f in fields(self)}
        conv: dict[str, Any] = {}
        for k, v in overrides.items():
            if k not in known or k == "name":
                raise WorkbenchError(f"model: unknown field {k!r} (known: {', '.join(n for n in known if n != 'name')})")
            conv[k] = _convert(k, v, type(getattr(self, k)))
        label = self.name + ":" + ",".join(f"{k}={v}" for k, v in overrides.items()) if overrides else self.name
        return replace(self, name=label[:MAX_NAME], **conv)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        from workbench.models.params import parameter_count

        pc = parameter_count(self)
        return {"name": self.name, "params_B": round(pc.total / 1e9, 3), "active_params_B": round(pc.active / 1e9, 3),
                "layers": self.layers, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
                "seq": self.seq, "vocab": self.vocab, "experts": self.experts, "top_k": self.top_k,
                "attention": "MLA" if self.is_mla else ("GQA" if self.kv_heads < self.heads else "MHA")}

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        from workbench.display import repr_mimebundle

        s = self.summary()
        text = "ModelSpec(" + ", ".join(f"{k}={v}" for k, v in s.items()) + ")"
        return repr_mimebundle(f"ModelSpec {self.name}", [(k, v) for k, v in s.items() if k != "name"], text, none="–")


def _convert(name: str, value: Any, typ: type) -> Any:
    """A `key=value` option's text as the field's type (range checks happen in `ModelSpec`)."""
    if not isinstance(value, str):
        return value
    if typ is bool:
        return boolean(value, f"model.{name}")
    if typ is int:
        lo, hi = RANGES.get(name, (0, 2**31))
        return whole(value, f"model.{name}", lo, hi)
    return text(value, f"model.{name}", MAX_NAME)
