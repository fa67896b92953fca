"""Long-context attention and comm/compute interference on one host -> CSVs (microbenchmark data).

Two measurements the training simulator needs beyond `gemm_sweep.py`:

* `attention`: flash attention (SDPA, bf16, causal, head_dim 128) forward and backward times from
  seq 4096 to 131072 on one GPU, and the unfused attention core (two batched GEMMs over the
  full s x s square, softmax, dropout) at the shapes of a 2021 Megatron layer;
* `sustained`: an 8192³ bf16 GEMM run back to back for `--seconds` on one GPU: throughput in the first
  second (boost clocks) and over the last third (power-saturated clocks), with the SM clock and power
  read from nvidia-smi while it runs;
* `interference`: a bf16 GEMM's throughput alone, and beside an NCCL all-reduce or all-gather in
  flight on another stream, on every rank (run under torchrun with 2+ GPUs); also the collective's
  bus bandwidth alone and beside the GEMM.

Usage (on a GPU machine):

    python3 benchmarks/fidelity_sweep.py attention --out attention.csv [--budget-s 60]
    python3 benchmarks/fidelity_sweep.py sustained --out sustained.csv [--seconds 40]
    torchrun --nproc-per-node 2 benchmarks/fidelity_sweep.py interference --out interference.csv

Timing: CUDA events, median over repetitions (`kernels.bench.gpu_time`, as `gemm_sweep.py`).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's kernels/, no install needed

from kernels.bench import gpu_time  # noqa: E402 (after the path)

REPS = 5  # timed repetitions per measurement unless a call says otherwise


def source_of(extra: str) -> str:
    return (f"measured: {torch.cuda.get_device_name(0)}, torch {torch.__version__} CUDA {torch.version.cuda}, "
            f"'{extra}' (CUDA-event median)")


def _flash_times(batch: int, heads: int, seq: int, d: int, reps: int) -> tuple[float, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.randn(batch, heads, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        fwd = gpu_time(lambda: sdpa(q, k, v, is_causal=True), reps)
        out = sdpa(q, k, v, is_causal=True)
        g = torch.randn_like(out)
        bwd = gpu_time(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True), reps)
    return fwd, bwd


def _unfused_times(b: int, heads: int, seq: int, d: int) -> tuple[float, float, float, float]:
    q = torch.randn(b * heads, seq, d, device="cuda", dtype=torch.bfloat16)
    kt = torch.randn(b * heads, d, seq, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b * heads, seq, d, device="cuda", dtype=torch.bfloat16)
    s_ = torch.bmm(q, kt)
    return (gpu_time(lambda: torch.bmm(q, kt), REPS), gpu_time(lambda: torch.softmax(s_, dim=-1), REPS),
            gpu_time(lambda: torch.nn.functional.dropout(s_, 0.1, training=True), REPS),
            gpu_time(lambda: torch.bmm(s_, v), REPS))


def attention(args: argparse.Namespace) -> int:
    src = source_of("python3 benchmarks/fidelity_sweep.py attention")
    t0 = time.perf_counter()
    fields = ["op", "dtype", "batch", "heads", "seq", "kv_seq", "head_dim", "causal", "seconds", "tflops", "source"]
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        d = 128
        for seq in (4096, 8192, 16384, 32768, 65536, 131072):
            if time.perf_counter() - t0 > args.budget_s:
                break
            heads = 8 if seq <= 32768 else 4
            batch = max(1, 32768 // seq)
            flops = 4 * batch * heads * seq * seq * d * 0.5
            fwd, bwd = _flash_times(batch, heads, seq, d, 5 if seq <= 32768 else 2)
            common = dict(dtype="bf16", batch=batch, heads=heads, seq=seq, kv_seq=seq, head_dim=d, causal=1, source=src)
            w.writerow(dict(op="attn_fwd", seconds=f"{fwd:.4e}", tflops=f"{flops / fwd / 1e12:.2f}", **common))
            w.writerow(dict(op="attn_bwd", seconds=f"{bwd:.4e}", tflops=f"{2.5 * flops / bwd / 1e12:.2f}", **common))
            f.flush()
            torch.cuda.empty_cache()
        # unfused attention core (Megatron 2021): QK^T and AV as batched GEMMs over the full square,
        # scale-mask-softmax and dropout as separate memory-bound kernels (fp16/bf16 s x s tensors)
        for seq, heads in ((2048, 12), (2048, 20), (4096, 16)):
            b = 2
            t_qk, t_sm, t_do, t_av = _unfused_times(b, heads, seq, d)
            fl = 2.0 * b * heads * seq * seq * d
            common = dict(dtype="bf16", batch=b, heads=heads, seq=seq, kv_seq=seq, head_dim=d, causal=0, source=src)
            w.writerow(dict(op="bmm_qk", seconds=f"{t_qk:.4e}", tflops=f"{fl / t_qk / 1e12:.2f}", **common))
            w.writerow(dict(op="bmm_av", seconds=f"{t_av:.4e}", tflops=f"{fl / t_av / 1e12:.2f}", **common))
            w.writerow(dict(op="softmax", seconds=f"{t_sm:.4e}", tflops="", **common))
            w.writerow(dict(op="dropout", seconds=f"{t_do:.4e}", tflops="", **common))
            f.flush()
    print(f"attention rows in {time.perf_counter() - t0:.1f} s -> {args.out}")
    return 0


def _smi() -> tuple[str, str]:
    import subprocess

    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")  # nvidia-smi counts physical GPUs
        index = visible[torch.cuda.current_device()] if visible[0] else str(torch.cuda.current_device())
        out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=clocks.sm,power.draw",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
        clk, pw = (x.strip() for x in out.strip().split(",")[:2])
        return clk, pw
    except Exception:  # noqa: BLE001 - telemetry is optional
        return "", ""


def sustained(args: argparse.Namespace) -> int:
    import threading

    src = source_of("python3 benchmarks/fidelity_sweep.py sustained")
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2.0 * n ** 3
    latest = ["", ""]
    stop = threading.Event()

    def sample() -> None:  # telemetry off the GPU's critical path: the GEMM queue never drains for it
        while not stop.is_set():
            latest[:] = list(_smi())
            stop.wait(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rows = []
    t0 = time.perf_counter()
    torch.cuda.synchronize()
    reps = 100
    while time.perf_counter() - t0 < args.seconds:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            torch.matmul(a, b)
        e.record()
        e.synchronize()
        sec = s.elapsed_time(e) / 1e3 / reps
        rows.append(dict(t_s=f"{time.perf_counter() - t0:.2f}", m=n, n=n, k=n, seconds=f"{sec:.4e}",
                         tflops=f"{flops / sec / 1e12:.1f}", sm_clock_MHz=latest[0], power_W=latest[1], source=src))
    stop.set()
    th.join(timeout=5)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tf = [float(r["tflops"]) for r in rows]
    tail = tf[len(tf) * 2 // 3:]
    print(f"sustained: first {tf[0]:.1f}, best {max(tf):.1f}, last third median {statistics.median(tail):.1f} TFLOP/s "
          f"({len(rows)} samples) -> {args.out}")
    return 0


def interference(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl")
    dev = torch.device("cuda", torch.cuda.current_device())
    src = source_of(f"torchrun --nproc-per-node {world} benchmarks/fidelity_sweep.py interference")
    comp, comm = torch.cuda.Stream(), torch.cuda.Stream()
    rows = []
    shapes = ((8192, 8192, 8192), (4096, 4096, 4096), (8192, 2304, 16384), (8192, 16384, 6656))
    for nbytes in (64 << 20, 512 << 20):
        for op in ("all_reduce", "all_gather"):
            n = nbytes // 2
            if op == "all_reduce":
                buf = torch.ones(n, device=dev, dtype=torch.bfloat16)

                def coll(buf=buf):
                    dist.all_reduce(buf)
            else:
                out = torch.empty(n, device=dev, dtype=torch.bfloat16)
                inp = torch.ones(n // world, device=dev, dtype=torch.bfloat16)

                def coll(out=out, inp=inp):
                    dist.all_gather_into_tensor(out, inp)
            for m, nn, k in shapes:
                a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                b = torch.randn(k, nn, device=dev, dtype=torch.bfloat16)
                gemm_reps = 30

                def gemms(a=a, b=b, reps=gemm_reps):
                    for _ in range(reps):
                        torch.matmul(a, b)

                # alone
                dist.barrier()
                torch.cuda.synchronize()
                g_alone = gpu_time(gemms, 3) / gemm_reps
                dist.barrier()
                c_alone = gpu_time(coll, REPS)
                # together: the collective loops on its stream for as long as the GEMMs run
                c_reps_t = torch.tensor([max(2, int(g_alone * gemm_reps / max(c_alone, 1e-6)) + 2)], device=dev)
                dist.all_reduce(c_reps_t, op=dist.ReduceOp.MAX)  # every rank must issue as many collectives
                c_reps = int(c_reps_t.item())
                dist.barrier()
                torch.cuda.synchronize()
                e0 = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                with torch.cuda.stream(comm):
                    e0[2].record(comm)
                    for _ in range(c_reps):
                        coll()
                    e0[3].record(comm)
                with torch.cuda.stream(comp):
                    e0[0].record(comp)
                    gemms()
                    e0[1].record(comp)
                torch.cuda.synchronize()
                g_with = e0[0].elapsed_time(e0[1]) / 1e3 / gemm_reps
                c_with = e0[2].elapsed_time(e0[3]) / 1e3 / c_reps
                factor = (world - 1) / world * (2 if op == "all_reduce" else 1)
                rows.append(dict(rank=rank, world=world, comm_op=op, comm_bytes=nbytes, m=m, n=nn, k=k,
                                 gemm_tflops_alone=f"{2 * m * nn * k / g_alone / 1e12:.1f}",
                                 gemm_tflops_beside=f"{2 * m * nn * k / g_with / 1e12:.1f}",
                                 gemm_slowdown=f"{g_with / g_alone:.4f}",
                                 busbw_alone_GBps=f"{nbytes * factor / c_alone / 1e9:.1f}",
                                 busbw_beside_GBps=f"{nbytes * factor / c_with / 1e9:.1f}", source=src))
                del a, b
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for part in gathered:
                w.writerows(part)
        print(f"{sum(len(p) for p in gathered)} interference rows -> {args.out}")
    dist.destroy_process_group()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("attention", "sustained", "interference"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--seconds", type=float, default=40.0, help="sustained: how long to run")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    return {"attention": attention, "sustained": sustained, "interference": interference}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
