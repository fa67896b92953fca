"""Kernel benchmark: bytes moved per second against a plain copy of the same bytes, same run.

`bytes` counts what a kernel reads plus what it writes (payload, not indices); the copy
baseline copies `bytes / 2` (so it too reads and writes `bytes`). CPU: numba against
`numpy.copyto`, best of `repeats` interleaved runs. GPU: CuPy kernels against a
device-to-device `cudaMemcpyAsync` and the torch equivalent (`index_select`, `index_add_`,
`index_copy_`, torch quantisation), median of CUDA-event timings. Paged KV runs with
`check=False` (no host-side range/distinctness check of the page list), as torch's calls.

    python -m kernels.bench --json [--device cpu|gpu] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

MiB = 1 << 20
HIDDEN, TOP_K, EXPERTS, RANKS = 7168, 8, 256, 8  # DeepSeek-V3-like MoE layer, 8-way EP
KV_HEADS, PAGE, HEAD_DIM = 8, 16, 128  # bf16: 4 KiB per (head, page) block
QUANT_COLS = 4096


def _routing(rng: np.random.Generator, tokens: int) -> np.ndarray:
    return np.argsort(rng.random((tokens, EXPERTS)), axis=1)[:, :TOP_K].astype(np.int64)


def _row(kernel: str, device: str, nbytes: int, t: float, t_copy: float, **extra: Any) -> dict[str, Any]:
    gbps, copy = nbytes / t / 1e9, nbytes / t_copy / 1e9
    row = {"kernel": kernel, "device": device, "bytes": int(nbytes), "GBps": round(gbps, 2)}
    row |= {"copy_GBps": round(copy, 2), "ratio": round(gbps / copy, 3)}
    for k, v in extra.items():
        row[k] = round(v, 2) if isinstance(v, float) else v
    return row


# ---------------------------------------------------------------- CPU


def _best(fn: Callable[[], Any], copy: Callable[[], Any], repeats: int) -> tuple[float, float]:
    fn()
    copy()
    tk, tc = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        tk.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copy()
        tc.append(time.perf_counter() - t0)
    return min(tk), min(tc)


def _cpu_copy(nbytes: int) -> Callable[[], None]:
    src = np.random.default_rng(0).integers(0, 255, nbytes // 2, dtype=np.uint8)
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def _time_ref(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(max(2, repeats // 2)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def bench_cpu(size: int = 64 * MiB, repeats: int = 7) -> list[dict[str, Any]]:
    """Rows for every kernel on this CPU at an output of about `size` bytes."""
    from kernels import moe, paged_kv, quant

    rng = np.random.default_rng(1)
    rows: list[dict[str, Any]] = []
    row_bytes = HIDDEN * 2

    def add(kernel: str, nbytes: int, fn: Callable[[], Any], ref: Callable[[], Any], **extra: Any) -> None:
        t, tc = _best(fn, _cpu_copy(nbytes), repeats)
        tr = _time_ref(ref, repeats)
        rows.append(_row(kernel, "cpu", nbytes, t, tc, reference_GBps=nbytes / tr / 1e9, **extra))

    # MoE dispatch: a rank's tokens into per-destination send buffers (bf16 rows as uint16)
    tokens = max(1, size // (row_bytes * 5))
    ids = _routing(rng, tokens)
    x = rng.integers(0, 65535, (tokens, HIDDEN), dtype=np.uint16)
    plan = moe.plan_dispatch(ids, EXPERTS, RANKS)
    send = np.empty((plan.send_src.shape[0], HIDDEN), np.uint16)
    add("moe_dispatch", 2 * send.nbytes, lambda: moe.dispatch_pack(x, plan, send), lambda: x[plan.send_src],
        shape=f"{tokens} tok x {HIDDEN} bf16, k={TOP_K}, {RANKS} ranks -> {send.shape[0]} rows")

    # MoE unpack: what one rank received, into per-expert order
    ids_r = _routing(rng, max(1, size // row_bytes * RANKS // (TOP_K * 2)))
    p_r = moe.plan_dispatch(ids_r, EXPERTS, RANKS)
    recv_ids = ids_r[p_r.send_src[: int(p_r.send_offsets[1])]]
    recv = rng.integers(0, 65535, (recv_ids.shape[0], HIDDEN), dtype=np.uint16)
    ep = moe.plan_experts(recv_ids, [recv.shape[0]], 0, EXPERTS, RANKS)
    ex = np.empty((ep.expert_src.shape[0], HIDDEN), np.uint16)
    add("moe_unpack", 2 * ex.nbytes, lambda: moe.unpack(recv, ep, ex), lambda: recv[ep.expert_src],
        shape=f"{recv.shape[0]} rows -> {ex.shape[0]} expert rows")

    # MoE combine: returned bf16 rows (one per (token, k)) -> fp32 token outputs
    t_c = max(1, size // (HIDDEN * 4))
    ids_c = _routing(rng, t_c)
    p_c = moe.plan_dispatch(ids_c, EXPERTS, RANKS)
    ret = rng.integers(0, 65535, (int(p_c.return_offsets[-1]), HIDDEN), dtype=np.uint16) & 0xBFFF
    w = rng.random((t_c, TOP_K)).astype(np.float32)
    out = np.empty((t_c, HIDDEN), np.float32)
    add("moe_combine", ret.nbytes + out.nbytes, lambda: moe.combine(ret, p_c, w, out, bf16=True),
        lambda: moe.combine_reference(ret, p_c.combine_index, w), shape=f"{t_c} tok x {HIDDEN}, k={TOP_K}, bf16 -> fp32")

    # paged KV: half the pages of a heads-first bf16 cache
    page_bytes = KV_HEADS * PAGE * HEAD_DIM * 2
    n = max(1, size // page_bytes)
    cache = rng.integers(0, 65535, (KV_HEADS, 2 * n, PAGE, HEAD_DIM), dtype=np.uint16)
    pages = rng.permutation(2 * n)[:n]
    buf = np.empty((n, KV_HEADS, PAGE, HEAD_DIM), np.uint16)
    kv = f"{n} pages x {KV_HEADS} heads x {PAGE} x {HEAD_DIM} bf16"
    add("kv_gather", 2 * buf.nbytes, lambda: paged_kv.gather_pages(cache, pages, buf, check=False),
        lambda: paged_kv.gather_pages_reference(cache, pages), shape=kv)
    add("kv_scatter", 2 * buf.nbytes, lambda: paged_kv.scatter_pages(buf, cache, pages, check=False),
        lambda: paged_kv.scatter_pages_reference(buf, cache, pages), shape=kv)

    # blockwise quantisation of a float32 weight matrix, 128 x 128 blocks
    m = max(1, size // (QUANT_COLS * 4))
    wt = rng.standard_normal((m, QUANT_COLS)).astype(np.float32)
    for fmt in quant.FORMATS:
        q, s = quant.quantize(wt, fmt)
        shape = f"{m} x {QUANT_COLS} fp32, 128x128 blocks"
        nb = wt.nbytes + q.nbytes + s.nbytes
        add(f"{fmt}_quant", nb, partial(quant.quantize, wt, fmt), partial(quant.quantize_reference, wt, fmt),
            shape=shape)
        add(f"{fmt}_dequant", nb, partial(quant.dequantize, q, s, fmt),
            partial(quant.dequantize_reference, q, s, fmt), shape=shape)
    return rows


# ---------------------------------------------------------------- GPU


def gpu_time(fn: Callable[[], Any], repeats: int) -> float:
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def _same(a: Any, b: Any) -> bool:
    import torch

    def t(x: Any) -> Any:
        x = torch.as_tensor(x, device="cuda")
        return x.view(torch.int16) if x.dtype == torch.uint16 else x

    at, bt = t(a), t(b)
    if at.dtype.is_floating_point:
        return bool(torch.allclose(at.float(), bt.float(), rtol=1e-5, atol=1e-5, equal_nan=True))
    return bool(torch.equal(at.view(-1), bt.reshape(-1).to(at.dtype)))


Case = tuple[str, int, Callable[[], Any], Callable[[], Any], str]  # kernel, bytes, ours, torch's, shape


def _gpu_moe(size: int, rng: np.random.Generator, gen: Any) -> list[Case]:
    import cupy as cp
    import torch

    from kernels import moe

    row_bytes = HIDDEN * 2
    cases: list[Case] = []
    # dispatch: a rank's bf16 tokens into per-destination send buffers
    tokens = max(1, size // (row_bytes * 5))
    x = torch.randint(-32768, 32767, (tokens, HIDDEN), dtype=torch.int16, device="cuda", generator=gen)
    x_c = cp.asarray(x).view(cp.uint16)
    plan = moe.plan_dispatch(cp.asarray(_routing(rng, tokens)), EXPERTS, RANKS)
    src_t = torch.as_tensor(plan.send_src, device="cuda")
    send = cp.empty((plan.send_src.shape[0], HIDDEN), cp.uint16)
    cases.append(("moe_dispatch", 2 * send.nbytes, lambda: moe.dispatch_pack(x_c, plan, send),
                  lambda: x.index_select(0, src_t),
                  f"{tokens} tok x {HIDDEN} bf16, k={TOP_K}, {RANKS} ranks -> {send.shape[0]} rows"))
    # unpack: what rank 0 received, into per-expert order
    ids_r = _routing(rng, max(1, size // row_bytes * RANKS // (TOP_K * 2)))
    p_r = moe.plan_dispatch(ids_r, EXPERTS, RANKS)
    recv_ids = cp.asarray(ids_r[p_r.send_src[: int(p_r.send_offsets[1])]])
    n_recv = int(recv_ids.shape[0])
    recv = torch.randint(-32768, 32767, (n_recv, HIDDEN), dtype=torch.int16, device="cuda", generator=gen)
    recv_c = cp.asarray(recv).view(cp.uint16)
    ep = moe.plan_experts(recv_ids, [n_recv], 0, EXPERTS, RANKS)
    es_t = torch.as_tensor(ep.expert_src, device="cuda")
    ex = cp.empty((ep.expert_src.shape[0], HIDDEN), cp.uint16)
    cases.append(("moe_unpack", 2 * ex.nbytes, lambda: moe.unpack(recv_c, ep, ex),
                  lambda: recv.index_select(0, es_t), f"{n_recv} rows -> {ex.shape[0]} expert rows"))
    # combine: returned bf16 rows, one per (token, k) -> fp32 token outputs
    t_c = max(1, size // (HIDDEN * 4))
    p_c = moe.plan_dispatch(cp.asarray(_routing(rng, t_c)), EXPERTS, RANKS)
    n_ret = int(p_c.return_offsets[-1])
    ret = torch.randn((n_ret, HIDDEN), device="cuda", generator=gen).to(torch.bfloat16)
    ret_c = cp.asarray(ret.view(torch.int16)).view(cp.uint16)
    w = torch.rand((t_c, TOP_K), device="cuda", generator=gen)
    w_c = cp.asarray(w)
    out = cp.empty((t_c, HIDDEN), cp.float32)
    ci = torch.as_tensor(p_c.combine_index, device="cuda")
    valid = ci >= 0
    tok_of_row = torch.empty(n_ret, dtype=torch.int64, device="cuda")
    tok_of_row[ci[valid]] = torch.arange(t_c, device="cuda")[:, None].expand(t_c, TOP_K)[valid]
    w_of_row = torch.empty(n_ret, device="cuda")
    w_of_row[ci[valid]] = w[valid]
    out_t = torch.empty((t_c, HIDDEN), device="cuda")

    def torch_combine() -> Any:
        out_t.zero_()
        return out_t.index_add_(0, tok_of_row, ret.float() * w_of_row[:, None])

    cases.append(("moe_combine", n_ret * HIDDEN * 2 + out.nbytes, lambda: moe.combine(ret_c, p_c, w_c, out, bf16=True),
                  torch_combine, f"{t_c} tok x {HIDDEN}, k={TOP_K}, bf16 -> fp32"))
    return cases


def _gpu_kv(size: int, rng: np.random.Generator, gen: Any) -> list[Case]:
    import cupy as cp
    import torch

    from kernels import paged_kv

    n = max(1, size // (KV_HEADS * PAGE * HEAD_DIM * 2))
    cache = torch.randint(-32768, 32767, (KV_HEADS, 2 * n, PAGE, HEAD_DIM), dtype=torch.int16, device="cuda",
                          generator=gen)
    cache_c = cp.asarray(cache).view(cp.uint16)
    pages = cp.asarray(rng.permutation(2 * n)[:n])
    buf = cp.empty((n, KV_HEADS, PAGE, HEAD_DIM), cp.uint16)
    rows_t = torch.as_tensor((pages[:, None] + cp.arange(KV_HEADS)[None, :] * (2 * n)).reshape(-1), device="cuda")
    flat = cache.view(KV_HEADS * 2 * n, PAGE * HEAD_DIM)
    buf_t = torch.as_tensor(buf.view(cp.int16), device="cuda").view(n * KV_HEADS, PAGE * HEAD_DIM)
    kv = f"{n} pages x {KV_HEADS} heads x {PAGE} x {HEAD_DIM} bf16"
    return [
        ("kv_gather", 2 * buf.nbytes, lambda: paged_kv.gather_pages(cache_c, pages, buf, check=False),
         lambda: flat.index_select(0, rows_t), kv),
        ("kv_scatter", 2 * buf.nbytes, lambda: paged_kv.scatter_pages(buf, cache_c, pages, check=False),
         lambda: flat.index_copy_(0, rows_t, buf_t), kv),
    ]


def _gpu_quant(size: int, rng: np.random.Generator, gen: Any) -> list[Case]:
    import cupy as cp
    import torch

    from kernels import quant

    m = max(1, size // (QUANT_COLS * 4))
    wt = torch.randn((m, QUANT_COLS), device="cuda", generator=gen)
    wt_c = cp.asarray(wt)
    shape = f"{m} x {QUANT_COLS} fp32, 128x128 blocks"
    cases: list[Case] = []
    for fmt in quant.FORMATS:
        q, s = quant.quantize(wt_c, fmt)
        qt, st = torch.as_tensor(q, device="cuda"), torch.as_tensor(s, device="cuda")
        nbytes = wt.numel() * 4 + q.nbytes + s.nbytes
        cases.append((f"{fmt}_quant", nbytes, partial(_first, quant.quantize, wt_c, fmt),
                      partial(_first, quant.quantize_reference, wt, fmt), shape))
        cases.append((f"{fmt}_dequant", nbytes, partial(quant.dequantize, q, s, fmt),
                      partial(quant.dequantize_reference, qt, st, fmt), shape))
    return cases


def _first(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)[0]


def bench_gpu(sizes: tuple[int, ...] = (256 * MiB, 1024 * MiB), repeats: int = 10) -> list[dict[str, Any]]:
    """Rows for every kernel on the GPU, against a D2D copy and torch, per output size."""
    import cupy as cp
    import torch

    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    rng = np.random.default_rng(1)
    for size in sizes:
        for build in (_gpu_moe, _gpu_kv, _gpu_quant):
            try:
                cases = build(size, rng, gen)
            except Exception as exc:  # noqa: BLE001 - record the failure, measure the rest
                rows.append({"kernel": build.__name__, "device": "gpu", "out_MiB": size // MiB, "error": repr(exc)})
                continue
            for kernel, nbytes, fn, ref, shape in cases:
                try:
                    rows.append(_gpu_row(kernel, nbytes, fn, ref, shape, size, repeats))
                except Exception as exc:  # noqa: BLE001
                    rows.append({"kernel": kernel, "device": "gpu", "out_MiB": size // MiB, "error": repr(exc)})
            del cases
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    return rows


def _gpu_row(kernel: str, nbytes: int, fn: Callable[[], Any], ref: Callable[[], Any], shape: str, size: int,
             repeats: int) -> dict[str, Any]:
    import cupy as cp

    half = nbytes // 2
    src, dst = cp.empty(half, dtype=cp.uint8), cp.empty(half, dtype=cp.uint8)
    t = gpu_time(fn, repeats)
    tc = gpu_time(lambda: dst.data.copy_from_device_async(src.data, half), repeats)
    tt = gpu_time(ref, repeats)
    match = _same(fn(), ref())
    return _row(kernel, "gpu", nbytes, t, tc, torch_GBps=nbytes / tt / 1e9, torch_ratio=tt / t,
                out_MiB=size // MiB, match=match, shape=shape)


# ---------------------------------------------------------------- entry points


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    import numba

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    info |= {"numba": numba.__version__, "numba_threads": numba.get_num_threads(), "numpy": np.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            import cupy

            info["cupy"] = cupy.__version__
    except ImportError:
        pass
    return info


def gpu_available() -> bool:
    try:
        import cupy
        import torch

        return bool(torch.cuda.is_available()) and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver: no GPU
        return False


def run(device: str = "auto", size: int = 64 * MiB, gpu_sizes: tuple[int, ...] = (256 * MiB, 1024 * MiB)) -> list[dict[str, Any]]:
    """Benchmark rows for `device` (cpu, gpu, or auto: the CPU, and the GPU where there is one)."""
    rows: list[dict[str, Any]] = []
    if device in ("auto", "cpu"):
        rows += bench_cpu(size)
    if device == "gpu" or (device == "auto" and gpu_available()):
        rows += bench_gpu(gpu_sizes)
    return rows


def record(rows: list[dict[str, Any]], machine_name: str | None, command: str) -> dict[str, Any]:
    """The JSON record of a run: {machine, machine_info, command, rows}."""
    info = machine()
    return {"machine": machine_name or info.get("gpu") or info["cpu"], "machine_info": info, "command": command,
            "rows": rows}


def print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    """Rows as JSON or as an aligned table on stdout."""
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    cols = ["kernel", "device", "bytes", "GBps", "copy_GBps", "ratio", "torch_GBps"]
    print("  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print("  ".join(f"{r.get(c, ''):>12}" for c in cols))


def _size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}
    for u in ("KiB", "MiB", "GiB", ""):
        if text.endswith(u):
            n = int(text[: len(text) - len(u)] or "x")
            if n <= 0:
                raise ValueError(f"size must be positive, got {text!r}")
            return n * units[u]
    raise ValueError(text)  # pragma: no cover


def main(argv: list[str] | None = None) -> int:
    """`python -m kernels.bench`: the standalone entry (no workbench install needed)."""
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--size", type=_size, default=64 * MiB, help="CPU output size, e.g. 64MiB")
    p.add_argument("--gpu-sizes", default="256MiB,1GiB", help="GPU output sizes, e.g. 256MiB,1GiB")
    p.add_argument("--out")
    p.add_argument("--machine")
    a = p.parse_args(argv)
    try:
        sizes = tuple(_size(s) for s in a.gpu_sizes.split(","))
    except ValueError:
        p.error(f"--gpu-sizes: expected sizes like 256MiB,1GiB, got {a.gpu_sizes!r}")
    rows = run(a.device, a.size, sizes)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record(rows, a.machine, " ".join(["python -m kernels.bench", *(argv or sys.argv[1:])])), f, indent=2)
    print_rows(rows, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
