"""Real text for the native engine: a local corpus, a tokenizer trained on it, fixed-length batches.

The default corpus is this repository's own prose (README.md and docs/*.md): small, always
present, real English with code. `prepare(files, vocab)` trains a byte-level BPE tokenizer
(`tokenizers`, the Hugging Face library) of at most `vocab` tokens on it, encodes the corpus
once and caches both (a `tokenizer.json` and a uint16/int32 token file) under a directory keyed
by the corpus bytes and the vocabulary, so every rank and every run of the same job reads the
same tokens. A model whose vocabulary cannot hold the 256 byte tokens (tiny test models) reads
raw bytes folded into its vocabulary instead.

`batch(tokens, step, size, seq, seed)` samples `size` windows of `seq + 1` tokens at offsets
drawn from (seed, step): the same global batch on every rank; each data-parallel rank takes its
rows.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parents[2]
MIN_BPE_VOCAB = 300  # 256 bytes + merges; below this the corpus is read as bytes
MAX_BPE_VOCAB = 16384  # a few hundred kB of text supports no more merges than this


def default_corpus() -> list[Path]:
    """README.md and docs/*.md of this repository."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def corpus_files(spec: str | None) -> list[Path]:
    """Files from a spec: None/"docs" (the default), a file, a directory (its *.md, *.txt) or a glob."""
    if spec in (None, "", "docs"):
        files = default_corpus()
    else:
        p = Path(str(spec)).expanduser()
        if p.is_dir():
            files = sorted([*p.rglob("*.md"), *p.rglob("*.txt")])
        elif p.is_file():
            files = [p]
        else:
            import glob

            files = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
    if not files:
        raise WorkbenchError(f"workload.corpus: no text files found for {spec!r} (give a file, a folder of .md/.txt "
                             "files, a glob, or 'docs')")
    return files


@dataclass(frozen=True)
class Corpus:
    tokenizer: Path | None  # tokenizer.json (None: raw bytes)
    tokens: Path  # .npy of token ids
    vocab: int  # tokens in the tokenizer (≤ the model's vocabulary)

    def load(self) -> np.ndarray:
        return np.load(self.tokens, mmap_mode="r")


def prepare(files: list[Path], vocab: int, cache: str | Path | None = None) -> Corpus:
    """Train (or reuse) the tokenizer and the encoded corpus for a model of `vocab` tokens."""
    text = "\n\n".join(f.read_text(errors="replace") for f in files)
    size = min(vocab, MAX_BPE_VOCAB) if vocab >= MIN_BPE_VOCAB else 0
    key = hashlib.sha256(text.encode() + f"|{vocab}|{size}".encode()).hexdigest()[:16]
    base = Path(cache or os.environ.get("WORKBENCH_CACHE") or Path(tempfile.gettempdir()) / "workbench-corpus") / key
    tok_path, ids_path = base / "tokenizer.json", base / "tokens.npy"
    if ids_path.exists() and (size == 0 or tok_path.exists()):
        return Corpus(tok_path if size else None, ids_path, size or min(vocab, 256))
    base.mkdir(parents=True, exist_ok=True)
    if size:
        tok = train_tokenizer(text, size)
        ids = np.asarray(tok.encode(text).ids, dtype=np.int32)
        _atomic(tok_path, lambda p: tok.save(str(p)))
    else:
        ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int32) % vocab
    _atomic(ids_path, lambda p: np.save(p, ids))
    return Corpus(tok_path if size else None, ids_path, size or min(vocab, 256))


def train_tokenizer(text: str, vocab: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer of `vocab` tokens trained on `text` (GPT-2 style pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def _atomic(path: Path, write) -> None:  # type: ignore[no-untyped-def]
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    write(tmp)
    if path.suffix == ".npy" and not tmp.exists():  # np.save appends .npy to names without it
        tmp = tmp.with_name(tmp.name + ".npy")
    os.replace(tmp, path)


def batch(tokens: np.ndarray, step: int, size: int, seq: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """(inputs, targets), each (size, seq) int64: windows at offsets drawn from (seed, step)."""
    import torch

    n = len(tokens)
    if n < seq + 2:
        raise WorkbenchError(f"workload.corpus: {n} tokens cannot fill one sequence of {seq + 1} (use a larger corpus)")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n - seq - 1, size)
    rows = np.stack([np.asarray(tokens[s:s + seq + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
