"""Host dispatch and eager elementwise kernels of PyTorch's own engines (stacks with `host` / `elementwise: eager`).

**Host dispatch.** Eager PyTorch issues one aten op at a time from Python: each costs host time (the
module call, autograd recording, the dispatcher, the kernel launch), and a DTensor op first runs DTensor's
sharding propagation. The CPU runs ahead of the GPU until something synchronises (the native engine syncs
once per step, at its end), so a step lasts max over k of (host time to issue the first k segments + GPU
time of the rest): the GPU's critical path when the host keeps ahead, the host's time when it does not.

- op counts per layer and for the rest of the model (embedding, final norm, LM head, loss), forward and
  backward, plain / DTensor: counted from the native model on CUDA by `workbench.calibration.op_counts` (a
  TorchDispatchMode), recorded in `datasets/host_dispatch_measured.csv`; the NCCL launches among c10d's ops
  counted by the same counter on CPU (they match the collectives the profiler saw in the real tp=2 step);
- seconds per op: measured on the H200 machine on a launch-bound tiny model (`benchmarks/host_dispatch.py`):
  Δ host seconds / Δ ops between a 2- and a 6-layer build; a DTensor op's cost is what is left after the plain
  ops are charged at the eager cost; a compiled block (`torch.compile`) costs its measured seconds per call;
  a real NCCL call costs its measured host time beyond the fake group's (the tiny runs used a fake group).
  The mean of the recorded runs (each a fresh machine) is used; the runs differ by up to ~1.5× (host speed).

**Eager elementwise.** Without the compiler every RMSNorm, RoPE, SwiGLU, residual add and autocast cast is
its own kernel over HBM. The bytes a layer's memory-bound kernels move are linear in tokens × widths;
their coefficients are solved exactly from the bytes counted on CUDA at several shapes (`layer_bytes` rows;
the autocast weight-cast term is left out: `param_cast` prices it). They run at the bandwidth measured for
those kernels on the validated model's layer (CUDA events per op), relative to the device's elementwise curve.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from workbench.errors import WorkbenchError

FILE = "host_dispatch_measured.csv"
KINDS = ("plain", "dtensor", "collective")  # collective: NCCL launches (c10d's waits and wraps cost as DTensor's)
UNITS = {"plain": "plain", "dtensor": "dtensor", "collective": "collective_launch"}
TERMS = ("T*hidden", "T*q", "T*kv", "T*ffn", "T", "params", "seq*head_dim", "T*seq")


@dataclass(frozen=True)
class HostCosts:
    """Host seconds per op (forward, backward) measured on one GPU model's host."""

    gpu: str
    plain: tuple[float, float]
    dtensor: dict[str, tuple[float, float]]  # by program: tp, tp-sp
    region: dict[str, tuple[float, float]]  # compiled block call: eager, tp-sp
    collective: float  # a real NCCL call's host seconds beyond the fake group's
    basis: str


@cache
def _rows() -> Any:
    from workbench.data import read_csv

    return read_csv(FILE)


def _per_layer(df: Any, measure: str, program: str, phase: str, unit: str | None = None) -> tuple[float, float]:
    """(per-layer value, 2-layer value) of a measure, the mean over runs of (v(6) − v(2)) / 4."""
    d = df[(df["measure"] == measure) & (df["program"] == program) & (df["phase"] == phase)]
    if unit is not None:
        d = d[d["unit"] == unit]
    per, base = [], []
    for _, g in d.groupby("run"):
        by = {int(r.layers): float(r.value) for r in g.itertuples()}
        if 2 in by and 6 in by:
            per.append((by[6] - by[2]) / 4.0)
            base.append(by[2])
    if not per:
        raise WorkbenchError(f"datasets/{FILE}: no {measure} rows of program {program!r} ({phase}) at 2 and 6 layers")
    return sum(per) / len(per), sum(base) / len(base)


@cache
def op_counts(program: str) -> dict[tuple[str, str, str], float]:
    """{(phase, where = layer | rest, kind): ops per micro-batch} of `program` (eager | tp | tp-sp), counted on
    CUDA from the native model (the 2- and 6-layer builds of the host benchmark)."""
    df = _rows()
    df = df[df["measure"] == "ops"]
    out: dict[tuple[str, str, str], float] = {}
    for phase in ("fwd", "bwd"):
        for kind in KINDS:
            if df[(df["program"] == program) & (df["unit"] == UNITS[kind])].empty:
                layer, two = 0.0, 0.0
            else:
                layer, two = _per_layer(df, "ops", program, phase, UNITS[kind])
            out[(phase, "layer", kind)] = layer
            out[(phase, "rest", kind)] = max(two - 2 * layer, 0.0)
    return out


@cache
def host_costs(gpu_model: str) -> HostCosts:
    """Per-op host seconds on `gpu_model`'s host; a GPU without rows uses the measured one's (basis says so)."""
    df = _rows()
    mine = df[df["gpu"] == gpu_model]
    basis = "measured"
    if mine.empty:
        mine, basis = df, f"assumption: measured on the host of {', '.join(sorted(set(df['gpu'])))}"

    def cost(program: str, phase: str) -> tuple[float, dict[str, float]]:
        h, _ = _per_layer(mine, "host_s", program, phase)
        ops = mine[mine["measure"] == "ops"]
        n = {k: _per_layer(ops, "ops", program, phase, k)[0]
             if not ops[(ops["program"] == program) & (ops["unit"] == k)].empty else 0.0 for k in ("plain", "dtensor")}
        return h, n

    plain = []
    for ph in ("fwd", "bwd"):
        h, n = cost("eager", ph)
        plain.append(h / n["plain"])
    dtensor = {}
    for prog in ("tp", "tp-sp"):
        vals = []
        for i, ph in enumerate(("fwd", "bwd")):
            h, n = cost(prog, ph)
            # what is left after the plain ops: DTensor's ops with the c10d calls they make (on the fake group)
            vals.append(max(h - n["plain"] * plain[i], 0.0) / max(n["dtensor"], 1.0))
        dtensor[prog] = (vals[0], vals[1])
    region = {}
    for prog, name in (("eager", "compiled"), ("tp-sp", "compiled-tp-sp")):
        region[prog] = (_per_layer(mine, "host_s", name, "fwd")[0], _per_layer(mine, "host_s", name, "bwd")[0])
    c = mine[mine["measure"] == "collective_host_s"]
    real = c[~c["program"].str.endswith("-fake2")]["value"].astype(float)
    fake = c[c["program"].str.endswith("-fake2")]["value"].astype(float)
    extra = max(float(real.mean()) - float(fake.mean()), 0.0) if len(real) and len(fake) else 0.0
    return HostCosts(gpu_model, (plain[0], plain[1]), dtensor, region, extra, basis)


def program_of(tp: int, sp: bool) -> str:
    return "eager" if tp <= 1 else ("tp-sp" if sp else "tp")


def host_seconds(costs: HostCosts, mode: str, tp: int, sp: bool, layers: int, rest: bool) -> tuple[float, float]:
    """(forward, backward) host seconds per micro-batch of a virtual stage holding `layers` layers (and, with
    `rest`, the embedding, final norm, LM head and loss) under `mode` = eager | compiled."""
    prog = program_of(tp, sp)
    n = op_counts(prog)
    out = []
    for i, ph in enumerate(("fwd", "bwd")):
        per_op = {"plain": costs.plain[i], "dtensor": costs.dtensor.get(prog, (0.0, 0.0))[i],
                  "collective": costs.collective}
        if mode == "compiled":
            region = costs.region["tp-sp" if tp > 1 else "eager"][i]
            layer = region + n[(ph, "layer", "collective")] * costs.collective
        else:
            layer = sum(n[(ph, "layer", k)] * per_op[k] for k in KINDS)
        t = layers * layer
        if rest:
            t += sum(n[(ph, "rest", k)] * per_op[k] for k in KINDS)
        out.append(t)
    return out[0], out[1]


def host_bound(segments: list[tuple[float, float]]) -> float:
    """Seconds until the GPU finishes a sequence of (host seconds to issue, GPU seconds) segments when the host
    runs ahead of the GPU without waiting: max over k of (host time of segments before k + GPU time from k on)
    (each segment's work spread evenly, so the maximum falls on a boundary)."""
    best = h = 0.0
    g_left = sum(g for _, g in segments)
    for hs, gs in segments:
        best = max(best, h + g_left)
        h += hs
        g_left -= gs
    return max(best, h)


# ------------------------------------------------------------------ eager elementwise kernels
def layer_terms(m: Any, tokens: float) -> list[float]:
    """The quantities (`TERMS`) a layer's memory-bound bytes are linear in: tokens × widths (q = heads·head_dim,
    kv = kv_heads·head_dim), tokens, the layer's parameters (autocast's weight casts), seq × head_dim (the RoPE
    tables' casts) and tokens × seq (an attention path that materialises the scores; 0 with flash attention)."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    params = m.hidden * (2 * q + 2 * kv) + (3 if m.gated else 2) * m.hidden * m.ffn + 2 * m.hidden
    return [tokens * m.hidden, tokens * q, tokens * kv, tokens * m.ffn, tokens, float(params), m.seq * m.head_dim,
            tokens * m.seq]


def solve_terms(a: Any, b: Any) -> tuple[Any, float]:
    """Bytes per unit of each term, solved exactly from the first len(TERMS) shapes (the kernels' sizes are
    linear in the terms: a linear system, not a fit), and the largest relative error on the other shapes."""
    import numpy as np

    a, b, n = np.asarray(a, dtype=float), np.asarray(b, dtype=float), len(TERMS)
    coef = np.linalg.solve(a[:n], b[:n])
    resid = float(np.max(np.abs(a[n:] @ coef - b[n:]) / np.maximum(b[n:], 1.0))) if len(b) > n else float("nan")
    return coef, resid


@cache
def byte_coefficients(program: str) -> dict[str, tuple[float, ...]]:
    """{phase: bytes per unit of each of `TERMS`} of one layer's memory-bound kernels, solved from the
    `layer_bytes` rows (counted on CUDA); the weight-cast term (`params`) is kept but not used."""
    from workbench.models import load_model

    df = _rows()
    d = df[(df["measure"] == "layer_bytes") & (df["program"] == program)]
    if d.empty:
        raise WorkbenchError(f"datasets/{FILE}: no layer_bytes rows for program {program!r}")
    out = {}
    for phase in ("fwd", "bwd"):
        rows = list(d[d["phase"] == phase].itertuples())
        a = [layer_terms(m, float(r.mbs) * m.seq) for r in rows for m in [load_model(str(r.model))]]
        coef, _ = solve_terms(a, [float(r.value) for r in rows])
        out[phase] = tuple(float(x) for x in coef)
    return out


def eager_layer_bytes(m: Any, tp: int, sp: bool, tokens: float) -> tuple[float, float]:
    """(forward, backward) bytes of one layer's eager memory-bound kernels on one rank (weight casts excluded),
    for `tokens` tokens of the micro-batch (before sequence sharding). Counted at tp = 1 and 2; at other
    degrees the tp=2 bytes scale by 2/tp (an assumption)."""
    prog = program_of(tp, sp)
    co = byte_coefficients(prog)
    x = layer_terms(m, tokens)
    x[TERMS.index("params")] = 0.0  # the weight casts: `param_cast` prices them
    scale = 1.0 if tp <= 2 else 2.0 / tp
    f = sum(c * v for c, v in zip(co["fwd"], x)) * scale
    b = sum(c * v for c, v in zip(co["bwd"], x)) * scale
    return max(f, 0.0), max(b, 0.0)


@cache
def eager_bandwidth(gpu_model: str) -> tuple[float, float, str, str]:
    """(measured bytes/s of the eager elementwise kernels of one layer, bytes per kernel, the GPU measured, basis),
    from the `ew_*`
    rows (the 2-layer minus the 1-layer build, eager program, mean over runs)."""
    df = _rows()
    mine = df[(df["gpu"] == gpu_model) & (df["program"] == "eager")]
    basis = "measured"
    if mine.empty or mine[mine["measure"] == "ew_bytes"].empty:
        mine, basis = df[df["program"] == "eager"], "assumption: measured on another GPU"
    measured_on = str(mine["gpu"].iloc[0])
    rates, per_op = [], []
    for _, g in mine.groupby("run"):
        v = {(r.measure, r.phase, int(r.layers)): float(r.value) for r in g.itertuples() if str(r.measure).startswith("ew_")}
        if not v:
            continue
        by = sum(v[("ew_bytes", p, 2)] - v[("ew_bytes", p, 1)] for p in ("fwd", "bwd"))
        s = sum(v[("ew_gpu_s", p, 2)] - v[("ew_gpu_s", p, 1)] for p in ("fwd", "bwd"))
        ops = sum(v[("ew_ops", p, 2)] - v[("ew_ops", p, 1)] for p in ("fwd", "bwd"))
        rates.append(by / s)
        per_op.append(by / ops)
    if not rates:
        raise WorkbenchError(f"datasets/{FILE}: no ew_* rows to take the eager elementwise bandwidth from")
    return sum(rates) / len(rates), sum(per_op) / len(per_op), measured_on, basis


def eager_seconds(dm: Any, nbytes: float) -> float:
    """Seconds of eager memory-bound kernels moving `nbytes` on device model `dm`: the device's elementwise curve
    slowed by the measured ratio (eager kernels' bandwidth / the curve's on the GPU they were measured on)."""
    if nbytes <= 0:
        return 0.0
    if dm.spec.is_cpu:
        return float(dm.memory_seconds(nbytes))
    rate, per_op, measured_on, _ = eager_bandwidth(dm.spec.model)
    ratio = _eager_ratio(measured_on, rate, per_op)
    return float(dm.memory_seconds(nbytes, per_op)) / ratio


@cache
def _eager_ratio(gpu_model: str, rate: float, per_op: float) -> float:
    from workbench.sim.compute import device_model
    from workbench.topology.catalogue import gpu

    dm = device_model(gpu(gpu_model), "bf16")
    curve = per_op / dm.memory_seconds(per_op, per_op)  # the curve's bytes/s at that kernel size (catalogue GPU)
    return min(rate / curve, 1.0)
