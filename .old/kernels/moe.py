"""MoE dispatch and combine: the buffers a one-sided write per peer needs.

Flow for `R` ranks, `E` experts (expert e lives on rank e // (E / R)), top-k routing:

1. sender: `plan_dispatch(topk_ids, E, R)`; `dispatch_pack(x, plan)` gives one contiguous
   send buffer, rank r's rows at `send_offsets[r]:send_offsets[r+1]`. A token goes to a rank
   once even when several of its k experts live there. `topk_ids[plan.send_src]` travels
   with the rows as metadata.
2. receiver: rows from every source, concatenated in source order, with their ids:
   `plan_experts(recv_ids, recv_counts, rank, E, R)`; `unpack(recv, eplan)` gives rows in
   per-expert order (`expert_offsets`), one row per (token, local expert) pair.
3. the experts run; `combine_pack(expert_y, eplan)` lays their outputs back per source
   (`return_offsets`), each source's pairs in (token, k) order.
4. sender: the returned rows, concatenated in rank order, go through
   `combine(ret, plan, topk_weights)`: out[t] = sum_k w[t, k] * y(t, k), in fp32.

Every plan is computed from ids alone with array ops (numpy, or CuPy for GPU ids); the row
moves run on numba (CPU) or CuPy (GPU). `*_reference` functions are plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels._arrays import is_gpu, xp_of
from kernels.blocks import gather_rows
from kernels.errors import KernelInputError


@dataclass(frozen=True)
class DispatchPlan:
    """Sender-side layout. Arrays are int64 (numpy or CuPy, like the ids)."""

    num_tokens: int
    top_k: int
    num_experts: int
    num_ranks: int
    send_src: Any  # (S,) token of each send row; rows grouped by destination rank, tokens ascending
    send_counts: Any  # (R,)
    send_offsets: Any  # (R + 1,)
    combine_index: Any  # (T, K) row of (t, k) in the returned buffer, -1 where ids < 0
    return_counts: Any  # (R,) returned rows expected from each rank
    return_offsets: Any  # (R + 1,)
    return_rows: int  # rows of the returned buffer (no device sync to read it)


@dataclass(frozen=True)
class ExpertPlan:
    """Receiver-side layout for one rank's local experts."""

    rank: int
    experts_per_rank: int
    expert_src: Any  # (M,) received row for each expert-ordered row
    expert_counts: Any  # (L,) rows per local expert (may be 0)
    expert_offsets: Any  # (L + 1,)
    return_src: Any  # (M,) expert-ordered row for each returned row
    return_counts: Any  # (sources,) rows returned to each source
    return_offsets: Any  # (sources + 1,)


def _experts_per_rank(num_experts: int, num_ranks: int) -> int:
    if num_ranks < 1:
        raise KernelInputError(f"num_ranks: must be >= 1, got {num_ranks}")
    if num_experts < 1 or num_experts % num_ranks:
        raise KernelInputError(
            f"num_experts: must be a positive multiple of num_ranks ({num_ranks}), got {num_experts}"
        )
    return num_experts // num_ranks


def _check_ids(name: str, ids: Any, num_experts: int) -> Any:
    xp = xp_of(ids)
    ids = xp.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise KernelInputError(f"{name}: must be a 2-D integer array (tokens, k), got {ids.ndim}-D {ids.dtype}")
    ids = ids.astype(xp.int64, copy=False)
    if ids.size and (int(ids.max()) >= num_experts or int(ids.min()) < -1):
        raise KernelInputError(f"{name}: expert ids must lie in [0, {num_experts}) or be -1 (unused slot)")
    return ids


def _offsets(xp: Any, counts: Any) -> Any:
    out = xp.zeros(int(counts.shape[0]) + 1, dtype=xp.int64)
    if counts.shape[0]:
        out[1:] = xp.cumsum(counts)
    return out


def _bincount(xp: Any, a: Any, n: int) -> Any:
    if a.shape[0] == 0:
        return xp.zeros(n, dtype=xp.int64)
    return xp.bincount(a, minlength=n).astype(xp.int64)


def plan_dispatch(topk_ids: Any, num_experts: int, num_ranks: int) -> DispatchPlan:
    """Send rows, counts and offsets per rank, and where each (t, k) comes back."""
    epr = _experts_per_rank(num_experts, num_ranks)
    ids = _check_ids("topk_ids", topk_ids, num_experts)
    xp = xp_of(ids)
    t, k = ids.shape
    valid = ids >= 0
    rank = xp.where(valid, ids // epr, 0)
    hit = xp.zeros((num_ranks, t), dtype=xp.bool_)
    tok = xp.broadcast_to(xp.arange(t, dtype=xp.int64)[:, None], (t, k))
    hit[rank[valid], tok[valid]] = True
    flat = xp.flatnonzero(hit.reshape(-1))
    send_src = flat % max(t, 1)
    send_counts = hit.sum(axis=1).astype(xp.int64)
    # returned rows: grouped by rank, then token, then slot k
    key = rank * (t * k) + xp.arange(t * k, dtype=xp.int64).reshape(t, k)
    vkeys = key[valid]
    order = xp.argsort(vkeys)
    pos = xp.empty_like(order)
    pos[order] = xp.arange(order.shape[0], dtype=xp.int64)
    combine_index = xp.full((t, k), -1, dtype=xp.int64)
    combine_index[valid] = pos
    return_counts = _bincount(xp, rank[valid], num_ranks)
    return DispatchPlan(
        num_tokens=t,
        top_k=k,
        num_experts=num_experts,
        num_ranks=num_ranks,
        send_src=send_src,
        send_counts=send_counts,
        send_offsets=_offsets(xp, send_counts),
        combine_index=combine_index,
        return_counts=return_counts,
        return_offsets=_offsets(xp, return_counts),
        return_rows=int(vkeys.shape[0]),
    )


def plan_experts(recv_ids: Any, recv_counts: Any, rank: int, num_experts: int, num_ranks: int) -> ExpertPlan:
    """Per-expert order of received rows, and the return layout per source."""
    epr = _experts_per_rank(num_experts, num_ranks)
    if not 0 <= rank < num_ranks:
        raise KernelInputError(f"rank: must lie in [0, {num_ranks}), got {rank}")
    ids = _check_ids("recv_ids", recv_ids, num_experts)
    xp = xp_of(ids)
    counts = xp.asarray(recv_counts).astype(xp.int64).reshape(-1)
    n, k = ids.shape
    if int(counts.sum()) != n:
        raise KernelInputError(f"recv_counts: must sum to the received rows ({n}), got {int(counts.sum())}")
    local = ids - rank * epr
    mine = (ids >= 0) & (local >= 0) & (local < epr)
    pair_row = xp.broadcast_to(xp.arange(n, dtype=xp.int64)[:, None], (n, k))[mine]
    pair_expert = local[mine]
    m = int(pair_row.shape[0])
    # expert order: by local expert, then received row, then slot (pairs are already row/slot ordered)
    order = xp.argsort(pair_expert * max(m, 1) + xp.arange(m, dtype=xp.int64))
    expert_src = pair_row[order]
    expert_counts = _bincount(xp, pair_expert, epr)
    return_src = xp.empty_like(order)
    return_src[order] = xp.arange(m, dtype=xp.int64)
    # rows returned to each source: the pairs of that source's received rows
    row_end = _offsets(xp, counts)[1:]
    pairs_before = _offsets(xp, mine.sum(axis=1).astype(xp.int64))
    ret_offsets = xp.concatenate([xp.zeros(1, dtype=xp.int64), pairs_before[row_end]])
    return ExpertPlan(
        rank=rank,
        experts_per_rank=epr,
        expert_src=expert_src,
        expert_counts=expert_counts,
        expert_offsets=_offsets(xp, expert_counts),
        return_src=return_src,
        return_counts=xp.diff(ret_offsets),
        return_offsets=ret_offsets,
    )


def _rows(name: str, a: Any) -> Any:
    if a.ndim != 2:
        raise KernelInputError(f"{name}: must be 2-D (rows, hidden), got shape {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise KernelInputError(f"{name}: must be contiguous; pass a contiguous copy")
    return a


def dispatch_pack(x: Any, plan: DispatchPlan, out: Any | None = None) -> Any:
    """Send buffer: x[plan.send_src], rank r's rows at send_offsets[r]:send_offsets[r + 1]."""
    x = _rows("x", x)
    if x.shape[0] != plan.num_tokens:
        raise KernelInputError(f"x: has {x.shape[0]} rows, the plan routes {plan.num_tokens} tokens")
    return gather_rows(x, plan.send_src, out)


def unpack(recv: Any, plan: ExpertPlan, out: Any | None = None) -> Any:
    """Received rows in per-expert order: recv[plan.expert_src]."""
    recv = _rows("recv", recv)
    return gather_rows(recv, plan.expert_src, out)


def combine_pack(expert_y: Any, plan: ExpertPlan, out: Any | None = None) -> Any:
    """Expert outputs laid out per source (return_offsets): expert_y[plan.return_src]."""
    expert_y = _rows("expert_y", expert_y)
    if expert_y.shape[0] != plan.return_src.shape[0]:
        raise KernelInputError(
            f"expert_y: has {expert_y.shape[0]} rows, the plan has {plan.return_src.shape[0]} expert rows"
        )
    return gather_rows(expert_y, plan.return_src, out)


def combine(
    ret: Any, plan: DispatchPlan, weights: Any, out: Any | None = None, bf16: bool = False
) -> Any:
    """out[t] = sum_k weights[t, k] * ret[combine_index[t, k]], accumulated and returned in fp32.

    `ret` holds float32 rows, or bfloat16 bit patterns (uint16) with `bf16=True`.
    """
    ret = _rows("ret", ret)
    xp = xp_of(ret)
    want = xp.uint16 if bf16 else xp.float32
    if ret.dtype != want:
        raise KernelInputError(f"ret: dtype must be {np.dtype(want).name} (bf16={bf16}), got {ret.dtype}")
    expected = plan.return_rows
    if ret.shape[0] != expected:
        raise KernelInputError(f"ret: has {ret.shape[0]} rows, the plan expects {expected}")
    w = xp.ascontiguousarray(xp.asarray(weights), dtype=xp.float32)
    if tuple(w.shape) != (plan.num_tokens, plan.top_k):
        raise KernelInputError(f"weights: shape must be {(plan.num_tokens, plan.top_k)}, got {tuple(w.shape)}")
    h = int(ret.shape[1])
    if out is None:
        out = xp.empty((plan.num_tokens, h), dtype=xp.float32)
    index = xp.ascontiguousarray(plan.combine_index)
    if is_gpu(ret):
        from kernels import _cuda

        _cuda.combine(ret, index, w, out, bf16)
    else:
        from numba import get_num_threads

        from kernels import _cpu

        (_cpu.combine_bf16 if bf16 else _cpu.combine_f32)(ret, index, w, out, get_num_threads())
    return out


# ---- plain references (numpy, loops where the layout is the point) ----


def plan_dispatch_reference(topk_ids: np.ndarray, num_experts: int, num_ranks: int) -> dict[str, np.ndarray]:
    """The sender layout built with Python loops: send_src, send_counts, combine_index."""
    epr = num_experts // num_ranks
    t, k = topk_ids.shape
    send: list[list[int]] = [[] for _ in range(num_ranks)]
    ret: list[list[tuple[int, int]]] = [[] for _ in range(num_ranks)]
    for tok in range(t):
        for r in range(num_ranks):
            slots = [j for j in range(k) if topk_ids[tok, j] >= 0 and topk_ids[tok, j] // epr == r]
            if slots:
                send[r].append(tok)
                ret[r].extend((tok, j) for j in slots)
    combine_index = np.full((t, k), -1, dtype=np.int64)
    flat = [p for r in range(num_ranks) for p in ret[r]]
    for row, (tok, j) in enumerate(flat):
        combine_index[tok, j] = row
    return {
        "send_src": np.array([s for r in range(num_ranks) for s in send[r]], dtype=np.int64),
        "send_counts": np.array([len(s) for s in send], dtype=np.int64),
        "combine_index": combine_index,
        "return_counts": np.array([len(p) for p in ret], dtype=np.int64),
    }


def moe_reference(
    x: np.ndarray, topk_ids: np.ndarray, weights: np.ndarray, expert_fn: Any
) -> np.ndarray:
    """Dense reference: out[t] = sum_k w[t, k] * expert_fn(e, x[t]) in float64, for checking."""
    out = np.zeros(x.shape, dtype=np.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if e >= 0:
                out[t] += float(weights[t, j]) * expert_fn(e, x[t : t + 1].astype(np.float64))[0]
    return out


def combine_reference(ret: np.ndarray, combine_index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """numpy combine: fp32 gather, weight and sum over k."""
    y = ret.astype(np.float32)
    if ret.dtype == np.uint16:  # bfloat16 bits
        y = (ret.astype(np.uint32) << 16).view(np.float32)
    out = np.zeros((combine_index.shape[0], ret.shape[1]), dtype=np.float32)
    for j in range(combine_index.shape[1]):
        sel = combine_index[:, j] >= 0
        out[sel] += weights[sel, j, None].astype(np.float32) * y[combine_index[sel, j]]
    return out


def loopback(
    xs: list[Any],
    topk_ids: list[Any],
    weights: list[Any],
    num_experts: int,
    expert_fn: Any,
    bf16_return: bool = False,
) -> tuple[list[Any], list[ExpertPlan]]:
    """All ranks of one MoE layer in one process: the buffers move by slicing, as the writes would.

    `xs[s]`, `topk_ids[s]`, `weights[s]` belong to rank s; `expert_fn(e, rows)` is expert e.
    Returns the combined outputs per rank (fp32) and each rank's expert plan.
    """
    xp = xp_of(xs[0])
    num_ranks = len(xs)
    plans = [plan_dispatch(ids, num_experts, num_ranks) for ids in topk_ids]
    sends = [dispatch_pack(x, p) for x, p in zip(xs, plans)]
    metas = [xp.asarray(ids)[p.send_src] for ids, p in zip(topk_ids, plans)]
    rets: list[Any] = []
    eplans: list[ExpertPlan] = []
    for r in range(num_ranks):
        cuts = [(int(p.send_offsets[r]), int(p.send_offsets[r + 1])) for p in plans]
        recv = xp.concatenate([s[a:b] for s, (a, b) in zip(sends, cuts)])
        recv_ids = xp.concatenate([m[a:b] for m, (a, b) in zip(metas, cuts)])
        counts = [b - a for a, b in cuts]
        eplan = plan_experts(recv_ids, counts, r, num_experts, num_ranks)
        ex = unpack(recv, eplan)
        y = xp.empty(ex.shape, dtype=xp.uint16 if bf16_return else xp.float32)
        for j in range(eplan.experts_per_rank):
            a, b = int(eplan.expert_offsets[j]), int(eplan.expert_offsets[j + 1])
            y[a:b] = expert_fn(r * eplan.experts_per_rank + j, ex[a:b])
        rets.append(combine_pack(y, eplan))
        eplans.append(eplan)
    outs = []
    for s in range(num_ranks):
        parts = [
            rets[r][int(eplans[r].return_offsets[s]) : int(eplans[r].return_offsets[s + 1])]
            for r in range(num_ranks)
        ]
        outs.append(combine(xp.concatenate(parts), plans[s], weights[s], bf16=bf16_return))
    return outs, eplans
