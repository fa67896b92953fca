"""GEMM, attention and elementwise throughput sweep on one CUDA GPU -> CSV (microbenchmark data).

Usage (on a GPU machine, with the image's python3 and torch):

    python3 benchmarks/gemm_sweep.py --out gemm.csv [--budget-s 300]

Rows: op (gemm | gemm_fp8 | attn_fwd | attn_bwd | elementwise), dtype, the shape columns that
apply (m, n, k for GEMMs: C[m,n] = A[m,k] @ B[k,n]; batch, heads, seq, head_dim, causal for
attention; bytes for elementwise), the median seconds per call over timed repetitions (CUDA
events), tflops (useful FLOPs / s; causal attention counts half the score matrix) and GBps.
The CSV's `source` column names the GPU, torch version and the command.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's kernels/ and workbench/, no install needed

from kernels.bench import gpu_time  # noqa: E402 (after the path)

POW2 = [256, 512, 1024, 2048, 4096, 8192, 16384]
FIELDS = ["op", "dtype", "m", "n", "k", "batch", "heads", "seq", "head_dim", "causal", "bytes",
          "seconds", "tflops", "GBps", "source"]


def timed(fn, target_s: float = 0.02, max_reps: int = 200) -> float:
    """Median seconds of `fn()` over repetitions sized to take about `target_s` (CUDA events: `kernels.bench`)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    return gpu_time(fn, int(min(max(target_s / once, 3), max_reps)))


def attention_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[float, float]:
    """(forward, backward) median seconds of scaled_dot_product_attention."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd = timed(lambda: sdpa(q, k, v, is_causal=causal))
    out = sdpa(q, k, v, is_causal=causal)
    g = torch.randn_like(out)
    bwd = timed(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))
    return fwd, bwd


def transformer_shapes() -> list[tuple[int, int, int]]:
    """(m, n, k) of the four linear layers of a transformer for some hidden sizes and TP degrees."""
    out = set()
    for h in (2048, 4096, 5120, 8192, 12288, 16384, 25600):
        for tp in (1, 2, 4, 8):
            for tokens in (2048, 8192):
                for n, k in ((3 * h // tp, h), (h, h // tp), (4 * h // tp, h), (h, 4 * h // tp),
                             (int(3.5 * h) // tp, h), (h, int(3.5 * h) // tp)):
                    out.add((tokens, n, k))
    return sorted(out)


def model_shapes(spec: str, tps: list[int], mbs: list[int]) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int, int]]]:
    """The GEMMs (m, n, k; forward, dgrad, wgrad, LM head) and attention shapes (batch, heads, seq, head_dim)
    of one layer of `spec` (a workbench model spec) at each TP degree and micro-batch (needs the repo on PYTHONPATH)."""
    from workbench.models.costs import backward_gemms, layer_gemms, layer_kinds
    from workbench.models.presets import load_model

    m = load_model(spec)
    gemms, attn = set(), set()
    for tp in tps:
        for b in mbs:
            tokens = b * m.seq
            for kind in set(layer_kinds(m)):
                for g in layer_gemms(m, kind, tokens, tp):
                    for x in (g, *backward_gemms(g)):
                        gemms.add((x.m, x.n, x.k))
            v = max(m.vocab // tp, 1)
            gemms |= {(tokens, v, m.hidden), (tokens, m.hidden, v), (m.hidden, v, tokens)}
            attn.add((b, max(m.heads // tp, 1), m.seq, m.head_dim))
    return sorted(gemms), sorted(attn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop adding rows after this long")
    ap.add_argument("--quick", action="store_true", help="a few shapes only (smoke test)")
    ap.add_argument("--model", default=None, help="sweep this model's own shapes (a workbench model spec) instead of the grid")
    ap.add_argument("--tp", default="1", help="with --model: TP degrees, comma-separated")
    ap.add_argument("--mbs", default="1", help="with --model: micro-batch sizes, comma-separated")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    source = (f"measured: {name}, torch {torch.__version__} CUDA {torch.version.cuda}, "
              f"'python3 benchmarks/gemm_sweep.py' (CUDA-event median)")
    t_start = time.perf_counter()
    rows: list[dict[str, object]] = []
    f = open(args.out, "w", newline="")
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()

    def emit(**row: object) -> None:
        row["source"] = source
        w.writerow(row)
        f.flush()
        rows.append(row)

    def out_of_time() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    grid = [(m, n, k) for m in POW2 for n in POW2 for k in POW2]
    if args.quick:
        grid = [(1024, 1024, 1024), (4096, 4096, 4096)]
    shapes = grid + ([] if args.quick else transformer_shapes())
    model_attn: list[tuple[int, int, int, int]] = []
    if args.model:
        shapes, model_attn = model_shapes(args.model, [int(x) for x in args.tp.split(",")],
                                          [int(x) for x in args.mbs.split(",")])
        grid = []
        source += f" --model {args.model} --tp {args.tp} --mbs {args.mbs}"
    # bf16 GEMM
    for m, n, k in shapes:
        if out_of_time():
            break
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        b = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
        s = timed(lambda a=a, b=b: torch.matmul(a, b))
        emit(op="gemm", dtype="bf16", m=m, n=n, k=k, seconds=f"{s:.4e}", tflops=f"{2 * m * n * k / s / 1e12:.2f}",
             GBps=f"{2 * (m * k + k * n + m * n) / s / 1e9:.1f}")
        del a, b
    # fp8 GEMM (e4m3 inputs, bf16 output, per-tensor scales) where torch._scaled_mm exists
    if hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(0) >= (8, 9):
        one = torch.tensor(1.0, device=dev)
        for m, n, k in grid:
            if out_of_time():
                break
            try:
                a = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
                b = torch.randn(n, k, device=dev).to(torch.float8_e4m3fn).t()
                s = timed(lambda a=a, b=b: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
            except Exception as exc:
                print("fp8 failed", m, n, k, exc, file=sys.stderr)
                break
            emit(op="gemm_fp8", dtype="fp8", m=m, n=n, k=k, seconds=f"{s:.4e}",
                 tflops=f"{2 * m * n * k / s / 1e12:.2f}", GBps=f"{(m * k + k * n + 2 * m * n) / s / 1e9:.1f}")
            del a, b
    # attention (SDPA; flash kernel where available)
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        ctx = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION])  # noqa: E731
    except ImportError:  # pragma: no cover
        import contextlib
        ctx = contextlib.nullcontext
    seqs = [512, 1024, 2048, 4096, 8192, 16384, 32768] if not args.quick else [1024]
    cases = [(max(1, 16384 // seq), 32 if d == 128 else 64, seq, d, causal)
             for d in (128, 64) for causal in (True, False) for seq in seqs]
    if args.model:
        cases = [(b, h, seq, d, True) for b, h, seq, d in model_attn]
    for batch, heads, seq, d, causal in cases:
        if out_of_time():
            break
        q, k_, v = (torch.randn(batch, heads, seq, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(3))
        flops = 4 * batch * heads * seq * seq * d * (0.5 if causal else 1.0)
        with ctx():
            try:
                s, sb = attention_times(q, k_, v, causal)
            except Exception as exc:
                print("attention failed", seq, d, exc, file=sys.stderr)
                continue
        common = dict(dtype="bf16", batch=batch, heads=heads, seq=seq, head_dim=d, causal=int(causal))
        emit(op="attn_fwd", seconds=f"{s:.4e}", tflops=f"{flops / s / 1e12:.2f}", **common)
        emit(op="attn_bwd", seconds=f"{sb:.4e}", tflops=f"{2.5 * flops / sb / 1e12:.2f}", **common)
        del q, k_, v
    # elementwise (z = x + y): memory-bound ops (norms, activations, residuals)
    for mib in ([1, 4, 16, 64, 256, 1024] if not args.quick else [64]):
        if out_of_time():
            break
        n = mib * 1024 * 1024 // 2
        x, y = torch.randn(n, device=dev, dtype=torch.bfloat16), torch.randn(n, device=dev, dtype=torch.bfloat16)
        z = torch.empty_like(x)
        s = timed(lambda x=x, y=y, z=z: torch.add(x, y, out=z))
        emit(op="elementwise", dtype="bf16", bytes=3 * 2 * n, seconds=f"{s:.4e}", GBps=f"{3 * 2 * n / s / 1e9:.1f}")
    f.close()
    print(f"{len(rows)} rows in {time.perf_counter() - t_start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
