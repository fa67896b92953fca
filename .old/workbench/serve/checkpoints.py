"""Small checkpoints in Hugging Face layout for benchmarks and tests: a byte-level tokenizer and
random-weight Llama models written straight to safetensors (no `transformers` needed)."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def check_checkpoint(path: str | Path) -> Path:
    """The folder if the server can load it, else a `WorkbenchError` naming the folder and the fix: a
    directory with a readable `config.json` of an architecture served here and weights (`*.safetensors`, or
    a model package's `manifest.json`). Checked before any worker process starts."""
    from workbench.errors import WorkbenchError

    use = ("give a Hugging Face checkpoint directory (config.json + *.safetensors, as save_pretrained writes it), "
           "a model package from `workbench convert`, or 'demo'")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise WorkbenchError(f"model: {str(path)!r} is not a directory; {use}")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise WorkbenchError(f"model: {str(p)!r} has no config.json; {use}")
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkbenchError(f"model: {str(cfg)!r} is not readable JSON ({str(exc)[:120]}); {use}") from None
    if not isinstance(raw, dict):
        raise WorkbenchError(f"model: {str(cfg)!r} holds a JSON {type(raw).__name__}, not an object; {use}")
    from workbench.serve.model import ModelConfig

    try:
        ModelConfig.from_hf(raw, name=p.name)
    except WorkbenchError as exc:
        raise WorkbenchError(f"model: {str(p)!r}: {exc}; serve a Llama, Mistral or Mixtral checkpoint") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise WorkbenchError(f"model: {str(cfg)!r} lacks or mistypes {str(exc)[:80]}; {use}") from None
    if not (p / "manifest.json").is_file() and not any(p.glob("*.safetensors")):
        pickles = sorted(x.name for x in p.glob("*.bin"))[:2]
        hint = (f" (found {', '.join(pickles)}: PyTorch pickles are not loaded; re-save with "
                "save_pretrained(..., safe_serialization=True))") if pickles else ""
        raise WorkbenchError(f"model: {str(p)!r} has config.json but no weights (*.safetensors or a package's "
                             f"manifest.json){hint}; {use}")
    return p


def byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer: 256 byte tokens, then <s> (256) and </s> (257), and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))


def random_llama(path: Path, hidden: int = 2048, layers: int = 16, heads: int = 32, kv_heads: int = 8,
                 intermediate: int = 8192, vocab: int = 258, max_position: int = 4096, dtype: str = "bfloat16",
                 device: str = "cpu", seed: int = 0, std: float = 0.02) -> Path:
    """A Llama checkpoint with N(0, `std`) weights (norms 1) and the byte tokenizer (a larger `std`, e.g. 0.2 as
    the tests' `transformers` checkpoints, makes greedy tokens far from ties)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    hd = hidden // heads

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * std).to(dt).cpu()

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dt),
         "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(heads * hd, hidden), p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
                  p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * hd),
                  p + "mlp.gate_proj.weight": w(intermediate, hidden), p + "mlp.up_proj.weight": w(intermediate, hidden),
                  p + "mlp.down_proj.weight": w(hidden, intermediate),
                  p + "input_layernorm.weight": torch.ones(hidden, dtype=dt),
                  p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dt)})
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "max_position_embeddings": max_position, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": dtype,
        "tie_word_embeddings": False}, indent=1))
    byte_tokenizer(path)
    return path
