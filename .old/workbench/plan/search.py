"""Plan search: enumerate every plan for (cluster, model, global batch), evaluate each, rank them.

`search_plans(cluster, model, gbs)` returns a pandas DataFrame with one row per candidate: the
plan's fields, its metrics (for plans that fit), `fits`, `valid` and, for the rejected, `reason`.
Valid plans that fit come first, fastest first. Fields given in `fixed` are not varied.
Precision is never chosen for you (default bf16): it changes the numerics, not just the speed;
nor is the software stack (default `modern`).

Plausibility guard: a plan whose predicted MFU exceeds the best measured in public results for
that GPU and precision (`datasets/validation/training_mfu_best.csv`) by more than `MFU_MARGIN` is
marked `plausible=False` and ranked after every plausible plan, with the reason in `reason`; every
row carries `flags`, the model's known uncertainties for that plan (extrapolated curves, assumed
balance, curves borrowed from another GPU).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any, cast

from workbench.errors import WorkbenchError
from workbench.plan.spec import Plan

GRID: dict[str, tuple[Any, ...]] = {
    "cp": (1, 2, 4, 8),
    "vpp": (1, 2, 4),
    "mbs": (1, 2, 4, 8),
    "zero": (0, 1, 2, 3),
    "recompute": ("none", "selective", "full"),
    "offload": (False, True),
}
MFU_MARGIN = 0.05  # "a few points" above the best public measurement
COLUMNS = ("tp", "pp", "dp", "ep", "cp", "sp", "vpp", "zero", "recompute", "mbs", "gbs", "precision", "offload",
           "stack")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(world: int, node_gpus: int, model: Any, gbs: int, fixed: dict[str, Any] | None = None,
               grid: dict[str, tuple[Any, ...]] | None = None) -> Iterator[Plan]:
    """Every combination of the plan fields (structurally invalid ones included: the caller rejects them)."""
    fixed = dict(fixed or {})
    g = {**GRID, **(grid or {})}

    def opts(name: str, values: Any) -> list[Any]:
        return [fixed[name]] if name in fixed else list(values)

    tps = opts("tp", [d for d in _divisors(node_gpus) if model.heads % d == 0])
    for tp in tps:
        for cp in opts("cp", [c for c in g["cp"] if world % (tp * c) == 0]):
            rest = world // (tp * cp) if world % (tp * cp) == 0 else 0
            if not rest:
                continue
            pps = opts("pp", [p for p in _divisors(rest) if p <= model.layers])
            for pp in pps:
                if rest % pp:
                    continue
                dp = rest // pp
                if "dp" in fixed and fixed["dp"] != dp:
                    continue
                eps = opts("ep", [e for e in _divisors(dp * cp) if model.experts % e == 0] if model.is_moe else [1])
                vpps = opts("vpp", [v for v in g["vpp"] if v == 1 or pp > 1])
                for ep, vpp, mbs, zero, rc, off in itertools.product(
                        eps, vpps, opts("mbs", g["mbs"]), opts("zero", g["zero"]), opts("recompute", g["recompute"]),
                        opts("offload", g["offload"])):
                    if off and rc == "full":
                        continue
                    yield Plan(tp=tp, pp=pp, dp=dp, ep=ep, cp=cp, sp=fixed.get("sp", tp > 1), vpp=vpp, zero=zero,
                               recompute=rc, mbs=mbs, gbs=gbs, precision=fixed.get("precision", "bf16"), offload=off,
                               stack=fixed.get("stack", "modern"))


def search_plans(cluster: Any, gbs: int, model: Any = None, *, fixed: dict[str, Any] | None = None,
                 top: int | None = None, grid: dict[str, tuple[Any, ...]] | None = None,
                 include_rejected: bool = True, workers: int = 1) -> Any:
    """Evaluate every candidate plan; a DataFrame ranked by tokens/s (valid and fitting first).

    `cluster` may be a `TrainContext` (then `model` is taken from it). `df.attrs` holds
    `evaluated`, `valid`, `fitting`, `seconds` and `plans_per_s`. `workers` > 1 splits the
    candidates over that many forked processes (Linux; searches of 2000+ candidates).
    """
    import numpy as np
    import pandas as pd

    from workbench.models.presets import load_model
    from workbench.sim.train import TrainContext
    from workbench.topology.presets import load_cluster

    if gbs < 1:
        raise WorkbenchError(f"gbs: must be at least 1, got {gbs}")
    ctx = cluster if isinstance(cluster, TrainContext) else TrainContext(load_cluster(cluster), load_model(model))
    t0 = time.perf_counter()
    if ctx.is_cpu:
        grid = {**(grid or {}), "offload": (False,)}
    plans = list(candidates(ctx.world, ctx.node_gpus, ctx.model, gbs, fixed, grid))
    n = len(plans)
    if workers > 1 and n >= 2000:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        global _WORK
        _WORK = (ctx, plans, include_rejected)
        bounds = [(i * n // workers, (i + 1) * n // workers) for i in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            rows = [r for part in ex.map(_evaluate_slice, bounds) for r in part]
        _WORK = None
    else:
        rows = _evaluate_plans(ctx, plans, include_rejected)
    seconds = time.perf_counter() - t0
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=[*COLUMNS, "valid", "fits", "reason"])
    for col in ("step_seconds", "tokens_per_s", "tflops_per_gpu", "mfu", "memory_GiB"):
        if col not in df.columns:
            df[col] = float("nan")
    if "plausible" not in df.columns:
        df["plausible"] = True
    if "flags" not in df.columns:
        df["flags"] = ""
    df["_ok"] = df["valid"].astype(bool) & df["fits"].astype(bool)
    df["_sane"] = df["plausible"].fillna(True).astype(bool)
    # ties within 0.1 % go to the simpler plan (less sharding of state, no recompute/offload/interleave)
    df["_speed"] = (np.log(df["tokens_per_s"].astype(float)) / np.log(1.001)).round()
    df["_simple"] = (df["zero"].astype(int) + df["recompute"].map({"none": 0, "selective": 1, "full": 2}).fillna(0)
                     + df["offload"].astype(int) * 2 + (df["vpp"].astype(int) > 1) + (df["cp"].astype(int) > 1))
    df = df.sort_values(["_ok", "_sane", "_speed", "_simple", "memory_GiB"], ascending=[False, False, False, True, True],
                        kind="stable")
    df = df.drop(columns=["_ok", "_sane", "_speed", "_simple"]).reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    attrs = {"evaluated": n, "valid": int(df["valid"].sum()), "fitting": int((df["valid"] & df["fits"]).sum()),
             "implausible": int((df["valid"] & df["fits"] & ~df["plausible"].fillna(True).astype(bool)).sum()),
             "rejected": int(n - (df["valid"] & df["fits"]).sum()), "seconds": seconds,
             "plans_per_s": n / seconds if seconds > 0 else float("inf")}
    if top is not None:
        df = df.head(top)
    df.attrs.update(attrs)
    return df


_WORK: Any = None  # (ctx, plans, include_rejected) shared with forked workers


def _evaluate_slice(bounds: tuple[int, int]) -> list[dict[str, Any]]:
    ctx, plans, include_rejected = _WORK
    return _evaluate_plans(ctx, plans[bounds[0]:bounds[1]], include_rejected)


def _evaluate_plans(ctx: Any, plans: list[Plan], include_rejected: bool) -> list[dict[str, Any]]:
    """One row per plan: its fields, validity, fit, reason and (for plans that fit) metrics."""
    from workbench.plan.validate import problem
    from workbench.sim.train import TrainEstimate, evaluate

    precisions = ctx.precisions()
    nan = float("nan")
    rows: list[dict[str, Any]] = []
    ceiling = mfu_ceiling(ctx)
    flag_cache: dict[tuple[Any, ...], str] = {}
    for plan in plans:
        why = problem(plan, ctx.world, ctx.node_gpus, ctx.model, precisions)
        row: dict[str, Any] = {k: getattr(plan, k) for k in COLUMNS}
        if why:
            if include_rejected:
                rows.append({**row, "valid": False, "fits": False, "reason": why})
            continue
        try:
            est = cast(TrainEstimate, evaluate(ctx, None, plan, skip_unfit=True))
        except WorkbenchError as exc:
            if include_rejected:
                rows.append({**row, "valid": False, "fits": False, "reason": str(exc)})
            continue
        mem = sum(est.memory.values()) / 1024**3
        reason = "" if est.fits else f"does not fit: {mem:.1f} GiB per GPU > {est.capacity / 1024**3:.1f} GiB"
        if not est.fits and not include_rejected:
            continue
        fkey = (plan.precision, plan.stack, plan.cp, plan.mbs)
        flags = flag_cache.get(fkey)
        if flags is None:
            flags = flag_cache[fkey] = "; ".join(plan_uncertainty(ctx, est.plan))
        plausible = True
        limit = ceiling.get(str(plan.precision))
        if est.fits and limit is not None and est.mfu > limit[0] + MFU_MARGIN:
            plausible = False
            reason = (f"implausible: predicted MFU {100 * est.mfu:.1f} % exceeds the best public measurement on "
                      f"{ctx.spec_of(0).model} ({100 * limit[0]:.1f} %, {limit[1]}) by more than "
                      f"{100 * MFU_MARGIN:.0f} points")
        rows.append({**row, "valid": True, "fits": est.fits, "plausible": plausible, "flags": flags, "reason": reason,
                     "step_seconds": est.step_seconds, "tokens_per_s": est.tokens_per_s,
                     "tflops_per_gpu": est.tflops_per_gpu, "mfu": est.mfu, "memory_GiB": mem,
                     "bubble_s": est.breakdown.get("pipeline_bubble", nan),
                     "tp_comm_s": est.breakdown.get("tp_comm", nan), "dp_comm_s": est.breakdown.get("dp_comm", nan)})
    return rows


def mfu_ceiling(ctx: Any) -> dict[str, tuple[float, str]]:
    """precision → (best public MFU, its source) for the cluster's GPU (first node's); empty if none is recorded."""
    from workbench.data import read_csv

    if ctx.is_cpu:
        return {}
    df = read_csv("validation/training_mfu_best.csv")
    d = df[df["gpu"] == ctx.spec_of(0).model]
    return {str(r.precision): (float(r.best_mfu), str(r.source)) for r in d.itertuples()}


def plan_uncertainty(ctx: Any, plan: Plan) -> list[str]:
    """What the model is unsure of for this plan: curves borrowed from another GPU, extrapolated attention,
    unmeasured interference, assumed expert balance, closed-form schedules."""
    from workbench.sim.compute import device_model, interference_slowdown
    from workbench.sim.train_stack import load_stack

    out: list[str] = []
    spec = ctx.spec_of(0)
    if spec.is_cpu:
        return out
    prec = str(plan.precision or "bf16")
    dm = device_model(spec, prec)
    if dm.basis != "measured":
        out.append(f"GEMM curve for {spec.model} {prec}: {dm.basis}")
    if dm.sustained_basis != "measured":
        out.append(f"sustained (power-limited) clocks for {spec.model}: {dm.sustained_basis}")
    st = load_stack(plan.stack)
    m = ctx.model
    seq = m.seq if (st.cp_exchange == "all_gather" or (plan.cp or 1) == 1) else m.seq // (plan.cp or 1)
    if seq > dm.attention_max_seq():
        out.append(f"attention at seq {seq} beyond the measured {int(dm.attention_max_seq())} (clamped)")
    slow, basis = interference_slowdown(spec.model)
    if basis != "measured" and st.comm_sm_fraction is None:
        out.append(f"comm/compute interference: {basis}")
    if m.is_moe and st.expert_imbalance == 1.0:
        out.append("MoE routing assumed balanced")
    if st.schedule == "dualpipe":
        out.append("DualPipe bubble in closed form (DeepSeek-V3 Table 2)")
    if st.attention_efficiency_cap is not None:
        out.append(f"attention kernel capped at {st.attention_efficiency_cap:.0%} of peak (stack {st.name})")
    return out


def resolve_plan(ctx: Any, plan: Plan | str | dict[str, Any]) -> Plan:
    """Fill a partial plan's missing fields with the fastest valid choice that fits (search over them)."""
    from workbench.plan.spec import parse_plan
    from workbench.plan.validate import problem
    from workbench.sim.train import _fill_defaults

    plan = parse_plan(plan).with_defaults(precision="bf16", stack="modern")
    if not ctx.model.is_moe:
        plan = plan.with_defaults(ep=1)
    if plan.sp is None and plan.tp is not None:
        plan = plan.with_defaults(sp=plan.tp > 1)
    if plan.complete:
        return plan
    fixed = {k: x for k, x in plan.to_dict().items() if x is not None}
    if "gbs" not in fixed:
        raise WorkbenchError("plan.gbs: give the global batch (gbs=...) — the simulator chooses the rest")
    df = search_plans(ctx, int(fixed["gbs"]), fixed=fixed)
    if df.empty or not bool(df.iloc[0]["valid"]):
        tp, pp, cp = plan.tp or 1, plan.pp or 1, plan.cp or 1
        guess = plan.with_defaults(tp=tp, pp=pp, cp=cp, dp=max(ctx.world // (tp * pp * cp), 1))
        why = problem(_fill_defaults(guess), ctx.world, ctx.node_gpus, ctx.model, ctx.precisions())
        if why:
            raise WorkbenchError(why)
    if df.empty or not bool(df.iloc[0]["fits"]):
        need = df.loc[df["valid"].astype(bool), "memory_GiB"].min() if not df.empty else float("nan")
        raise WorkbenchError(f"plan: no valid plan with {plan} fits on {ctx.cluster.name} "
                             f"({int(df.attrs.get('rejected', 0))} candidates rejected; the leanest needs "
                             f"{need:.1f} GiB per GPU); loosen the fixed fields or add GPUs")
    return Plan(**{k: (df.iloc[0][k].item() if hasattr(df.iloc[0][k], "item") else df.iloc[0][k])
                   for k in plan.to_dict()})


def resolve_job(job: Any) -> Any:
    """The training `Job` with its plan completed by the search (unchanged when already complete)."""
    from dataclasses import replace

    from workbench.sim.train import TrainContext

    return replace(job, plan=resolve_plan(TrainContext(job.cluster, job.model), job.plan))


def estimate_train(cluster: Any, model: Any, plan: Plan | str | dict[str, Any]) -> Any:
    """The metrics of a simulated training step without building events (a partial plan is completed first)."""
    from workbench.models.presets import load_model
    from workbench.sim.train import TrainContext, evaluate
    from workbench.topology.presets import load_cluster

    ctx = TrainContext(load_cluster(cluster), load_model(model))
    return evaluate(ctx, None, resolve_plan(ctx, plan))


def simulate_train(cluster: Any, model: Any, plan: Plan | str | dict[str, Any]) -> Any:
    """Simulate one training step (a partial plan is completed by the search first); a `Result`."""
    from workbench.core.job import Job
    from workbench.sim.train import simulate_job

    return simulate_job(resolve_job(Job.create(cluster, model, plan)))


def search_job(job: Any, *, top: int | None = None, **kwargs: Any) -> Any:
    """Search the plans of a training `Job`: its plan's set fields stay fixed, `gbs` must be set."""
    from workbench.sim.train import TrainContext

    fixed = {k: v for k, v in job.plan.to_dict().items() if v is not None}
    if "gbs" not in fixed:
        raise WorkbenchError("plan.gbs: give the global batch (gbs=...) — the search chooses the rest")
    return search_plans(TrainContext(job.cluster, job.model), int(fixed["gbs"]), fixed=fixed, top=top, **kwargs)
