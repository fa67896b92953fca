"""Small random checkpoints (Llama, Mixtral) made with `transformers.save_pretrained`, plus a byte tokenizer, and
the tokens a serving backend streams for prompts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from workbench.serve.checkpoints import byte_tokenizer


def make_llama(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, bos_token_id=256, eos_token_id=257)
    LlamaForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer(path)
    return path


def make_mixtral(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.2,
                        bos_token_id=256, eos_token_id=257)
    MixtralForCausalLM(cfg).save_pretrained(path)
    byte_tokenizer(path)
    return path


def hf_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                     max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    eos = m.config.eos_token_id
    return out[:out.index(eos) + 1] if eos in out else out


def generate_all(b: Any, prompts: list[list[int]], params: Any) -> list[list[int]]:
    """The tokens `b` streams for each prompt, all prompts in flight at once (a worker error fails the test)."""
    async def one(p: list[int]) -> list[int]:
        out: list[int] = []
        async for ev in b.generate(p, params):
            assert ev.error is None, ev.error
            out.extend(ev.tokens)
        return out

    async def run_all() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    return asyncio.run(run_all())
