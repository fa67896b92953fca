"""Serving benchmark: the real server (HTTP, workers, KV over the transport) under traffic.

    python benchmarks/serve_bench.py --machine cpu2-vm --runs cpu                # colocated vs disaggregated (tcp) on CPU
    python benchmarks/serve_bench.py --machine h200x2 --runs gpu --model-shape 1b  # one H200; two H200s over cuda_ipc and tcp
    python benchmarks/serve_bench.py --machine h200 --runs gpu --model-shape 1b    # one H200: disaggregated within it

Each run starts `workbench serve`'s service, warms it up, drives it with `workbench bench serve`'s
client, and records the vllm bench serve metrics plus the KV hand-off: bytes, per-request
transfer window, and bytes over the summed windows. Writes benchmarks/results/serve-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # a random-weight Llama of a meaningful size for each machine
    "tiny": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192),
}


def runs(kind: str, gpus: int = 2, gpu: str = "H200") -> list[tuple[str, str, dict]]:
    """The runs of `kind`: on CPU ranks colocated and disaggregated; on GPUs one GPU colocated, then prefill on
    cuda:0 and decode on cuda:1 (two GPUs of one host; with one GPU both on cuda:0, two processes) over cuda_ipc and
    over tcp, and TP=2 where there are two GPUs."""
    if kind == "cpu":
        out = [("colocated-cpu", "colocated", dict(device="cpu", threads=1)),
               ("disaggregated-cpu-tcp", "disaggregated", dict(device="cpu", transport="tcp", threads=1))]
        if importlib.util.find_spec("nixl") is not None:  # the nixl backend where it is installed (UCX tcp/shm)
            out.append(("disaggregated-cpu-nixl", "disaggregated", dict(device="cpu", transport="nixl", threads=1)))
        return out
    n = min(gpus, 2)
    sides = dict(prefill={"device": "cuda:0"}, decode={"device": f"cuda:{n - 1}"})
    out = [(f"colocated-1x{gpu}", "colocated", dict(device="cuda:0", dtype="bfloat16")),
           (f"disaggregated-{n}x{gpu}-cuda_ipc", "disaggregated", dict(dtype="bfloat16", transport="cuda_ipc", **sides))]
    if n == 2:
        out.append((f"colocated-tp2-2x{gpu}", "colocated", dict(device="cuda:0", dtype="bfloat16", tp=2)))
    out.append((f"disaggregated-{n}x{gpu}-tcp", "disaggregated", dict(dtype="bfloat16", transport="tcp", **sides)))
    return out


def checkpoint(shape: str, gpu: bool) -> Path:
    """The benchmark's random Llama of `shape` (made on first use: bf16 for GPUs, fp32 for CPU ranks)."""
    from workbench.serve.checkpoints import random_llama

    model = Path(os.environ.get("TMPDIR", "/tmp")) / f"wb-serve-{shape}{'' if gpu else '-fp32'}"
    if not (model / "model.safetensors").is_file():
        random_llama(model, **SHAPES[shape], dtype="bfloat16" if gpu else "float32", device="cuda" if gpu else "cpu")
    return model


def kv_stats(tx: list[dict[str, Any]]) -> dict[str, Any]:
    """The KV hand-offs `tx` (`Backend.transfers` rows) in numbers: count, bytes, errors, the windows (first layer's
    write submitted → last layer's write done: mean, p50, max), bytes over the summed windows, and each layer
    write's submit → done (median ms, and its bytes over it, median GB/s)."""
    nbytes = sum(t["bytes"] for t in tx)
    win = sorted(t["t1"] - t["t0"] for t in tx)
    writes = [(nb, dt) for t in tx for nb, dt in t.get("writes", [])]
    rate = sorted(nb / max(dt, 1e-9) for nb, dt in writes)
    dts = sorted(dt for _, dt in writes)
    return {"kv_transfers": len(tx), "kv_bytes": nbytes, "kv_errors": sum(1 for t in tx if t["error"]),
            "kv_GBps_over_windows": nbytes / max(sum(win), 1e-9) / 1e9, "kv_mean_window_ms": sum(win) / len(tx) * 1e3,
            "kv_window_ms_p50": win[len(win) // 2] * 1e3, "kv_window_ms_max": win[-1] * 1e3,
            "layer_write_GBps_median": rate[len(rate) // 2] / 1e9 if rate else 0.0,
            "layer_write_ms_median": dts[len(dts) // 2] * 1e3 if dts else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machine", required=True)
    ap.add_argument("--runs", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--model-shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--traffic", default="concurrency=8,isl=128,osl=32,requests=48")
    ap.add_argument("--kv-cache", default="1GiB")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--budget", type=float, default=1e9, help="skip runs that would start after this many seconds")
    args = ap.parse_args()

    from workbench.serve.service import served
    from workbench.units import parse_size

    t_begin = time.time()
    gpus, gpu = 0, ""
    if args.runs == "gpu":
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            ap.error("--runs gpu: no GPU here (use --runs cpu)")
        gpu = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0]
    model = checkpoint(args.model_shape, gpu=args.runs == "gpu")
    rows = []
    for label, mode, spec in runs(args.runs, gpus, gpu):
        if time.time() - t_begin > args.budget:
            rows.append({"run": label, "error": "skipped: out of time budget"})
            continue
        t0 = time.time()
        try:
            # the client in its own process (`served`), as beside any server it measures
            with served(model, mode, kv_bytes=parse_size(args.kv_cache), page_size=16, max_batched_tokens=2048,
                        max_seqs=64, **spec) as (svc, drive):
                started = time.time() - t0
                drive("concurrency=4,isl=32,osl=8,requests=8")
                n0 = len(svc.backend.transfers)
                res = drive(args.traffic)
                tx = list(svc.backend.transfers)[n0:]
        except Exception as exc:  # noqa: BLE001 - record what failed and go on
            rows.append({"run": label, "error": f"{type(exc).__name__}: {exc}"})
            print(label, "FAILED", exc, flush=True)
            continue
        m = res.metrics
        row = {"run": label, "mode": mode, "start_s": round(started, 1), **{k: m[k] for k in (
            "completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
            "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
            "mean_itl_ms", "mean_e2el_ms")}, "failures": m["failures"]}
        if tx:
            row.update(kv_stats(tx))
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"machine": args.machine, "platform": platform.platform(), "cpus": os.cpu_count(),
            "model": {"shape": args.model_shape, **SHAPES[args.model_shape], "vocab": 258, "weights": "random N(0,0.02)"},
            "traffic": args.traffic, "command": "python benchmarks/serve_bench.py " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg()}
    try:
        import torch

        if torch.cuda.is_available():
            meta["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-{args.machine}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    cols = ["run", "completed", "failed", "output_throughput", "total_token_throughput", "mean_ttft_ms",
            "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "kv_GBps_over_windows", "layer_write_GBps_median",
            "kv_mean_window_ms"]
    lines = [f"# Serving benchmark on {args.machine}", "", f"`{meta['command']}`", "",
             f"{meta['platform']}, {meta['cpus']} CPUs, load average at the end {meta['load_average']}"
             + (f", GPUs: {meta.get('gpus')}" if meta.get("gpus") else ""), "",
             f"Model: random-weight Llama {meta['model']}; traffic `{args.traffic}` (closed loop, exact lengths, "
             "ignore_eos), after a warm-up of 8 requests.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            (f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, r.get("error", "")) if c != "run" else r["run"]))
            if c in r or c == "run" else "" for c in cols) + (f" {r['error']}" if "error" in r else "") + " |")
    lines += ["", "output_throughput and total_token_throughput in tok/s; TTFT/TPOT in ms (vllm bench serve definitions); "
              "kv_GBps_over_windows = KV bytes moved / summed per-request hand-off windows (first layer's write → last "
              "layer's completion, overlapped with the prefill compute of the remaining layers)."]
    (out / f"serve-{args.machine}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
