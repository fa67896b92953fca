"""The workload: a small GPT (pre-LN transformer) whose size is configurable.

`GPT` is the plain single-process reference; `workbench.runner.parallel` builds the
tensor/pipeline/data-parallel shards from the very same initial weights, so a sharded
step can be checked against `reference_train` parameter by parameter.

The data is a learnable synthetic language: up to 512 tokens of the vocabulary are in use,
each sequence follows a fixed random permutation of them (word t+1 = succ[word t]) with 10 %
of words replaced at random, so the loss falls from ~ln(vocab) within a few steps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.options import parse_options


@dataclass(frozen=True)
class GPTConfig:
    """Size of the GPT: `layers` blocks of width `hidden` with `heads` heads, `vocab` tokens, `seq` context."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    vocab: int = 256
    seq: int = 64
    ffn: int = 0  # 0: 4 * hidden

    @property
    def ffn_size(self) -> int:
        return self.ffn or 4 * self.hidden

    def params(self) -> int:
        h, f = self.hidden, self.ffn_size
        per_layer = 3 * h * h + 3 * h + h * h + h + h * f + f + f * h + h + 4 * h
        return self.vocab * h + self.seq * h + self.layers * per_layer + 2 * h + h * self.vocab

    def layer_flops(self, tokens: int) -> float:
        """Forward FLOPs of one block for `tokens` tokens (matmuls and attention scores)."""
        h, f, s = self.hidden, self.ffn_size, self.seq
        return 2.0 * tokens * (3 * h * h + h * h + 2 * h * f) + 2.0 * tokens * s * h  # QK^T and AV, causal half

    def head_flops(self, tokens: int) -> float:
        return 2.0 * tokens * self.hidden * self.vocab

    def as_spec(self) -> str:
        return (f"gpt:layers={self.layers},hidden={self.hidden},heads={self.heads},"
                f"vocab={self.vocab},seq={self.seq}" + (f",ffn={self.ffn}" if self.ffn else ""))


_KEYS = ("layers", "hidden", "heads", "vocab", "seq", "ffn")


def gpt_config(model: Any = None) -> GPTConfig:
    """A `GPTConfig` from None (the default), a config, an inline spec `gpt:layers=4,hidden=256,...`,
    or a `workbench.models` spec object (its layers/hidden/heads/vocab/seq attributes)."""
    if model is None:
        return GPTConfig()
    if isinstance(model, GPTConfig):
        return model
    if isinstance(model, str):
        text = model.strip()
        name, _, opts = text.partition(":")
        if name not in ("gpt", "tiny", "default"):
            try:  # a named preset of workbench.models, if it has one
                from workbench.models import load_model  # type: ignore[attr-defined]

                return gpt_config(load_model(text))
            except ImportError:
                raise WorkbenchError(f"model: unknown {text!r}; use gpt:layers=4,hidden=128,heads=4,vocab=256,seq=64") from None
        vals: dict[str, int] = {}
        for k, v in parse_options(opts, "model", "layers=4").items():
            if k not in _KEYS:
                raise WorkbenchError(f"model.{k}: unknown option (allowed: {', '.join(_KEYS)})")
            if not re.fullmatch(r"\d+", v.strip()):
                raise WorkbenchError(f"model.{k}: expected a whole number, got {v!r}")
            vals[k] = int(v)
        cfg = GPTConfig(**vals)
    else:
        get = _getter(model)
        vals = {}
        for key, names in (("layers", ("layers", "num_layers", "n_layers")), ("hidden", ("hidden", "hidden_size", "d_model")),
                           ("heads", ("heads", "num_heads", "n_heads")), ("vocab", ("vocab", "vocab_size")),
                           ("seq", ("seq", "seq_len", "seq_length")), ("ffn", ("ffn", "ffn_hidden", "intermediate_size"))):
            for n in names:
                v = get(n)
                if v is not None:
                    vals[key] = int(v)
                    break
        missing = [k for k in ("layers", "hidden", "heads", "vocab", "seq") if k not in vals]
        if missing:
            raise WorkbenchError(f"model: {model!r} lacks {missing} for the GPT workload")
        cfg = GPTConfig(**vals)
    if cfg.hidden % cfg.heads:
        raise WorkbenchError(f"model.heads: {cfg.heads} must divide hidden={cfg.hidden}")
    if min(cfg.layers, cfg.hidden, cfg.heads, cfg.vocab, cfg.seq) < 1:
        raise WorkbenchError("model: layers, hidden, heads, vocab and seq must be at least 1")
    return cfg


def _getter(obj: Any):  # type: ignore[no-untyped-def]
    if isinstance(obj, dict):
        return obj.get
    return lambda n: getattr(obj, n, None)


# ---------------------------------------------------------------- the reference model
class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1 = nn.LayerNorm(c.hidden)
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.ln2 = nn.LayerNorm(c.hidden)
        self.fc1 = nn.Linear(c.hidden, c.ffn_size)
        self.fc2 = nn.Linear(c.ffn_size, c.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(attention(self.qkv(self.ln1(x)), self.heads))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal self-attention of `heads` heads from a fused [q; k; v] projection (B, S, 3*heads*d)."""
    b, s, three_hd = qkv.shape
    d = three_hd // (3 * heads)
    q, k, v = qkv.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(b, s, heads * d)


class GPT(nn.Module):
    """The single-process reference GPT."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.hidden)
        self.pos = nn.Parameter(torch.zeros(c.seq, c.hidden))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def init_gpt(c: GPTConfig, seed: int = 0) -> GPT:
    """The reference model with deterministic weights (GPT-2 style init) for `seed`."""
    g = torch.Generator().manual_seed(seed)
    m = GPT(c)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln_"):
                if name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            else:
                std = 0.02 / math.sqrt(2 * c.layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def batch(c: GPTConfig, step: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: (inputs, targets), each (size, seq) int64, the same on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    active = min(c.vocab, ACTIVE_TOKENS)
    words = torch.randperm(c.vocab, generator=g)[:active]  # the tokens this language uses
    succ = torch.randperm(active, generator=g)  # word i is followed by word succ[i]
    g.manual_seed(seed * 1_000_003 + 1000 + step)
    idx = torch.empty(size, c.seq + 1, dtype=torch.long)
    idx[:, 0] = torch.randint(active, (size,), generator=g)
    for t in range(c.seq):
        idx[:, t + 1] = succ[idx[:, t]]
    noise = torch.rand(size, c.seq + 1, generator=g) < 0.1
    idx[noise] = torch.randint(active, (int(noise.sum()),), generator=g)
    tok = words[idx]
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


ACTIVE_TOKENS = 512  # a large vocabulary still shows a falling loss within a few steps


def make_optimizer(params: Any, name: str, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise WorkbenchError(f"optimizer: unknown {name!r} (allowed: adamw, sgd)")


def reference_train(c: GPTConfig, steps: int, gbs: int, seed: int = 0, optimizer: str = "adamw",
                    lr: float = 1e-3) -> tuple[GPT, list[float]]:
    """Train the reference model single-process on the same batches; returns (model, losses)."""
    torch.manual_seed(seed)
    m = init_gpt(c, seed)
    opt = make_optimizer(m.parameters(), optimizer, lr)
    losses = []
    for step in range(steps):
        x, y = batch(c, step, gbs, seed)
        loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return m, losses
