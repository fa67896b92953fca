"""Pipeline schedules (1F1B and Megatron's interleaved 1F1B), simulated op by op.

Every stage runs its ops in the schedule's order; an op starts when the stage is free and its
input has arrived (the previous virtual stage's forward, or the next one's backward, plus the
point-to-point send). Durations are per virtual stage (chunk); the result is each op's start
and end, so the bubbles are the ones the schedule really leaves.

The same code runs as plain Python for the first few schedules of a process and compiled by
numba from then on: loading numba and its cached machine code costs seconds at start-up
(numba imports scipy.linalg to look for BLAS), which a single `workbench simulate train` never
wins back, while a plan search evaluates thousands of schedules.
"""

from __future__ import annotations

from typing import Any

import numpy as np

JIT_AFTER = 3  # schedules run in plain Python before switching to the numba-compiled code
_calls = 0
_jit: Any = None


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


def simulate(p: int, v: int, m: int, fdur: Any, bdur: Any, fsend: Any, bsend: Any, fstart: Any, fend: Any,
             bstart: Any, bend: Any, ptr: Any, clock: Any) -> bool:  # pragma: no cover - also compiled
    """Fill the start/end of every forward and backward op, flat index vs·m + micro-batch.

    Virtual stage vs = chunk·p + stage. fdur/bdur: seconds per op of each virtual stage; fsend[vs]:
    seconds to send vs's output activations on, bsend[vs]: to send its input gradient back.
    fstart/fend/bstart/bend (p·v·m, filled with −1), ptr (p zeros) and clock (p zeros) are filled in
    place: numpy arrays for the numba-compiled code, Python lists for the plain one (fast to index).
    Returns False on a deadlock (a bug).
    """
    pv = p * v
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
                k = vs * m + mb
                if fwd:
                    ready = 0.0
                    if vs > 0:
                        if fend[k - m] < 0:
                            break
                        ready = fend[k - m] + fsend[vs - 1]
                    t0 = max(clock[s], ready)
                    fstart[k] = t0
                    fend[k] = t0 + fdur[vs]
                    clock[s] = t0 + fdur[vs]
                else:
                    if vs < pv - 1:
                        if bend[k + m] < 0:
                            break
                        ready = bend[k + m] + bsend[vs + 1]
                    else:
                        ready = fend[k]
                    t0 = max(clock[s], ready)
                    bstart[k] = t0
                    bend[k] = t0 + bdur[vs]
                    clock[s] = t0 + bdur[vs]
                ptr[s] += 1
                done += 1
                progressed = True
        if not progressed:
            return False
    return True


def _compiled() -> Any:
    """`simulate` compiled by numba (its machine code cached on disk), built once per process."""
    global _jit
    if _jit is None:
        from numba import njit

        op = njit(cache=True)(_op)
        sim_globals = dict(simulate.__globals__, _op=op)
        import types

        fn = types.FunctionType(simulate.__code__, sim_globals, "simulate_jit")
        _jit = njit(cache=True)(fn)
    return _jit


def run_schedule(p: int, v: int, m: int, fdur: np.ndarray, bdur: np.ndarray, fsend: np.ndarray,
                 bsend: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fstart, fend, bstart, bend) indexed [virtual stage, micro-batch], and each stage's end."""
    global _calls
    _calls += 1
    n = p * v * m
    if _calls <= JIT_AFTER:
        bufs: list[Any] = [[-1.0] * n for _ in range(4)]
        ptr: Any = [0] * p
        clock: Any = [0.0] * p
        args = [np.asarray(x, dtype=np.float64).tolist() for x in (fdur, bdur, fsend, bsend)]
        ok = simulate(p, v, m, args[0], args[1], args[2], args[3], bufs[0], bufs[1], bufs[2], bufs[3], ptr, clock)
    else:
        bufs = [np.full(n, -1.0) for _ in range(4)]
        ptr, clock = np.zeros(p, np.int64), np.zeros(p)
        args = [np.ascontiguousarray(x, dtype=np.float64) for x in (fdur, bdur, fsend, bsend)]
        ok = _compiled()(p, v, m, *args, *bufs, ptr, clock)
    if not ok:
        raise RuntimeError(f"pipeline schedule deadlocked (p={p}, v={v}, m={m}); this is a bug")
    fs, fe, bs, be = (np.asarray(x, dtype=np.float64).reshape(p * v, m) for x in bufs)
    return fs, fe, bs, be, np.asarray(clock, dtype=np.float64)


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
