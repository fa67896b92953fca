"""Calibrate a cluster's compute and link parameters from a measured run (`workbench run train`).

`from_run(cluster, measured)` fits, from the run's own events:

- `fp32_tflops`: the FLOPs of the forward/backward spans over their seconds (median rank);
- `link_GBps`, `link_latency_us`: a least-squares line through (bytes each rank sent, seconds)
  of the collectives and transfers — the lower quartile at each size, so waiting for a late
  peer is not counted as link time — split into per-step and per-hop terms;

and then, when the training simulator is installed, corrects both by the ratio of the
simulated to the measured compute and communication time per step (two passes), so the
next simulation of this machine lands closer. On GPU nodes the catalogue peaks (and memory and
NVLink rates) are the starting point and only the ratio corrections apply; the microbenchmark
fit of a GPU is `from_sweeps` (a GEMM sweep and an nccl-tests sweep measured on the machine).
When the run's collectives run inside its compute spans (the native engine), the simulated
communication is counted with the compute it delays, and the run's sampled comm events (profiler
spans beside the compute, on CPU ranks gloo's spans with the waiting for peers in them) are left
out of the fit: they show where the time went, they are not the link's rate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.result import Result

_HOPS = 2  # a loopback route: rank → host → rank


def fit_compute(measured: Result) -> float | None:
    """Achieved TFLOP/s of the forward and backward spans (median over ranks)."""
    ev = measured.events
    if ev.empty or "flops" not in ev.columns:
        return None
    c = ev[(ev["kind"] == "compute") & (ev["flops"] > 0)]
    if c.empty:
        return None
    per = c.assign(s=c["end"] - c["start"]).groupby("rank").agg(f=("flops", "sum"), s=("s", "sum"))
    return float(np.median(per["f"] / per["s"]) / 1e12)


def fit_links(measured: Result, prior_latency_us: float = 20.0) -> tuple[float, float] | None:
    """(GB/s per direction, latency µs per hop) from the run's collectives and transfers.

    With a single message size the two cannot be told apart: the latency stays at
    `prior_latency_us` per hop and the bandwidth takes the rest of the time.
    """
    from workbench.core.ops import op as op_of

    ev = measured.events
    if ev.empty:
        return None
    comm = ev[ev["kind"].isin(["collective", "transfer"]) & (ev["end"] > ev["start"])]
    if comm.empty:
        return None
    lay = measured.job.layout if measured.job is not None else None
    sizes = {"tp": lay.tp if lay else 2, "dp": lay.dp * lay.cp if lay else 2, "cp": lay.cp if lay else 2, "pp": 2}
    rows = []
    for (op, group, nb), g in comm.groupby(["op", "group", "bytes"]):
        n = int(sizes.get(str(group), 2))
        o = op_of(str(op))
        t = float(np.quantile(g["end"] - g["start"], 0.25))
        wire = float(nb) * o.wire_factor(n) if o.kind == "collective" else float(nb)  # type: ignore[arg-type]
        rows.append((wire, t, o.ring_steps(n)))
    x = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    steps = np.array([r[2] for r in rows])
    if len(rows) >= 2 and np.ptp(x) > 0:
        A = np.stack([steps.astype(float), x], axis=1)
        (lat, inv_bw), *_ = np.linalg.lstsq(A, y, rcond=None)
    else:
        lat = prior_latency_us * 1e-6 * _HOPS
        inv_bw = float(max((y - lat * steps).sum(), y.sum() * 0.5) / max(x.sum(), 1.0))
    if inv_bw <= 0:  # latency-bound data: take the bandwidth from the largest message
        i = int(np.argmax(x))
        inv_bw = max(y[i] - max(lat, 0.0) * steps[i], y[i] * 0.5) / x[i]
    lat = max(float(lat), 1e-6)
    return float(1.0 / inv_bw / 1e9), lat * 1e6 / _HOPS


def _with_specs(cluster: Any, **specs: float) -> Any:
    nodes = []
    for n in cluster.nodes:
        s = dict(n.specs) | {k: float(v) for k, v in specs.items() if v is not None}
        nodes.append(dataclasses.replace(n, specs=tuple(sorted(s.items()))))
    return dataclasses.replace(cluster, nodes=tuple(nodes), name=_calibrated_name(cluster.name))


def _calibrated_name(name: str) -> str:
    return name if name.endswith("(calibrated)") else f"{name} (calibrated)"


def simulate(cluster: Any, measured: Result) -> Result | None:
    """The prediction of the measured run's own job on `cluster` (None when the result has no job)."""
    from workbench.core.engines import simulator

    if measured.job is None:
        return None
    job = measured.job.with_cluster(cluster)
    return simulator(job.kind)(job)  # type: ignore[no-any-return]


def _split(r: Result) -> dict[str, float]:
    """Seconds per step of forward+backward compute, memory-bound parameter work (optimizer and
    gradient packing), and communication."""
    from workbench.comparison import per_step

    t = per_step(r, ("kind", "op"))
    comp = t[t["kind"] == "compute"]
    return {"matmul": float(comp.loc[comp["op"].isin(["forward", "backward"]), "seconds"].sum()),
            "optimizer": float(comp.loc[comp["op"].isin(["optimizer", "grad_copy"]), "seconds"].sum()),
            "comm": float(t.loc[t["kind"].isin(["collective", "transfer"]), "seconds"].sum())}


# which specs each part of the step scales with
_SCALES = {"matmul": ("fp32_tflops", "bf16_tflops", "fp16_tflops"), "optimizer": ("memory_GBps",),
           "comm": ("link_GBps", "nvlink_GBps")}


def comm_inside_compute(measured: Result) -> bool:
    """Whether the run's collectives ran inside its compute spans (PyTorch's own engines)."""
    return measured.metrics.get("engine") == "native"


def _without_comm(measured: Result) -> Result:
    ev = measured.events
    keep = ev[~ev["kind"].isin(["collective", "transfer"])]
    return dataclasses.replace(measured, events=keep)


def from_run(cluster: Any, measured: Result, passes: int = 3) -> Any:
    """`cluster` with CPU-rank specs (fp32_tflops, memory_GBps, link_GBps, link_latency_us) fitted from `measured`."""
    inside = comm_inside_compute(measured)
    if inside:
        measured = _without_comm(measured)
    spec = cluster.nodes[0].gpu_spec
    specs: dict[str, Any] = {}
    if spec.is_cpu:
        tflops = fit_compute(measured)
        links = fit_links(measured, float(dict(cluster.nodes[0].specs).get("link_latency_us", 20.0)))
        if tflops:
            specs["fp32_tflops"] = tflops
            specs["bf16_tflops"] = tflops
        if links:
            specs["link_GBps"], specs["link_latency_us"] = links
    else:  # a GPU's rates are peaks × measured shape curves: start from them and only correct by ratio
        specs = {f"{p}_tflops": v for p, v in spec.peak_tflops if p in ("bf16", "fp16", "fp32")}
        specs |= {"memory_GBps": spec.memory_GBps} | ({"nvlink_GBps": spec.nvlink_GBps} if spec.nvlink_GBps else {})
    out = _with_specs(cluster, **specs)
    meas = _split(measured)
    for _ in range(passes):
        sim = simulate(out, measured)
        if sim is None or sim.events.empty:
            break
        got = _split(sim)
        cur = dict(out.nodes[0].specs)
        fix: dict[str, float] = {}
        if (inside or meas["comm"] == 0) and got["comm"] > 0:  # collectives inside the compute spans:
            bd = sim.metrics.get("breakdown_seconds", {})  # the spans hold what the simulator leaves exposed
            exposed = sum(float(bd.get(k, 0.0)) for k in ("tp_comm", "ep_comm", "cp_comm", "fsdp_comm", "dp_comm"))
            got = got | {"matmul": got["matmul"] + exposed, "comm": 0.0}
        for part, keys in _SCALES.items():
            if got[part] > 0 and meas[part] > 0 and abs(got[part] / meas[part] - 1) > 0.01:
                for k in keys:
                    if k in cur:
                        fix[k] = cur[k] * got[part] / meas[part]
        if not fix:
            break
        out = _with_specs(out, **fix)
    return out


def before_after(cluster: Any, measured: Result) -> dict[str, Any]:
    """Simulated step time before and after calibrating on `measured`, and the errors (%)."""
    from workbench.comparison import step_error_pct

    before = simulate(cluster, measured)
    if before is None:
        return {"sim_step_seconds": None, "sim_error_pct_before": None, "sim_error_pct_after": None,
                "sim_note": "the measured result carries no job to simulate"}
    cal = from_run(cluster, measured)
    after = simulate(cal, measured)
    assert after is not None
    return {"sim_step_seconds": float(before.metrics["step_seconds"]),
            "sim_error_pct_before": step_error_pct(before, measured),
            "sim_step_seconds_after": float(after.metrics["step_seconds"]),
            "sim_error_pct_after": step_error_pct(after, measured),
            "calibrated_specs": dict(cal.nodes[0].specs), "calibrated_cluster": cal}


# ------------------------------------------------------------------ GPU nodes: from microbenchmarks
def _gpu_node(cluster: Any) -> Any:
    node = cluster.nodes[0]
    if node.gpu_spec.is_cpu:
        raise WorkbenchError(f"cluster: {cluster.name} has CPU ranks; calibrate them from a run (from_run)")
    return node


def fit_gemm_sweep(cluster: Any, rows: Any) -> dict[str, float]:
    """`bf16_tflops`/`fp16_tflops` and `memory_GBps` of the cluster's GPU from `benchmarks/gemm_sweep.py` rows.

    The simulator prices a GEMM (and flash attention) as catalogue peak × a measured shape-efficiency
    curve; the fit scales the peak by Σ predicted / Σ measured seconds over the swept GEMM and
    attention rows (time-weighted, so the shapes that take the time decide), and the memory
    bandwidth by the median measured/predicted rate of the elementwise rows.
    """
    import pandas as pd

    from workbench.sim.compute import device_model

    spec = _gpu_node(cluster).gpu_spec
    dm = device_model(spec, "bf16")
    df = pd.DataFrame(rows)
    pred, meas = 0.0, 0.0
    for r in df.itertuples(index=False):
        sec = float(r.seconds)
        if r.op == "gemm" and str(r.dtype) == "bf16":
            p = dm.gemm_seconds(int(r.m), int(r.n), int(r.k))
        elif r.op in ("attn_fwd", "attn_bwd"):
            causal = bool(int(float(r.causal)))
            flops = 4.0 * float(r.batch) * float(r.heads) * float(r.seq) ** 2 * float(r.head_dim) * (0.5 if causal else 1.0)
            bwd = r.op == "attn_bwd"
            p = dm.attention_seconds(2.5 * flops if bwd else flops, int(r.seq), int(r.head_dim), causal, backward=bwd)
        else:
            continue
        pred += p
        meas += sec
    out: dict[str, float] = {}
    if meas > 0:
        scale = pred / meas
        for prec in ("bf16", "fp16"):
            if prec in dict(spec.peak_tflops):
                out[f"{prec}_tflops"] = spec.peak(prec) * scale
    ew = df[df["op"] == "elementwise"]
    if not ew.empty:
        ratios = [float(r.bytes) / float(r.seconds) / 1e9 / (float(r.bytes) / dm.memory_seconds(float(r.bytes)) / 1e9)
                  for r in ew.itertuples(index=False)]
        out["memory_GBps"] = spec.memory_GBps * float(np.median(ratios))
    return out


def predict_nccl(cluster: Any, rows: Any, ranks: int) -> np.ndarray:
    """Simulated seconds of nccl-tests rows (op, size) on `ranks` GPUs of `cluster` (ring all-reduce:
    the sweep and the training runs keep NVLink SHARP off)."""
    from workbench.sim.collectives import collective

    gpus = cluster.gpus[:ranks]
    return np.array([collective(cluster, str(r.op), int(r.size), gpus, "ring" if r.op != "all_to_all" else None).seconds
                     for r in rows.itertuples(index=False)])


def fit_nccl_sweep(cluster: Any, rows: Any, ranks: int, min_bytes: int = 1024) -> dict[str, float]:
    """`nvlink_GBps` (per GPU, both directions, as the catalogue) and `nvlink_latency_us` (per hop) of
    the cluster's GPU node from nccl-tests rows (`parse_nccl_tests`: op, size, time_us), by least
    squares on the log of the times of every row of at least `min_bytes`."""
    from workbench.calibration.fit import nelder_mead

    node = _gpu_node(cluster)
    if node.intra != "nvswitch":
        raise WorkbenchError(f"cluster: {cluster.name} joins its GPUs by {node.intra}; only NVLink/NVSwitch links are fitted")
    spec = node.gpu_spec
    data = rows[(rows["size"] >= min_bytes) & rows["op"].isin(["all_reduce", "all_gather", "reduce_scatter"])]
    if data.empty:
        raise WorkbenchError(f"rows: no all_reduce/all_gather/reduce_scatter rows of at least {min_bytes} bytes to fit")
    meas = data["time_us"].to_numpy(float) * 1e-6
    from workbench.topology.catalogue import node_link

    lat0 = float(node_link("nvswitch", spec.nvlink_gen)[1])

    def candidate(x: np.ndarray) -> Any:
        return _with_node_specs(cluster, nvlink_GBps=float(np.exp(x[0])), nvlink_latency_us=float(np.exp(x[1])))

    def loss(x: np.ndarray) -> float:
        return float((np.log(predict_nccl(candidate(x), data, ranks) / meas) ** 2).sum())

    x = nelder_mead(loss, [np.log(spec.nvlink_GBps), np.log(max(lat0, 0.1))], step=0.5, iters=200, tol=1e-8)
    return {"nvlink_GBps": float(np.exp(x[0])), "nvlink_latency_us": float(np.exp(x[1]))}


def _with_node_specs(cluster: Any, **specs: float) -> Any:
    nodes = tuple(dataclasses.replace(n, specs=tuple(sorted((dict(n.specs) | specs).items()))) for n in cluster.nodes)
    return dataclasses.replace(cluster, nodes=nodes)


def from_sweeps(cluster: Any, gemm: Any = None, nccl: Any = None, ranks: int | None = None) -> Any:
    """`cluster` with its GPU's compute peak, memory bandwidth and NVLink rate/latency fitted from a GEMM
    sweep (`benchmarks/gemm_sweep.py` CSV rows) and an nccl-tests sweep (`benchmarks/nccl_sweep.py`
    output, parsed) measured on that machine; either may be None."""
    specs: dict[str, float] = {}
    if gemm is not None:
        specs |= fit_gemm_sweep(cluster, gemm)
    if nccl is not None and len(nccl):
        specs |= fit_nccl_sweep(cluster, nccl, ranks or cluster.num_gpus)
    out = _with_node_specs(cluster, **specs)
    return dataclasses.replace(out, name=_calibrated_name(cluster.name))
