"""Measure whole serving steps of a Llama-3.1-8B-shaped decoder (random bf16 weights) on one GPU, to check
the serving simulator's step-time composition against a real forward pass (validation, not calibration).

    python benchmarks/serving_step_check.py OUT.csv

Decode steps (one token per sequence, contiguous KV caches, CUDA-graph replay) at several batch sizes and
context lengths, and prefill steps (one prompt, causal flash attention, eager) of several lengths; each
step is every layer (RMSNorm, QKV, attention, O, RMSNorm, gate/up, SiLU·mul, down, residuals) plus the LM
head and an argmax. RoPE is left out (an elementwise pass the simulator does count). Median of timed repeats
(CUDA events: `kernels.bench.gpu_time`).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's kernels/, no install needed

from kernels.bench import gpu_time  # noqa: E402 (after the path)

H, HEADS, KVH, D, FFN, LAYERS, VOCAB = 4096, 32, 8, 128, 14336, 32, 128256


def main(out: str) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02

    layers = [dict(qkv=w(H, (HEADS + 2 * KVH) * D), o=w(HEADS * D, H), gu=w(H, 2 * FFN), down=w(FFN, H),
                   n1=torch.ones(H, device=dev, dtype=dt), n2=torch.ones(H, device=dev, dtype=dt)) for _ in range(LAYERS)]
    head = w(H, VOCAB)

    def norm(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (H,), wt)

    def layer(x: torch.Tensor, p: dict, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = norm(x, p["n1"]) @ p["qkv"]
        q = qkv[..., : HEADS * D].view(b, s, HEADS, D).transpose(1, 2)
        if causal:  # prefill: keys/values of this chunk
            k = qkv[..., HEADS * D:(HEADS + KVH) * D].view(b, s, KVH, D).transpose(1, 2)
            v = qkv[..., (HEADS + KVH) * D:].view(b, s, KVH, D).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(b, s, HEADS * D) @ p["o"]
        gu = norm(x, p["n2"]) @ p["gu"]
        return x + (F.silu(gu[..., :FFN]) * gu[..., FFN:]) @ p["down"]

    def forward(x: torch.Tensor, kv: list | None, causal: bool) -> torch.Tensor:
        for i, p in enumerate(layers):
            x = layer(x, p, kv[i][0] if kv else None, kv[i][1] if kv else None, causal)
        return (x[:, -1] @ head).argmax(-1)

    rows = []
    gpu = torch.cuda.get_device_name()
    with torch.no_grad():
        for batch, ctx in ((1, 1024), (16, 1024), (64, 1024), (64, 4096), (256, 1024)):
            kv = [(w(batch, KVH, ctx, D), w(batch, KVH, ctx, D)) for _ in range(LAYERS)]
            x = w(batch, 1, H)
            graph = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                forward(x, kv, False)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                forward(x, kv, False)
            sec = gpu_time(graph.replay, 20)
            eager = gpu_time(lambda x=x, kv=kv: forward(x, kv, False), 5)
            rows.append({"mode": "decode", "batch": batch, "context": ctx, "tokens": batch, "seconds": sec,
                         "eager_seconds": eager, "gpu": gpu, "torch": torch.__version__})
            print(rows[-1], flush=True)
            del kv, graph
            torch.cuda.empty_cache()
        for n in (512, 2048, 8192):
            x = w(1, n, H)
            sec = gpu_time(lambda x=x: forward(x, None, True), 5)
            rows.append({"mode": "prefill", "batch": 1, "context": 0, "tokens": n, "seconds": sec,
                         "eager_seconds": sec, "gpu": gpu, "torch": torch.__version__})
            print(rows[-1], flush=True)
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "serving_step_check.csv")
