"""Pipeline schedules (1F1B and Megatron's interleaved 1F1B), simulated op by op with numba.

Every stage runs its ops in the schedule's order; an op starts when the stage is free and its
input has arrived (the previous virtual stage's forward, or the next one's backward, plus the
point-to-point send). Durations are per virtual stage (chunk); the result is each op's start
and end, so the bubbles are the ones the schedule really leaves.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _op(j: int, s: int, p: int, v: int, m: int) -> tuple[bool, int, int]:  # pragma: no cover - compiled
    """The j-th op of stage s: (is_forward, chunk, microbatch)."""
    mv = m * v
    if v == 1:
        warm = min(p - s - 1, mv)
    else:
        warm = min((p - s - 1) * 2 + (v - 1) * p, mv)
    steady = mv - warm
    if j < warm:
        fwd, k = True, j
    else:
        r = j - warm
        if r < 2 * steady:
            if r % 2 == 0:
                fwd, k = True, warm + r // 2
            else:
                fwd, k = False, r // 2
        else:
            fwd, k = False, steady + (r - 2 * steady)
    if v == 1:
        return fwd, 0, k
    group = k // (p * v)
    within = k % (p * v)
    chunk = within // p
    if not fwd:
        chunk = v - 1 - chunk
    mb = group * p + within % p
    return fwd, chunk, mb


@njit(cache=True)
def simulate(p: int, v: int, m: int, fdur: np.ndarray, bdur: np.ndarray, fsend: np.ndarray,
             bsend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:  # pragma: no cover
    """Start/end of every forward and backward op, indexed [virtual stage, micro-batch].

    Virtual stage vs = chunk·p + stage. fdur/bdur: seconds per op of each virtual stage; fsend[vs]:
    seconds to send vs's output activations on, bsend[vs]: to send its input gradient back.
    Returns (fstart, fend, bstart, bend, stage_end, ok); ok is False on a deadlock (a bug).
    """
    pv = p * v
    fstart = np.full((pv, m), -1.0)
    fend = np.full((pv, m), -1.0)
    bstart = np.full((pv, m), -1.0)
    bend = np.full((pv, m), -1.0)
    ptr = np.zeros(p, np.int64)
    clock = np.zeros(p)
    nops = 2 * m * v
    done = 0
    sweep = 0
    while done < p * nops:
        progressed = False
        sweep += 1
        for i in range(p):
            s = i if sweep % 2 else p - 1 - i  # alternate: forwards flow up the stages, backwards down
            while ptr[s] < nops:
                fwd, c, mb = _op(ptr[s], s, p, v, m)
                vs = c * p + s
                if fwd:
                    ready = 0.0
                    if vs > 0:
                        if fend[vs - 1, mb] < 0:
                            break
                        ready = fend[vs - 1, mb] + fsend[vs - 1]
                    t0 = max(clock[s], ready)
                    fstart[vs, mb] = t0
                    fend[vs, mb] = t0 + fdur[vs]
                    clock[s] = t0 + fdur[vs]
                else:
                    if vs < pv - 1:
                        if bend[vs + 1, mb] < 0:
                            break
                        ready = bend[vs + 1, mb] + bsend[vs + 1]
                    else:
                        ready = fend[vs, mb]
                    t0 = max(clock[s], ready)
                    bstart[vs, mb] = t0
                    bend[vs, mb] = t0 + bdur[vs]
                    clock[s] = t0 + bdur[vs]
                ptr[s] += 1
                done += 1
                progressed = True
        if not progressed:
            return fstart, fend, bstart, bend, clock, False
    return fstart, fend, bstart, bend, clock, True


def run_schedule(p: int, v: int, m: int, fdur: np.ndarray, bdur: np.ndarray, fsend: np.ndarray,
                 bsend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    out = simulate(p, v, m, np.ascontiguousarray(fdur, dtype=np.float64), np.ascontiguousarray(bdur, dtype=np.float64),
                   np.ascontiguousarray(fsend, dtype=np.float64), np.ascontiguousarray(bsend, dtype=np.float64))
    if not out[5]:
        raise RuntimeError(f"pipeline schedule deadlocked (p={p}, v={v}, m={m}); this is a bug")
    return out[0], out[1], out[2], out[3], out[4]


def in_flight(p: int, v: int, m: int, stage: int) -> int:
    """Peak number of (chunk, micro-batch) activations a stage holds at once under the schedule."""
    if v == 1:
        warm = min(p - stage - 1, m * v)
    else:
        warm = min((p - stage - 1) * 2 + (v - 1) * p, m * v)
    return min(warm + 1, m * v)


def pipeline_times(p: int, v: int, m: int, fdur: np.ndarray, bdur: np.ndarray, fsend: np.ndarray,
                   bsend: np.ndarray, exact: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stage_end[p], last_bstart[pv], last_bend[pv]): when each stage finishes its last op, and when the
    last micro-batch's backward of each virtual stage starts and ends.

    With many micro-batches (m > 3p, or 6p interleaved) and `exact` False, only that many are simulated: the
    schedule is then in its periodic steady state, and the remaining m − 3p micro-batches each add
    the period λ measured over p micro-batches of the steady state (max-plus systems are eventually periodic;
    tests compare this against the full simulation).
    """
    k = 3 if v == 1 else 6  # interleaved warm-up and cool-down each span about (v+1)/v·p micro-batches
    m_sim = m if (exact or m <= k * p) else k * p
    fstart, fend, bstart, bend, clock = run_schedule(p, v, m_sim, fdur, bdur, fsend, bsend)
    last_bs = bstart[:, m_sim - 1].copy()
    last_be = bend[:, m_sim - 1].copy()
    if m_sim == m:
        return clock, last_bs, last_be
    # period per micro-batch, from the backward ends of the first chunk over the last p simulated micro-batches
    lam = float(np.max((bend[:p, m_sim - 1 - p] - bend[:p, m_sim - 1 - 2 * p]) / p))
    extra = (m - m_sim) * lam
    return clock + extra, last_bs + extra, last_be + extra


def in_flight_stages(p: int, v: int, m: int) -> np.ndarray:
    """`in_flight` for every stage at once."""
    s = np.arange(p)
    warm = p - s - 1 if v == 1 else (p - s - 1) * 2 + (v - 1) * p
    return np.minimum(np.minimum(warm, m * v) + 1, m * v)
