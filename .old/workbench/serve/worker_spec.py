"""What a serving worker process is told: its `WorkerSpec`, and the two facts every one of its
processes derives from it (the device of rank or stage i, the number of KV pages).

Shared by the worker (`worker.py`: the engine, its tensor-parallel followers) and the pipeline
stages (`pipeline.py`), so neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("colocated", "prefill", "decode")


@dataclass(frozen=True)
class WorkerSpec:
    model: str
    role: str = "colocated"
    name: str = "worker-0"
    device: str = "cpu"
    dtype: str = "float32"
    kv_bytes: int = 256 << 20          # KV cache size (all layers) when num_pages is 0
    num_pages: int = 0
    page_size: int = 16
    max_batched_tokens: int = 256
    max_seqs: int = 64
    transport: str = "tcp"             # how KV pages move between prefill and decode workers
    transport_host: str = "127.0.0.1"
    lanes: int = 2
    kv_timeout: float = 60.0
    threads: int = 0                   # torch intra-op threads (0: leave the default)
    netns: str | None = None           # run inside this network namespace (emulated hosts)
    tp: int = 1                        # tensor-parallel ranks (processes; devices cuda:N, cuda:N+1, …)
    pp: int = 1                        # pipeline stages (processes; activations between them over `transport`)
    cuda_graph: bool = True            # decode-only steps as captured CUDA graphs (a GPU, tp = pp = 1)
    piece_graphs: bool = True          # with cuda_graph, the other steps as graphed pieces (a dense model)
    env: dict[str, str] = field(default_factory=dict)


def rank_device(spec: WorkerSpec, i: int) -> str:
    """The device of tensor-parallel rank or pipeline stage `i`: cuda:N+i from the spec's cuda:N; cpu stays cpu."""
    if spec.device.startswith("cuda"):
        base = int(spec.device.split(":")[1]) if ":" in spec.device else 0
        return f"cuda:{base + i}"
    return "cpu"


def num_pages(spec: WorkerSpec, model: Any) -> int:
    """KV pages per layer: `spec.num_pages`, else as many as `spec.kv_bytes` holds over all layers (at least 4)."""
    import torch

    elem = torch.tensor([], dtype=model.dtype).element_size()
    page_bytes = 2 * model.num_kv_heads * spec.page_size * model.cfg.head_dim * elem
    return spec.num_pages or max(4, spec.kv_bytes // (page_bytes * model.cfg.num_layers))
