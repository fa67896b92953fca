"""Host dispatch and eager elementwise microbenchmarks on one CUDA GPU -> CSV (microbenchmark data).

    python3 benchmarks/host_dispatch.py --out DIR [--budget-s 170]

What it measures, each in isolation (never a training step of the validated model):

1. **Host seconds per op.** The native engine's Llama (`workbench.runner.llama`) at a launch-bound size
   (hidden 256, seq 64, one sequence: every kernel is a few microseconds, the GPU waits for the host),
   built with 2 and 6 layers; one training step's forward and backward timed on the host
   (`perf_counter`, no synchronisation inside; the GPU's lag after the backward is recorded to show
   the host was the bottleneck), median of 20 steps. The same steps' ops are counted with
   `workbench.calibration.op_counts` (a TorchDispatchMode), so the cost per op of a layer is
   Δhost / Δops between the two builds (the embedding, head and loss cancel). Programs: `eager` (plain
   tensors, autocast), `tp-sp` and `tp` (DTensor `parallelize_module` on a fake 2-rank process group:
   DTensor's sharding propagation and redistributes run as on two GPUs, the collectives issue no NCCL
   call), their cost per DTensor op after the plain ops are charged at the eager cost, and
   `compiled`/`compiled-tp-sp` (each block under `torch.compile`): seconds per compiled block call.
2. **Host seconds per collective call**: `_c10d_functional` all-gather / reduce-scatter + wait on a
   1-rank NCCL group (small tensors), median of 200 calls.
3. **Eager elementwise kernels on the GPU**: one layer of the validated model's shape (hidden 2048, ffn
   8192, 16/4 heads, seq 2048, mbs 8) run eagerly under autocast (and as tp=2 + SP on the fake group):
   each memory-bound op's bytes (inputs + outputs) and its CUDA-event time with the host kept ahead of
   the GPU (a sleep kernel first), per layer from the 2-layer minus the 1-layer build.

Rows: measure, program, phase, layers, value, unit, note, source (GPU, CPU, torch, command).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's workbench/, no install needed

from workbench.calibration import op_counts  # noqa: E402
from workbench.models import load_model  # noqa: E402

TINY = "llama3-8b:layers=2,hidden=256,heads=4,kv_heads=2,head_dim=64,ffn=512,vocab=1024,seq=64"
REAL = "llama3-8b:layers=1,hidden=2048,heads=16,kv_heads=4,head_dim=128,ffn=8192,vocab=32000,seq=2048"
DEV = "cuda"  # --smoke-cpu runs the host parts on CPU (a check of the script, not a measurement)
FIELDS = ["measure", "program", "phase", "layers", "model", "mbs", "value", "unit", "note", "source"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@contextlib.contextmanager
def fake_group(world: int) -> Any:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def host_times(spec: Any, program: str, compiled: bool, steps: int = 20) -> dict[str, float]:
    """Median host seconds of forward and backward of one training step, and the GPU's lag after it."""
    model, loss_ctx = op_counts.build_program(spec, program, DEV, compiled=compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV == "cuda") if program == "eager" else None
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, spec.vocab, (1, spec.seq), generator=g).to(DEV)
    y = torch.randint(0, spec.vocab, (1, spec.seq), generator=g).to(DEV)
    f, b, lag = [], [], []
    for i in range(steps + 5):
        sync()
        with loss_ctx():
            t0 = time.perf_counter()
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = op_counts.loss_of(model, x, y)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
        sync()
        t3 = time.perf_counter()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        if i >= 5:
            f.append(t1 - t0)
            b.append(t2 - t1)
            lag.append(t3 - t2)
    return {"fwd": statistics.median(f), "bwd": statistics.median(b), "lag": statistics.median(lag)}


def counts(spec: Any, program: str) -> dict[str, dict[str, int]]:
    t = op_counts.count_step(spec, program, DEV, mbs=1)
    return {ph: dict(t[ph].host) for ph in ("fwd", "bwd") if ph in t}


class TimedOps:
    """Dispatch mode timing each memory-bound op with CUDA events and recording its bytes."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.rows: list[tuple[str, str, int, Any, Any]] = []
        self.phase = "fwd"

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                if op_counts._classify(func) != "memory":
                    return func(*args, **kwargs)
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = func(*args, **kwargs)
                b.record()
                ins = op_counts._tensors((args, kwargs))
                ids = {id(t) for t in ins}
                outs = [o for o in op_counts._tensors(out) if id(o) not in ids]

                def nb(t: Any) -> int:
                    loc = t.to_local() if hasattr(t, "to_local") else t
                    return int(loc.numel() * loc.element_size())

                outer.rows.append((outer.phase, func._schema.name.split("::")[-1],
                                   sum(nb(t) for t in ins) + sum(nb(o) for o in outs), a, b))
                return out

        self.mode = Mode()


def elementwise(spec: Any, program: str, mbs: int) -> dict[str, tuple[float, float, int]]:
    """{phase: (bytes, GPU seconds, ops)} of the memory-bound ops of one step of `spec`."""
    model, loss_ctx = op_counts.build_program(spec, program, "cuda")
    x = torch.randint(0, spec.vocab, (mbs, spec.seq), device="cuda")
    y = torch.randint(0, spec.vocab, (mbs, spec.seq), device="cuda")
    for _ in range(2):  # warm-up (allocator, autocast cache)
        with loss_ctx():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = op_counts.loss_of(model, x, y)
            loss.backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    tm = TimedOps()
    with loss_ctx():
        torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time: the host queues every op before the GPU runs them
        with tm.mode:
            tm.phase = "fwd"
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = op_counts.loss_of(model, x, y)
            tm.phase = "bwd"
            loss.backward()
    torch.cuda.synchronize()
    out: dict[str, tuple[float, float, int]] = {}
    for ph, _name, nbytes, a, b in tm.rows:
        by, s, n = out.get(ph, (0.0, 0.0, 0))
        out[ph] = (by + nbytes, s + a.elapsed_time(b) / 1e3, n + 1)
    del model
    torch.cuda.empty_cache()
    return out


@contextlib.contextmanager
def nccl_group() -> Any:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29651")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def collective_calls(n: int = 200, fake: bool = False) -> dict[str, float]:
    """Host seconds per functional all-gather / reduce-scatter (+ wait) on a 1-rank NCCL group (or, with
    `fake`, on the fake 2-rank group: DTensor's collective path without the NCCL call)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    with fake_group(2) if fake else nccl_group():
        grp = dist.group.WORLD
        t = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
        out = {}
        for name, fn in (("all_gather", lambda: funcol.all_gather_tensor(t, 0, grp)),
                         ("reduce_scatter", lambda: funcol.reduce_scatter_tensor(t, "sum", 0, grp))):
            for _ in range(20):
                fn().wait()
            torch.cuda.synchronize()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn().wait()
                ts.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            out[name] = statistics.median(ts)
        return out


PARTS = ("host", "collective", "elementwise", "coefficients", "nccl-tp")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=170.0, help="skip the compiled programs past half of this")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--parts", default="host,collective,elementwise", help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--smoke-cpu", action="store_true", help="check the script on CPU (host parts only, no numbers)")
    args = ap.parse_args()
    global DEV
    if args.smoke_cpu:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if DEV == "cuda" else "no GPU (smoke test)"
    source = (f"measured: {gpu}, {cpu_name()} ({os.cpu_count()} cores), torch "
              f"{torch.__version__} CUDA {torch.version.cuda}, 'python3 benchmarks/host_dispatch.py --parts "
              f"{args.parts}'")
    f = open(out / "host_dispatch.csv", "w", newline="")
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()

    def emit(measure: str, program: str, phase: str, layers: int, value: float, unit: str, note: str = "",
             model: str = "", mbs: int = 0) -> None:
        w.writerow({"measure": measure, "program": program, "phase": phase, "layers": layers, "model": model,
                    "mbs": mbs, "value": value, "unit": unit, "note": note, "source": source})
        f.flush()
        print(measure, program, phase, layers, f"{value:.6g}", unit, note, model[:40], mbs, flush=True)

    def fail(what: str, exc: Exception) -> None:
        emit("failed", what, "", 0, 0.0, "", f"{type(exc).__name__}: {str(exc)[:300]}")

    tiny = load_model(TINY)

    def host_part(name: str, program: str, compiled: bool, group: Any) -> None:
        with group:
            for layers in (2, 6):
                spec = replace(tiny, layers=layers)
                h = host_times(spec, program, compiled, args.steps)
                for ph in ("fwd", "bwd"):
                    emit("host_s", name, ph, layers, h[ph], "s", "", op_counts.spec_name(spec), 1)
                emit("gpu_lag_s", name, "bwd", layers, h["lag"], "s", "GPU work left when backward() returned",
                     op_counts.spec_name(spec), 1)
                if not compiled:
                    for ph, d in counts(spec, program).items():
                        for kind, n in d.items():
                            emit("ops", name, ph, layers, n, kind, "", op_counts.spec_name(spec), 1)

    if "host" in parts:
        plans = [("eager", "eager", False), ("tp-sp", "tp-sp", False), ("tp", "tp", False),
                 ("compiled", "eager", True), ("compiled-tp-sp", "tp-sp", True)]
        for name, program, compiled in plans[:3] if DEV == "cpu" else plans:
            if compiled and time.perf_counter() - start > args.budget_s * 0.5:
                emit("skipped", name, "", 0, 0.0, "", "out of time budget")
                continue
            try:
                host_part(name, program, compiled, fake_group(2) if program != "eager" else contextlib.nullcontext())
            except Exception as exc:  # noqa: BLE001 - report and go on
                fail(name, exc)
    if DEV == "cpu":
        f.close()
        return 0
    if "nccl-tp" in parts:  # DTensor on a real 1-rank NCCL mesh (redistributes over one rank are skipped)
        try:
            host_part("tp-sp-nccl1", "tp-sp", False, nccl_group())
        except Exception as exc:  # noqa: BLE001
            fail("tp-sp-nccl1", exc)
    if "collective" in parts:
        for fake in (False, True):
            try:
                for k, v in collective_calls(fake=fake).items():
                    emit("collective_host_s", k + ("-fake2" if fake else ""), "", 0, v, "s",
                         "functional collective + wait, " + ("fake 2-rank group" if fake else "1-rank NCCL") + ", 32 KiB")
            except Exception as exc:  # noqa: BLE001
                fail("collective" + ("-fake2" if fake else ""), exc)
    if "coefficients" in parts:  # per-layer memory-bound bytes counted on CUDA at the shapes of op_counts.VARIATIONS
        for program in ("eager", "tp-sp", "tp"):
            try:
                with fake_group(2) if program != "eager" else contextlib.nullcontext():
                    for r in op_counts.layer_bytes(program, "cuda"):
                        emit("layer_bytes", program, r["phase"], 1, r["bytes"], "B", "counted, not timed",
                             r["model"], r["mbs"])
            except Exception as exc:  # noqa: BLE001
                fail(f"coefficients-{program}", exc)
    if "elementwise" in parts:
        real = load_model(REAL)
        for program in ("eager", "tp-sp"):
            if time.perf_counter() - start > args.budget_s:
                emit("skipped", f"elementwise-{program}", "", 0, 0.0, "", "out of time budget")
                continue
            try:
                with fake_group(2) if program != "eager" else contextlib.nullcontext():
                    for layers in (1, 2):
                        spec = replace(real, layers=layers)
                        for ph, (by, sec, n) in elementwise(spec, program, 8).items():
                            emit("ew_bytes", program, ph, layers, by, "B", "memory-bound ops", op_counts.spec_name(spec), 8)
                            emit("ew_gpu_s", program, ph, layers, sec, "s", "CUDA events per op", op_counts.spec_name(spec), 8)
                            emit("ew_ops", program, ph, layers, n, "ops", "", op_counts.spec_name(spec), 8)
            except Exception as exc:  # noqa: BLE001
                fail(f"elementwise-{program}", exc)
    f.close()
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
