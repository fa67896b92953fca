"""Where one serving engine step's time goes: the model's forward over given compositions, timed and profiled.

    python benchmarks/serve_step_profile.py --machine cpu2-vm
    python benchmarks/serve_step_profile.py --machine h200 --device cuda:0 --model-shape 1b

The calibration's random Llama (`serve_calibrate.server_setup`) is loaded in this process (`Model.load`, bf16 on a
GPU) with a paged KV cache; each composition — d decodes at a context of `--context` tokens plus k prefill chunks of
p tokens — is built as the engine builds a step (`Batch.build`) and run through `Model.forward`. Per composition:
the median wall time of the synchronised step, the host time to enqueue its layers (`run_layers` returning, before
the logits' copy waits for the device), and with `torch.profiler` the device's kernel time per step, the number of
kernels and host→device syncs, and the ops that hold the most device and host time. The step is host-bound where the
enqueue time is close to the wall time and the kernels' sum far below it. `--graphs`: the decode-only compositions
also through the engine's CUDA graphs, the others through its graphed pieces around an eager attention
(`workbench.serve.graphs`; padded and replayed; eager on a CPU).
Writes benchmarks/results/serve-step-profile-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# (decodes, prefill chunks, prompt tokens per chunk)
COMPOSITIONS = ((1, 0, 0), (16, 0, 0), (0, 1, 32), (0, 1, 128), (0, 2, 64), (8, 1, 64), (8, 4, 32))


def bad(message: str) -> NoReturn:
    """A bad argument: its message on stderr, exit status 2 (argparse's)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_compositions(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for part in text.split(","):
        try:
            d, k, p = (int(x) for x in part.split(":"))
        except ValueError:
            bad(f"--compositions: {part!r} is not DECODES:CHUNKS:PROMPT (e.g. 8:1:64)")
        if d < 0 or k < 0 or p < 0 or d + k == 0 or (k and not p):
            bad(f"--compositions: {part!r} needs decodes + chunks >= 1 and a prompt >= 1 with chunks")
        out.append((d, k, p))
    return tuple(out)


Item = tuple[list[int], int, list[int]]


class Steps:
    """The calibration's random Llama (`serve_calibrate.server_setup`) loaded in this process with a paged KV cache
    sized for `comps` (and one spare page), and the engine's items of each composition: d decodes at a context of
    `context` tokens, then k prefill chunks of p tokens from position 0, each sequence on its own pages."""

    def __init__(self, device: str, shape: str, comps: tuple[tuple[int, int, int], ...], context: int) -> None:
        import torch
        from serve_calibrate import server_setup

        from workbench.serve.kv import KVCache
        from workbench.serve.model import Model

        if device.startswith("cuda") and not torch.cuda.is_available():
            bad(f"--device: {device} asked for but torch sees no CUDA device (use --device cpu)")
        self.device = device
        self.path, spec = server_setup(device, shape)
        self.dtype = getattr(torch, spec.get("dtype", "float32"))
        self.model = Model.load(self.path, device=device, dtype=self.dtype)
        self.page_size = int(spec["page_size"])
        self.context = context
        self.per_seq = -(-(context + max(p for _, _, p in comps) + 1) // self.page_size)
        self.seqs = max(d + k for d, k, _ in comps)
        self.spare = self.per_seq * self.seqs   # the page after every sequence's (the graphs' scratch page)
        self.kv = KVCache(self.model.cfg, self.spare + 1, self.page_size, dtype=self.dtype, device=device)
        self.gpu = device.startswith("cuda")

    def record(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """A benchmark's record: its rows with the model, the machine and the software they were measured on."""
        import torch

        return {"model": str(self.path), "dtype": str(self.dtype), "device": self.device, "page_size": self.page_size,
                "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name(0) if self.gpu else None,
                "machine": f"{platform.node()} ({platform.platform()}, {os.cpu_count()} CPUs)"}

    def items(self, d: int, k: int, p: int) -> list[Item]:
        out: list[Item] = []
        for s in range(d + k):
            pages = list(range(s * self.per_seq, (s + 1) * self.per_seq))
            out.append(([7], self.context, pages) if s < d else (list(range(3, 3 + p)), 0, pages))
        return out

    def step(self, it: list[Item]) -> tuple[Any, float]:
        """One eager step as the engine runs it: (logits, the seconds until its layers were enqueued); the logits'
        argmax is copied to the host (the engine's sampling waits for the device)."""
        from workbench.serve.model import Batch

        m = self.model
        t0 = time.perf_counter()
        batch = Batch.build(it, self.page_size, device=m.device)
        h = m.run_layers(m.embed(batch.tokens), batch, self.kv)
        t1 = time.perf_counter()
        logits = m.logits(h, batch)
        logits.argmax(-1).tolist()
        return logits, t1 - t0


def profile(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    st = Steps(args.device, args.model_shape, args.comps, args.context)
    model, kv, gpu = st.model, st.kv, st.gpu
    graphs = pieces = None
    if args.graphs:
        from workbench.serve.graphs import DecodeGraphs, PieceGraphs

        graphs = DecodeGraphs(model, kv, st.spare, st.seqs, st.per_seq)
        pieces = PieceGraphs(model, kv, st.spare, max(d + k * p for d, k, p in args.comps))
        t0 = time.perf_counter()
        n = graphs.capture_all() + pieces.capture_all()
        print(f"captured {n} graphs in {time.perf_counter() - t0:.2f} s", flush=True)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    rows = []
    # "graph": decode-only steps through DecodeGraphs; "pieces": the others through PieceGraphs, their decodes
    # attended apart from the prefills; "merged": the same built as the engine builds it (`Model.merge_pairs`: on a
    # GPU the decodes among the prefills where the bound allows; nothing to compare on a CPU, which never merges)
    runs: list[tuple[int, int, int, bool | str]] = [(d, k, p, False) for d, k, p in args.comps]
    runs += [(d, k, p, True if k == 0 else "pieces") for d, k, p in args.comps if graphs is not None]
    runs += [(d, k, p, "merged") for d, k, p in args.comps if graphs is not None and d and k and model.merge_pairs]
    for d, k, p, graph in runs:
        it = st.items(d, k, p)

        def step(it: list[Item] = it, graph: bool | str = graph) -> float:
            """One step as the engine runs it; returns the seconds until the forward was enqueued."""
            if not graph:
                return st.step(it)[1]
            from workbench.serve.model import Batch

            assert graphs is not None and pieces is not None
            t0 = time.perf_counter()
            merge = model.merge_pairs if graph == "merged" else 0
            logits = graphs.run(it) if graph is True else pieces.run(Batch.build(it, st.page_size, model.device,
                                                                                 merge_pairs=merge))
            t1 = time.perf_counter()
            logits.argmax(-1).tolist()
            return t1 - t0

        for _ in range(args.warmup):
            step()
        sync()
        walls, enq = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            enq.append(step())
            sync()
            walls.append(time.perf_counter() - t0)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(args.profiled):
                step()
            sync()
        ev = prof.key_averages()
        dev = [e for e in ev if getattr(e, "self_device_time_total", 0) > 0]
        kernels = sum(e.count for e in dev if not e.key.startswith("aten::")) / args.profiled   # not the ops
        device_us = sum(e.self_device_time_total for e in dev) / args.profiled
        syncs = sum(e.count for e in ev if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                     "cudaMemcpy")) / args.profiled
        launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cuLaunchKernelEx")) / args.profiled
        top_dev = sorted(dev, key=lambda e: -e.self_device_time_total)[:args.top]
        top_cpu = sorted((e for e in ev if not e.key.startswith("ProfilerStep")),
                         key=lambda e: -e.self_cpu_time_total)[:args.top]
        rows.append({
            "decodes": d, "chunks": k, "prompt": p, "context": args.context, "graph": graph,
            "wall_ms": statistics.median(walls) * 1e3, "wall_min_ms": min(walls) * 1e3,
            "enqueue_ms": statistics.median(enq) * 1e3, "device_ms": device_us / 1e3, "kernels": kernels,
            "launches": launches, "syncs": syncs,
            "top_device": [{"op": e.key[:90], "count": e.count / args.profiled,
                            "ms": e.self_device_time_total / args.profiled / 1e3} for e in top_dev],
            "top_host": [{"op": e.key[:90], "count": e.count / args.profiled,
                          "ms": e.self_cpu_time_total / args.profiled / 1e3} for e in top_cpu]})
        print(f"{d} decodes + {k} x {p}{f' ({_mode(graph)})' if graph else ''}: wall {rows[-1]['wall_ms']:.2f} ms, enqueue {rows[-1]['enqueue_ms']:.2f}, "
              f"device {rows[-1]['device_ms']:.2f}, kernels {kernels:.0f}, syncs {syncs:.0f}", flush=True)
    return st.record(rows)


def _mode(graph: bool | str) -> str:
    """How a row's step ran: eagerly ('no'), one CUDA graph ('yes'), or graphed pieces around the attention (its
    decodes attended apart, or among the prefills: 'pieces, merged')."""
    if isinstance(graph, str):
        return {"pieces": "pieces", "merged": "pieces, merged"}[graph]
    return "yes" if graph else "no"


def save(out: str, stem: str, rec: dict[str, Any], lines: list[str]) -> None:
    """`stem`.json (the record) and `stem`.md (the report's `lines`) in `out`."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stem}.json").write_text(json.dumps(rec, indent=1) + "\n")
    (d / f"{stem}.md").write_text("\n".join(lines) + "\n")


def write(args: argparse.Namespace, command: str, rec: dict[str, Any]) -> None:
    lines = [f"# Serving engine step profile ({args.machine})", "", f"`{command}`", "",
             f"Machine: {rec['machine']}; torch {rec['torch']}; model `{args.model_shape}` ({rec['dtype']}) on "
             f"`{args.device}`. Decodes at a context of {args.context} tokens; median of {args.reps} steps (wall, "
             f"synchronised), device time and counts per step from {args.profiled} profiled steps.", "",
             "| decodes | prefill chunks × tokens | CUDA graph | wall ms | enqueue ms | device ms | kernels | launches | "
             "syncs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['decodes']} | {r['chunks']} × {r['prompt']} | {_mode(r['graph'])} "
                     f"| {r['wall_ms']:.2f} | {r['enqueue_ms']:.2f} "
                     f"| {r['device_ms']:.2f} | {r['kernels']:.0f} | {r['launches']:.0f} | {r['syncs']:.0f} |")
    for r in rec["rows"]:
        lines += ["", f"## {r['decodes']} decodes + {r['chunks']} × {r['prompt']}"
                  + (f" ({_mode(r['graph'])})" if r["graph"] else ""), "",
                  "| top device ops | per step | ms | | top host ops | per step | ms |", "|---|---|---|---|---|---|---|"]
        for a, b in zip(r["top_device"] + [None] * args.top, r["top_host"]):
            left = f"{a['op']} | {a['count']:.0f} | {a['ms']:.3f}" if a else " | | "
            lines.append(f"| {left} | | {b['op']} | {b['count']:.0f} | {b['ms']:.3f} |")
    save(args.out, f"serve-step-profile-{args.machine}", rec, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machine", required=True, help="a name for the machine: the results file's suffix")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--model-shape", default="tiny", choices=("tiny", "1b"))
    ap.add_argument("--compositions", default=",".join(f"{d}:{k}:{p}" for d, k, p in COMPOSITIONS),
                    help="DECODES:CHUNKS:PROMPT,... (default %(default)s)")
    ap.add_argument("--context", type=int, default=128, help="the decodes' context tokens")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profiled", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--graphs", action="store_true",
                    help="also run the compositions through the engine's CUDA graphs: decode-only ones whole, the others in pieces (graphs.py)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    args.comps = parse_compositions(args.compositions)
    for name in ("context", "warmup", "reps", "profiled", "top"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            bad(f"--{name}: must be >= {0 if name == 'warmup' else 1}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    command = "python benchmarks/serve_step_profile.py " + " ".join(sys.argv[1:])
    write(args, command, profile(args))


if __name__ == "__main__":
    main()
