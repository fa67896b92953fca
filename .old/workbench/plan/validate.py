"""Structural checks of a complete plan against a cluster and a model (memory is checked by the simulator)."""

from __future__ import annotations

from workbench.errors import WorkbenchError
from workbench.models.spec import ModelSpec
from workbench.plan.spec import Plan

MAX_MICRO_BATCHES = 4096  # the schedule is laid out per micro-batch: beyond this a step is not a real plan


def gpus_per_node(cluster: object) -> int:
    nodes = cluster.nodes  # type: ignore[attr-defined]
    return min(n.gpus for n in nodes)


def problem(plan: Plan, world: int, node_gpus: int, model: ModelSpec, precisions: tuple[str, ...] = ()) -> str | None:
    """Why `plan` cannot run (a message naming the field and the fix), or None if it can."""
    if plan.missing:
        return f"plan: fields {', '.join(plan.missing)} are not set (leave them out to let the simulator choose)"
    tp, pp, dp, cp, ep, v = plan.tp, plan.pp, plan.dp, plan.cp, plan.ep, plan.vpp
    assert tp and pp and dp and cp and ep and v and plan.mbs and plan.gbs
    if model.heads % tp:
        return f"plan.tp: {model.heads} attention heads are not divisible by tp={tp}"
    if not model.is_mla and model.kv_heads % tp:
        return f"plan.tp: {model.kv_heads} KV heads (GQA groups) are not divisible by tp={tp}"
    if tp * pp * dp * cp != world:
        return f"plan: tp·pp·dp·cp = {tp}·{pp}·{dp}·{cp} = {tp * pp * dp * cp} but the cluster has {world} GPUs"
    if tp > 1 and node_gpus % tp and tp % node_gpus:
        return f"plan.tp: tp={tp} does not tile the {node_gpus} GPUs of a node (use a divisor or multiple of {node_gpus})"
    if model.layers < pp * v:
        return f"plan.pp: {model.layers} layers cannot fill pp·vpp = {pp * v} pipeline chunks"
    if plan.gbs % (dp * plan.mbs):
        return f"plan.gbs: global batch {plan.gbs} is not divisible by dp·mbs = {dp * plan.mbs}"
    m = plan.gbs // (dp * plan.mbs)
    if m > MAX_MICRO_BATCHES:
        return (f"plan.gbs: {m} micro-batches per pipeline per step (gbs / (dp·mbs)) is more than the "
                f"{MAX_MICRO_BATCHES} the step schedule lays out; raise mbs or dp, or lower gbs")
    if v > 1 and pp == 1:
        return "plan.vpp: interleaving (vpp > 1) needs pp > 1"
    if v > 1 and m % pp:
        return f"plan.vpp: interleaved 1F1B needs micro-batches ({m}) divisible by pp={pp}"
    if model.seq % (2 * cp if cp > 1 else 1):
        return f"plan.cp: seq {model.seq} must be divisible by 2·cp = {2 * cp} (load-balanced causal CP)"
    if plan.sp and tp > 1 and (model.seq // cp * plan.mbs) % tp:
        return f"plan.sp: tokens per micro-batch {model.seq // cp * plan.mbs} not divisible by tp={tp}"
    if ep > 1 and not model.is_moe:
        return f"plan.ep: ep={ep} but {model.name} has no experts (use ep=1)"
    if model.is_moe and model.experts % ep:
        return f"plan.ep: {model.experts} experts are not divisible by ep={ep}"
    if (dp * cp) % ep:
        return f"plan.ep: ep={ep} must divide dp·cp = {dp * cp} (experts are sharded over data-parallel ranks)"
    if plan.precision and precisions and plan.precision not in precisions:
        return f"plan.precision: the GPU has no {plan.precision} rate (supported: {', '.join(precisions)})"
    if plan.offload and plan.recompute == "full":
        return "plan.offload: activation offload with full recomputation stores nothing worth offloading (use one)"
    return None


def check(plan: Plan, world: int, node_gpus: int, model: ModelSpec, precisions: tuple[str, ...] = ()) -> None:
    why = problem(plan, world, node_gpus, model, precisions)
    if why:
        raise WorkbenchError(why)


def split_layers(n: int, parts: int) -> list[int]:
    """Layers per pipeline chunk, as even as possible (the first chunks take the remainder)."""
    if parts < 1 or n < parts:
        raise WorkbenchError(f"plan.pp: {n} layers cannot be split into {parts} chunks")
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
