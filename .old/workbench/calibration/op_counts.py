"""Count the host-side ops of one training step of the native model, from the model itself.

A `TorchDispatchMode` sees every aten op the Python program issues (forward, the autograd engine's
backward, the optimizer) before any tensor subclass handles it, so it counts what the host dispatches:
plain-tensor ops, DTensor ops (each pays DTensor's sharding propagation on the host before its local
kernel) and c10d collectives. Per op it also records the HBM bytes a kernel would move (tensor inputs +
outputs that are not an input) and whether it is a GEMM / attention / view / memory-bound op, so the eager
elementwise traffic of a layer is counted rather than written down by hand.

Counts per layer come from two builds of the same model with 1 and 2 layers (the difference), the rest
of the step (embedding, final norm, LM head, loss) is the 1-layer build minus one layer. Counting runs on
CPU (`device="cpu"`; tensor parallelism on a fake 2-rank process group, so collectives are issued as on two
GPUs) or on a GPU; the model is `workbench.runner.llama` exactly as the native engine builds it, with
`workbench.runner.native.apply_tp` for tensor/sequence parallelism and `torch.autocast` over fp32
parameters as the engine runs without FSDP.

    python -m workbench.calibration.op_counts [--detail] [--write FILE]   # the counts on this machine's CPU

`benchmarks/host_dispatch.py` runs the same counter on CUDA beside its timings: those counts are the ones
the simulator uses (`datasets/host_dispatch_measured.csv`; CPU kernels differ, e.g. RMSNorm decomposes on
CPU). Needs torch (imported lazily: `import workbench` does not import it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from workbench.sim.train_host import TERMS, layer_terms, solve_terms

# a reference model small enough to count in a second on CPU; counts per layer do not depend on the sizes
REFERENCE = "llama3-8b:layers=2,hidden=128,heads=4,kv_heads=2,head_dim=32,ffn=256,vocab=512,seq=32"
GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm")
VIEWLIKE = ("detach", "_unsafe_view", "alias", "lift_fresh", "_to_copy_noop")
PROGRAMS = ("eager", "tp", "tp-sp")
C10D_HELPERS = ("wait_tensor", "_wrap_tensor_autograd")  # c10d functional ops that launch no collective


@dataclass
class Tally:
    """Ops seen in one phase: counts by host kind (plain | dtensor | collective launches | c10d: waits and
    autograd wraps of collectives) and memory-bound bytes."""

    host: Counter[str] = field(default_factory=Counter)
    kernels: Counter[str] = field(default_factory=Counter)  # memory-bound kernel ops by name
    ew_bytes: float = 0.0  # bytes read + written by memory-bound (non-GEMM, non-attention, non-view) kernels
    ew_ops: int = 0


def _classify(func: Any) -> str:
    ns = func.namespace
    name = func._schema.name.split("::")[-1]
    if ns in ("_c10d_functional", "c10d", "_c10d_functional_autograd", "_dtensor"):
        return "collective" if ns != "_dtensor" else "view"
    if getattr(func, "is_view", False) or name in VIEWLIKE or name.startswith(("view", "expand", "t", "transpose",
                                                                                 "permute", "slice", "select",
                                                                                 "split", "chunk", "unbind",
                                                                                 "squeeze", "unsqueeze", "as_strided",
                                                                                 "_reshape_alias", "empty", "new_empty")):
        if name.startswith(("tanh", "threshold")):  # kernels whose names start like a view op's
            return "memory"
        return "view"
    if name in GEMM_OPS:
        return "gemm"
    if "scaled_dot_product" in name or "flash" in name or "efficient_attention" in name or "cudnn_attention" in name:
        return "attention"
    if "adam" in name or "sgd" in name:
        return "optimizer"
    return "memory"


def _tensors(x: Any) -> list[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


class _Counter:
    """The dispatch mode (built lazily so that importing this module does not import torch)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                outer.record(func, args, kwargs or {}, out)
                return out

        self.mode = Mode()
        self.phase = "fwd"
        self.tallies: dict[str, Tally] = {}

    def record(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        from torch.distributed.tensor import DTensor

        t = self.tallies.setdefault(self.phase, Tally())
        ins = _tensors((args, kwargs))
        kind = _classify(func)
        if kind == "collective":  # a collective launch, or c10d's bookkeeping around one (wait, autograd wrap)
            name = func._schema.name.split("::")[-1]
            t.host["c10d" if name in C10D_HELPERS else "collective"] += 1
            return
        t.host["dtensor" if any(isinstance(x, DTensor) for x in ins) else "plain"] += 1
        if kind != "memory":
            return
        ids = {id(x) for x in ins}
        outs = [o for o in _tensors(out) if id(o) not in ids]

        def nbytes(x: Any) -> int:
            local = x.to_local() if isinstance(x, DTensor) else x
            return int(local.numel() * local.element_size())

        t.ew_bytes += sum(nbytes(x) for x in ins) + sum(nbytes(o) for o in outs)
        t.ew_ops += 1
        t.kernels[func._schema.name.split("::")[-1]] += 1


@contextlib.contextmanager
def _process_group(device: str, tp: int) -> Any:
    """A default process group for DTensor: a fake `tp`-rank group on CPU (collectives issued, no data
    moved), NCCL at world size 1 on a GPU. Torn down after."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    if device == "cpu":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    else:
        import os

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_program(spec: Any, program: str, device: str, tp: int = 2, compiled: bool = False) -> tuple[Any, Any]:
    """(model, loss context factory) of one program: `eager` (plain tensors), `tp` or `tp-sp` (DTensor
    tensor parallelism over the current default group's ranks, with loss_parallel), optionally with each
    block under `torch.compile` as the engine does."""
    import torch

    from workbench.runner.llama import build

    model = build(spec, 0, torch.device(device))
    if program in ("tp", "tp-sp"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from workbench.runner.native import apply_tp

        mesh = init_device_mesh(device, (dist.get_world_size(),))
        apply_tp(model, mesh, program == "tp-sp")
    elif program != "eager":
        raise ValueError(f"program: {program!r} is not one of {', '.join(PROGRAMS)}")
    if compiled:
        for key, block in list(model.layers.items()):
            model.layers[key] = torch.compile(block)  # type: ignore[assignment]

    def loss_ctx() -> Any:
        if program == "eager":
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    return model, loss_ctx


def loss_of(model: Any, x: Any, y: Any) -> Any:
    """The engine's loss (`NativeTrainer._loss`)."""
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def count_step(spec: Any, program: str, device: str = "cpu", mbs: int = 2, autocast: bool = True,
               tp: int = 2) -> dict[str, Tally]:
    """Tallies by phase (fwd, bwd) of one training step (forward, loss, backward) of `spec` run as `program`."""
    import torch

    with _process_group(device, tp) if program != "eager" else contextlib.nullcontext():
        model, loss_ctx = build_program(spec, program, device, tp)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, spec.vocab, (mbs, spec.seq), generator=g).to(device)
        y = torch.randint(0, spec.vocab, (mbs, spec.seq), generator=g).to(device)
        amp = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        c = _Counter()
        with loss_ctx():
            with c.mode:
                c.phase = "fwd"
                with amp:
                    loss = loss_of(model, x, y)
                c.phase = "bwd"
                loss.backward()
        return c.tallies


def per_layer(spec: Any, program: str, device: str = "cpu", mbs: int = 2, autocast: bool = True) -> list[dict[str, Any]]:
    """Rows (program, phase, where = layer | rest, kind, count) plus the memory-bound bytes per layer:
    counted on 1- and 2-layer builds of `spec`, the layer's share is the difference."""
    from dataclasses import replace

    one = count_step(replace(spec, layers=1), program, device, mbs, autocast)
    two = count_step(replace(spec, layers=2), program, device, mbs, autocast)
    rows: list[dict[str, Any]] = []
    for phase in ("fwd", "bwd"):
        a, b = one.get(phase, Tally()), two.get(phase, Tally())
        for kind in ("plain", "dtensor", "collective", "c10d"):
            layer = b.host[kind] - a.host[kind]
            rows.append({"program": program, "phase": phase, "where": "layer", "kind": kind, "count": layer})
            rows.append({"program": program, "phase": phase, "where": "rest", "kind": kind,
                         "count": a.host[kind] - layer})
        rows.append({"program": program, "phase": phase, "where": "layer", "kind": "memory_bytes",
                     "count": b.ew_bytes - a.ew_bytes})
        rows.append({"program": program, "phase": phase, "where": "layer", "kind": "memory_kernels",
                     "count": b.ew_ops - a.ew_ops})
    return rows


# shape variations of the reference for the byte coefficients: each changes one term (the last changes all: a check)
VARIATIONS: tuple[dict[str, int], ...] = (
    {}, {"hidden": 256}, {"ffn": 512}, {"heads": 8}, {"kv_heads": 4}, {"seq": 64}, {"mbs": 4}, {"seq": 48},
    {"hidden": 192, "ffn": 384, "heads": 12, "kv_heads": 6, "seq": 48, "mbs": 3},
)


def spec_name(spec: Any) -> str:
    """A model string that `load_model` reads back to this spec (a `replace`d spec keeps its old name)."""
    return (f"llama3-8b:layers={spec.layers},hidden={spec.hidden},heads={spec.heads},kv_heads={spec.kv_heads},"
            f"head_dim={spec.head_dim},ffn={spec.ffn},vocab={spec.vocab},seq={spec.seq}")


def layer_bytes(program: str, device: str = "cpu", model: str = REFERENCE) -> list[dict[str, Any]]:
    """Per-layer memory-bound bytes (fwd, bwd) of `program` counted at every shape of `VARIATIONS`."""
    from dataclasses import replace

    from workbench.models import load_model

    base = load_model(model)
    rows = []
    for var in VARIATIONS:
        mbs = var.get("mbs", 2)
        spec = replace(base, **{k: v for k, v in var.items() if k != "mbs"})
        one = count_step(replace(spec, layers=1), program, device, mbs)
        two = count_step(replace(spec, layers=2), program, device, mbs)
        for ph in ("fwd", "bwd"):
            rows.append({"program": program, "phase": ph, "model": spec_name(spec), "mbs": mbs,
                         **dict(zip(TERMS, layer_terms(spec, mbs * spec.seq))),
                         "bytes": two[ph].ew_bytes - one[ph].ew_bytes})
    return rows


def solve_coefficients(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Bytes per unit of each term, per (program, phase), solved exactly from the first len(TERMS) shapes
    (a linear system, not a fit: the kernels' sizes are linear in these terms); `residual` is the relative
    error on the remaining shapes (the check)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key in sorted({(r["program"], r["phase"]) for r in rows}):
        rs = [r for r in rows if (r["program"], r["phase"]) == key]
        coef, resid = solve_terms([[float(r[t]) for t in TERMS] for r in rs], [float(r["bytes"]) for r in rs])
        out[key] = {**{t: float(c) for t, c in zip(TERMS, coef)}, "residual": resid}
    return out


def count_table(model: str = REFERENCE, programs: tuple[str, ...] = PROGRAMS) -> Any:
    """The per-layer/rest host op counts of every program on CPU (a DataFrame)."""
    import pandas as pd
    import torch

    from workbench.models import load_model

    spec = load_model(model)
    rows = [r for p in programs for r in per_layer(spec, p)]
    df = pd.DataFrame(rows)
    df = df[~df["kind"].isin(["memory_bytes", "memory_kernels"])].copy()
    df["model"] = model
    df["source"] = (f"counted: python -m workbench.calibration.op_counts --write (TorchDispatchMode over one "
                    f"forward+backward under torch.autocast bf16, CPU, torch {torch.__version__.split('+')[0]}; "
                    "tp/tp-sp on a fake 2-rank process group)")
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--write", default=None, help="also write the table as CSV here")
    ap.add_argument("--model", default=REFERENCE)
    ap.add_argument("--detail", action="store_true", help="also list the memory-bound kernels of one layer")
    args = ap.parse_args(argv)
    df = count_table(args.model)
    print(df.to_string(index=False))
    if args.detail:
        from dataclasses import replace

        from workbench.models import load_model

        spec = load_model(args.model)
        for p in PROGRAMS:
            one = count_step(replace(spec, layers=1), p)
            two = count_step(replace(spec, layers=2), p)
            for ph in ("fwd", "bwd"):
                diff = two[ph].kernels.copy()
                diff.subtract(one[ph].kernels)
                print(p, ph, dict(+diff))
    if args.write:
        df.to_csv(args.write, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
