# ruff: noqa: B023, F821  (each closure is timed at once, inside its loop iteration)
"""Attention and small-batch GEMM sweeps for the serving simulator, measured with PyTorch on one GPU.

    python benchmarks/serving_attention_sweep.py OUT.csv

Rows (one per shape, median of timed repeats with CUDA events after warm-up):
- `prefill`: causal flash attention (SDPA, flash backend) over `q_len = kv_len` tokens, GQA heads;
- `prefill_chunk`: a chunk of `q_len` queries against `kv_len` keys already in the cache (non-causal:
  the chunk sees the whole prefix, the cost of a later chunk of a chunked prefill);
- `decode`: one query token per sequence against `kv_len` contiguous keys (SDPA), `batch` sequences;
- `decode_paged`: the same with the KV held in `block`-token pages in random order: the pages are
  gathered through the block table (index_select) and then attended (an unfused paged path; fused
  paged kernels read pages in place at about the contiguous rate);
- `gemm_small_m`: bf16 GEMMs with few rows (decode batches), where weight bytes bound the time;
- `launch`: seconds per small kernel launched eagerly and replayed from a CUDA graph;
- `decode_default`: decode attention with PyTorch's default backend choice (no backend forced).

    python benchmarks/serving_attention_sweep.py OUT.csv decode_default   # one section only
The machine is written beside the rows (gpu, torch, cuda columns).
"""

from __future__ import annotations

import csv
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, target_s: float = 0.02, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t, 1e-6)
    reps = int(min(max(target_s / one, 3), 200))
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return sorted(times)[1]


def main(out: str) -> None:
    dev = torch.device("cuda")
    dt = torch.bfloat16
    gpu = torch.cuda.get_device_name()
    rows: list[dict] = []
    meta = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda}

    def add(**r):
        rows.append({**r, **meta})
        print(r, flush=True)

    def section(fn):
        try:
            fn()
        except Exception as exc:  # one failing section must not lose the others' rows
            print(f"section {fn.__name__} failed: {exc!r}", flush=True)

    def prefill():
        for hq, hkv, d in ((8, 1, 128), (64, 8, 128), (8, 1, 64)):
            for s in (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768):
                b = max(1, 8192 // s)
                q = torch.randn(b, hq, s, d, device=dev, dtype=dt)
                k = torch.randn(b, hkv, s, d, device=dev, dtype=dt)
                v = torch.randn_like(k)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    sec = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
                flops = 4.0 * b * hq * s * s * d / 2  # causal: half the square
                add(op="prefill", batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, q_len=s, kv_len=s, causal=1, block=0,
                    seconds=sec, tflops=flops / sec / 1e12, GBps=0.0)

    def chunk():
        # ---------------- chunk of a chunked prefill against a longer prefix
        for hq, hkv, d in ((8, 1, 128), (64, 8, 128)):
            for c in (256, 512, 2048):
                for L in (2048, 8192, 32768):
                    q = torch.randn(1, hq, c, d, device=dev, dtype=dt)
                    k = torch.randn(1, hkv, L, d, device=dev, dtype=dt)
                    v = torch.randn_like(k)
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        sec = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                    flops = 4.0 * hq * c * L * d
                    add(op="prefill_chunk", batch=1, q_heads=hq, kv_heads=hkv, head_dim=d, q_len=c, kv_len=L, causal=0,
                        block=0, seconds=sec, tflops=flops / sec / 1e12, GBps=0.0)

    def decode():
        # ---------------- decode (one query per sequence)
        for hq, hkv, d in ((8, 1, 128), (64, 8, 128)):
            for b in (1, 8, 32, 128, 256):
                for L in (512, 2048, 8192, 32768):
                    if b * L * hkv > 2**24:
                        continue
                    q = torch.randn(b, hq, 1, d, device=dev, dtype=dt)
                    k = torch.randn(b, hkv, L, d, device=dev, dtype=dt)
                    v = torch.randn_like(k)
                    kv_bytes = 2.0 * b * hkv * L * d * 2
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                        sec = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                    add(op="decode", batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, q_len=1, kv_len=L, causal=0, block=0,
                        seconds=sec, tflops=4.0 * b * hq * L * d / sec / 1e12, GBps=kv_bytes / sec / 1e9)
                    del k, v
                    blk = 16
                    npages = b * L // blk
                    kc = torch.randn(npages, hkv, blk, d, device=dev, dtype=dt)
                    vc = torch.randn_like(kc)
                    table = torch.randperm(npages, device=dev)

                    def paged(q=q, kc=kc, vc=vc, table=table, b=b, L=L):
                        kk = kc.index_select(0, table).view(b, L // blk, hkv, blk, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, L, d)
                        vv = vc.index_select(0, table).view(b, L // blk, hkv, blk, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, L, d)
                        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                        sec = timed(paged)
                    add(op="decode_paged", batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, q_len=1, kv_len=L, causal=0,
                        block=blk, seconds=sec, tflops=4.0 * b * hq * L * d / sec / 1e12, GBps=kv_bytes / sec / 1e9)
                    del kc, vc

    def gemm():
        # ---------------- GEMMs with few rows
        for n, k in ((1280, 8192), (8192, 1024), (7168, 8192), (8192, 3584), (6144, 4096), (4096, 14336)):
            w = torch.randn(k, n, device=dev, dtype=dt)
            for m in (1, 4, 16, 64, 128, 256, 512, 1024):
                a = torch.randn(m, k, device=dev, dtype=dt)
                sec = timed(lambda: a @ w)
                add(op="gemm_small_m", batch=m, q_heads=0, kv_heads=0, head_dim=0, q_len=n, kv_len=k, causal=0, block=0,
                    seconds=sec, tflops=2.0 * m * n * k / sec / 1e12, GBps=2.0 * (k * n + m * k + m * n) / sec / 1e9)

    def launch():
        # ---------------- launch overhead: eager vs CUDA graph replay of 100 small kernels
        x = torch.randn(1024, device=dev)
        sec = timed(lambda: x.add_(1.0), target_s=0.01)
        add(op="launch", batch=1, q_heads=0, kv_heads=0, head_dim=0, q_len=0, kv_len=0, causal=0, block=0, seconds=sec,
            tflops=0.0, GBps=0.0)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            for _ in range(3):
                x.add_(1.0)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(100):
                x.add_(1.0)
        sec = timed(g.replay, target_s=0.01) / 100
        add(op="launch_graph", batch=100, q_heads=0, kv_heads=0, head_dim=0, q_len=0, kv_len=0, causal=0, block=0,
            seconds=sec, tflops=0.0, GBps=0.0)

    def decode_default():
        # ---------------- decode with PyTorch's own backend choice (what a model's forward gets by default)
        for hq, hkv, d in ((8, 1, 128), (64, 8, 128), (32, 8, 128)):
            for b in (1, 8, 32, 64, 128, 256):
                for L in (512, 1024, 2048, 4096, 8192, 32768):
                    if b * L * hkv > 2**24:
                        continue
                    q = torch.randn(b, hq, 1, d, device=dev, dtype=dt)
                    k = torch.randn(b, hkv, L, d, device=dev, dtype=dt)
                    v = torch.randn_like(k)
                    kv_bytes = 2.0 * b * hkv * L * d * 2
                    sec = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                    add(op="decode_default", batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, q_len=1, kv_len=L, causal=0,
                        block=0, seconds=sec, tflops=4.0 * b * hq * L * d / sec / 1e12, GBps=kv_bytes / sec / 1e9)
                    del k, v

    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    for fn in (prefill, chunk, decode, gemm, launch, decode_default):
        if only is None or fn.__name__ in only:
            section(fn)
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "serving_attention.csv")
