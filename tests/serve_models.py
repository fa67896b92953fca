"""Small random checkpoints (Llama, Mixtral) made with `transformers.save_pretrained`, plus a byte tokenizer."""

from __future__ import annotations

from pathlib import Path

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
