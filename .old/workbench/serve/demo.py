"""The embedded small model of `workbench serve demo` (`workbench.serve.service.serve_demo()` serves it).

On first use a tiny Llama (transformers `LlamaForCausalLM`, ~1 M parameters) with a byte-level
BPE tokenizer (`tokenizers`, 1024 tokens) is trained for about a minute on CPU on the
project's own text (README, docs, module docstrings) and saved as a Hugging Face checkpoint
in the user cache (`$WORKBENCH_CACHE`, else `$XDG_CACHE_HOME/workbench`, else
`~/.cache/workbench`). It writes text that reads like the docs — not noise — and every later
start loads it in a second.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

VERSION = "v1"
VOCAB = 1024
SPECIALS = ["<s>", "</s>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def cache_dir() -> Path:
    base = os.environ.get("WORKBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "workbench")
    return Path(base)


def corpus_text() -> str:
    """The project's own prose: README and docs in a checkout, else the package's docstrings."""
    import ast

    root = Path(__file__).resolve().parents[2]
    parts = [f.read_text(errors="ignore") for f in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
             if f.is_file()]
    pkg = Path(__file__).resolve().parents[1]
    for f in sorted(pkg.rglob("*.py")):
        try:
            tree = ast.parse(f.read_text(errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc)
    return "\n\n".join(parts)


def demo_checkpoint(train_seconds: float | None = None, path: Path | None = None) -> Path:
    """The demo checkpoint directory, trained now if it is not in the cache yet."""
    path = path or cache_dir() / f"serve-demo-{VERSION}"
    if (path / "model.safetensors").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".serve-demo-{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one trainer at a time; others wait and reuse it
        if not (path / "model.safetensors").is_file():
            secs = train_seconds if train_seconds is not None else float(os.environ.get("WORKBENCH_DEMO_TRAIN_SECONDS", 60))
            try:
                _train(path, secs)
            finally:  # a killed or failed training leaves no half-written folder behind
                shutil.rmtree(path.with_name(path.name + f".tmp{os.getpid()}"), ignore_errors=True)
    return path


def _train(path: Path, seconds: float) -> dict[str, Any]:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    text = corpus_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE, "model_max_length": 512}))
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    seq, batch = 128, 16
    g = torch.Generator().manual_seed(0)
    t0, step, loss_v = time.time(), 0, float("nan")
    while time.time() - t0 < seconds or step < 150:  # at least enough steps to write words
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts])
        lr = 3e-3 * min(1.0, (step + 1) / 50)
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_v, step = loss.item(), step + 1
    model.save_pretrained(tmp)
    info = {"steps": step, "seconds": round(time.time() - t0, 1), "final_loss": round(loss_v, 3),
            "corpus_tokens": len(ids), "parameters": sum(p.numel() for p in model.parameters())}
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    if path.exists():      # another process finished first: keep its model
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return info
