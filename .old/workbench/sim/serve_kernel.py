"""The scheduler loop of one serving engine, compiled with numba (see `workbench.sim.serve` for the model).

Everything lives in flat arrays: per-request state (`kv` tokens stored, `P` tokens to compute before
decoding, `gen` tokens generated, `alloc` KV blocks held, `shared` prefix blocks used), the running
set in admission order, and the waiting queue as a ring buffer (preempted requests go back to its
front). The step price is `WorkerCost.step` written over the same tables.

The front end (`F_FE_*`, all 0 unless measured): one server beside the engine that spends a fixed time per
request (`F_FE_REQ` just before it reaches the engine: a request waits behind the front end's backlog; and
`F_FE_FIN` after its last token is delivered), per step's output and per streamed token, first come first
served. A step's tokens reach the
clients when the front end is through with them (`deliver`), so TTFT, TPOT and a closed-loop client's next
request see its backlog; a closed-loop client sends its next request only when its stream's finish work
(`F_FE_FIN`: the usage chunk, `[DONE]`, its own accounting; it reads the stream to its end first) is done, so
that work delays the next send and other requests' way, not the next request's TTFT; and the front end's
per-request work off every request's path (`F_FE_ASYNC`, queued as the request reaches the engine) delays only
the work behind it; and a step that starts while the front end still has `b` seconds of work runs
`1 + F_FE_SLOW · min(b, dt) / dt` times longer (the two share the CPU cores). Only `workbench.sim.serve`
imports this module (numba is imported here, not when `workbench` is).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

# indices into the float parameter vector `fp` (prices) and the int vector `ip` (scheduler)
F_PP, F_DP, F_LAYERS, F_FLOP_PER, F_PF_SCALE, F_KVB, F_DC_SCALE, F_CPU, F_ATTN_PEAK, F_MEM_BPS, \
    F_LAUNCH_GRAPH, F_LAUNCH_EAGER, F_KERNELS, F_GRAPH, F_SCHED, F_SWAP_S, F_SEQ, F_REQ, \
    F_FE_REQ, F_FE_TOK, F_FE_STEP, F_FE_SLOW, F_FE_FIN, F_FE_ASYNC, F_CHUNK, F_EAGER, F_PREFILL_STEP = range(27)
N_F = 27
I_B, I_TOTAL, I_CHUNK, I_MAX_TOKENS, I_MAX_SEQS, I_PBLOCKS, I_CHUNKED, I_SWAP, I_CLOSED, I_DECODE_MODE, I_NO_EVICT = \
    range(11)



@njit(cache=True)
def step_price(fp, grid, tl, th, ts, pfx, pfy, dcx, dcy, tokens, work, dkv, sampled, decode_only, chunks):  # type: ignore[no-untyped-def]
    pp = fp[F_PP]
    L = fp[F_LAYERS]
    lm = np.log(max(tokens, 1.0) / pp)
    stage = np.interp(lm, grid, tl)
    if work > 0:
        flops = work / pp / fp[F_DP] * fp[F_FLOP_PER]
        if fp[F_CPU] > 0:
            stage += flops / fp[F_ATTN_PEAK] * L
        else:
            rate = np.exp(np.interp(np.log(max(flops, 1.0)), pfx, pfy)) * 1e12 * fp[F_PF_SCALE]
            stage += flops / rate * L
    if dkv > 0:
        b = dkv / pp / fp[F_DP] * fp[F_KVB]
        if fp[F_CPU] > 0:
            stage += b / fp[F_MEM_BPS] * L
        else:
            bw = np.exp(np.interp(np.log(max(b, 1.0)), dcx, dcy)) * 1e9 * fp[F_DC_SCALE]
            stage += b / bw * L
    gpu = pp * stage + np.interp(np.log(max(sampled, 1.0) / pp), grid, th)
    if pp > 1:
        gpu += (pp - 1) * np.interp(lm, grid, ts)
    nk = fp[F_KERNELS] * pp
    t = gpu + nk * fp[F_LAUNCH_GRAPH]  # back-to-back kernels: the per-kernel gap measured in a graph
    if not (decode_only and fp[F_GRAPH] > 0):
        t = max(t, nk * fp[F_LAUNCH_EAGER] + fp[F_EAGER])  # eager: the host launches every kernel as the GPU runs
    return t + fp[F_SCHED] + fp[F_SEQ] * sampled + fp[F_CHUNK] * chunks + (fp[F_PREFILL_STEP] if chunks > 0 else 0.0)


@njit(cache=True)
def cdiv(a, b):  # type: ignore[no-untyped-def]
    return -((-a) // b)


@njit(cache=True)
def run(arr, isl, osl, first_token, ip, fp, grid, tl, th, ts, pfx, pfy, dcx, dcy):  # type: ignore[no-untyped-def]
    n = isl.shape[0]
    B = ip[I_B]
    total = ip[I_TOTAL]
    chunk = ip[I_CHUNK]
    max_tokens = ip[I_MAX_TOKENS]
    max_seqs = ip[I_MAX_SEQS]
    pblocks = ip[I_PBLOCKS]
    chunked = ip[I_CHUNKED] > 0
    swap = ip[I_SWAP] > 0
    closed = ip[I_CLOSED]
    decode_mode = ip[I_DECODE_MODE] > 0
    no_evict = ip[I_NO_EVICT] > 0  # reserve prompt + all output blocks at admission; never preempt
    P = isl.copy()
    kv = np.zeros(n, np.int64)
    gen = np.zeros(n, np.int64)
    alloc = np.zeros(n, np.int64)
    shared = np.zeros(n, np.int64)
    swapped = np.zeros(n, np.int64)
    t_sched = np.full(n, np.nan)
    t_first = np.full(n, np.nan)
    t_finish = np.full(n, np.nan)
    t_last = np.zeros(n)
    resumed = np.zeros(n, np.bool_)
    preempt = np.zeros(n, np.int64)
    failed = np.zeros(n, np.bool_)
    done = 0
    for i in range(n):
        if decode_mode:
            kv[i] = P[i]
            gen[i] = 1
            t_first[i] = first_token[i]
        if cdiv(isl[i] + osl[i], B) > total:
            failed[i] = True
            done += 1
    issued = n
    if closed > 0:
        issued = min(closed, n)
        for i in range(n):
            arr[i] = fp[F_REQ] if i < issued else np.inf  # a client's request reaches the engine after request_us
    # running set (admission order) and waiting ring buffer
    run_ids = np.empty(max_seqs + 1, np.int64)
    nr = 0
    cap = n + 1
    wq = np.empty(cap, np.int64)
    wh = 0
    wn = 0
    # steps (grown by doubling)
    scap = 1024
    s_start = np.empty(scap)
    s_dt = np.empty(scap)
    s_pf = np.empty(scap, np.int64)
    s_dc = np.empty(scap, np.int64)
    s_bl = np.empty(scap, np.int64)
    ns = 0
    extra = np.empty(64)
    ne = 0
    hits = 0
    warm = False
    free = total
    nxt = 0
    now = 0.0
    ch_id = np.empty(max_seqs + 1, np.int64)
    ch_c = np.empty(max_seqs + 1, np.int64)
    isdec = np.zeros(max_seqs + 1, np.bool_)
    fe_on = fp[F_FE_REQ] > 0 or fp[F_FE_TOK] > 0 or fp[F_FE_STEP] > 0 or fp[F_FE_SLOW] > 0 or fp[F_FE_FIN] > 0 \
        or fp[F_FE_ASYNC] > 0
    fe_free = -np.inf  # when the front end is next free
    at = arr.copy()  # when each request reaches the engine (`arr`: as the clients see it, + request_us)
    fe_nxt = 0  # the next request the front end takes in, in arrival order
    while done < n:
        if fe_on:
            fe_nxt, fe_free = _take_in(arr, at, failed, fe_nxt, fe_free, now, fp[F_FE_REQ], fp[F_FE_ASYNC])
        while nxt < n and at[nxt] <= now:
            if not failed[nxt]:
                wq[(wh + wn) % cap] = nxt
                wn += 1
            nxt += 1
        if nr == 0 and wn == 0:
            if nxt >= n or not np.isfinite(at[nxt]):
                break
            now = max(now, at[nxt])
            continue
        budget = max_tokens
        extra_s = 0.0
        # ---- blocks for the decodes' next tokens; preempt the newest while short
        while True:
            need = 0
            nd = 0
            for j in range(nr):
                i = run_ids[j]
                if kv[i] >= P[i]:
                    nd += 1
                    g = cdiv(kv[i] + 1, B) - shared[i] - alloc[i]
                    if g > 0:
                        need += g
            if nd == 0 or need <= free:
                for j in range(nr):  # reserve the decodes' blocks before anything is admitted
                    i = run_ids[j]
                    if kv[i] >= P[i]:
                        g = cdiv(kv[i] + 1, B) - shared[i] - alloc[i]
                        if g > 0:
                            alloc[i] += g
                            free -= g
                break
            v = run_ids[nr - 1]
            nr -= 1
            free += alloc[v]
            if swap and kv[v] >= P[v]:
                swapped[v] = kv[v]
                extra_s += kv[v] * fp[F_SWAP_S]
            else:
                resumed[v] = gen[v] > 0
                P[v] = isl[v] + gen[v] if gen[v] > 0 else isl[v]
            kv[v] = 0
            alloc[v] = 0
            shared[v] = 0
            preempt[v] += 1
            wh = (wh - 1) % cap
            wq[wh] = v
            wn += 1
        for j in range(nr):
            i = run_ids[j]
            isdec[j] = kv[i] >= P[i]
        prefill_first = (not chunked) and wn > 0 and nr < max_seqs
        if not prefill_first:
            budget -= nd
        nc = 0
        # ---- partly prefilled sequences continue
        if chunked:
            for j in range(nr):
                if isdec[j]:
                    continue
                if budget <= 0:
                    break
                i = run_ids[j]
                c = min(P[i] - kv[i], chunk, budget, (alloc[i] + shared[i] + free) * B - kv[i])
                if c <= 0:
                    continue
                g = cdiv(kv[i] + c, B) - shared[i] - alloc[i]
                if g > 0:
                    alloc[i] += g
                    free -= g
                budget -= c
                ch_id[nc] = i
                ch_c[nc] = c
                nc += 1
        # ---- admit waiting requests in order
        nadm = 0
        while wn > 0 and nr < max_seqs:
            i = wq[wh]
            if swapped[i] > 0:
                g = cdiv(swapped[i], B)
                if cdiv(swapped[i] + 1, B) > free:  # its blocks and room for the token it decodes next
                    break
                kv[i] = swapped[i]
                alloc[i] = g
                swapped[i] = 0
                free -= g
                extra_s += kv[i] * fp[F_SWAP_S]
                wh = (wh + 1) % cap
                wn -= 1
                run_ids[nr] = i
                isdec[nr] = kv[i] >= P[i]
                nr += 1
                nadm += 1
                continue
            hit = 0
            if kv[i] == 0 and warm and P[i] > pblocks * B:
                hit = pblocks
            left = P[i] - kv[i] - hit * B
            if left > 0 and budget <= 0:
                break
            c = min(left, chunk, budget)
            if not chunked and c < left:
                if nc > 0 or nadm > 0 or budget < max_tokens:
                    break
                c = left
            g = cdiv(kv[i] + hit * B + c, B) - hit
            if no_evict:
                g = cdiv(isl[i] + osl[i], B) - hit
                if g > free:
                    break
            elif g + (1 if c < left else 0) > free:
                break
            kv[i] += hit * B
            shared[i] = hit
            hits += hit * B
            alloc[i] = g
            free -= g
            wh = (wh + 1) % cap
            wn -= 1
            run_ids[nr] = i
            isdec[nr] = left <= 0
            nr += 1
            nadm += 1
            if np.isnan(t_sched[i]):
                t_sched[i] = now
            if c > 0:
                ch_id[nc] = i
                ch_c[nc] = c
                nc += 1
                budget -= c
        use_dec = not (prefill_first and nc > 0)
        n_dec = 0
        dkv = 0.0
        if use_dec:
            for j in range(nr):
                if isdec[j]:
                    i = run_ids[j]
                    if kv[i] < P[i]:  # admitted this step with nothing to compute: decode next step
                        isdec[j] = False
                        continue
                    n_dec += 1
                    dkv += kv[i] + 1
        if nc == 0 and n_dec == 0:
            if nxt < n and np.isfinite(at[nxt]):
                now = max(now, at[nxt])
                continue
            for k in range(wn):  # nothing runs and nothing arrives: what waits never fits
                i = wq[(wh + k) % cap]
                failed[i] = True
                done += 1
            wn = 0
            continue
        pf_tokens = 0
        work = 0.0
        completing = 0
        for k in range(nc):
            i = ch_id[k]
            c = ch_c[k]
            pf_tokens += c
            work += c * (kv[i] + c / 2.0)
            if kv[i] + c >= P[i]:
                completing += 1
        dt = step_price(fp, grid, tl, th, ts, pfx, pfy, dcx, dcy, float(n_dec + pf_tokens), work, dkv,
                        float(n_dec + completing), pf_tokens == 0, float(nc)) + extra_s
        if fe_on and fp[F_FE_SLOW] > 0 and fe_free > now:
            dt *= 1.0 + fp[F_FE_SLOW] * min(fe_free - now, dt) / dt
        start = now
        now += dt
        deliver = now
        if fe_on:  # requests that arrived during the step are ahead of its tokens in the front end's queue
            fe_nxt, fe_free = _take_in(arr, at, failed, fe_nxt, fe_free, now, fp[F_FE_REQ], fp[F_FE_ASYNC])
            deliver = max(now, fe_free) + fp[F_FE_STEP] + (n_dec + completing) * fp[F_FE_TOK]
            fe_free = deliver
        if use_dec:
            for j in range(nr):
                if isdec[j]:
                    i = run_ids[j]
                    g = cdiv(kv[i] + 1, B) - shared[i] - alloc[i]
                    if g > 0:
                        alloc[i] += g
                        free -= g
                    kv[i] += 1
                    gen[i] += 1
                    t_last[i] = now
        for k in range(nc):
            i = ch_id[k]
            kv[i] += ch_c[k]
            if kv[i] >= P[i]:
                gen[i] += 1
                if np.isnan(t_first[i]):
                    t_first[i] = deliver
                elif resumed[i]:
                    if ne == extra.shape[0]:
                        e2 = np.empty(ne * 2)
                        e2[:ne] = extra[:ne]
                        extra = e2
                    extra[ne] = now - t_last[i]
                    ne += 1
                    resumed[i] = False
                t_last[i] = now
                if pblocks > 0 and not warm and isl[i] >= pblocks * B:
                    warm = True
                    free -= pblocks
        if ns == scap:
            scap *= 2
            a1 = np.empty(scap)
            a1[:ns] = s_start[:ns]
            s_start = a1
            a2 = np.empty(scap)
            a2[:ns] = s_dt[:ns]
            s_dt = a2
            a3 = np.empty(scap, np.int64)
            a3[:ns] = s_pf[:ns]
            s_pf = a3
            a4 = np.empty(scap, np.int64)
            a4[:ns] = s_dc[:ns]
            s_dc = a4
            a5 = np.empty(scap, np.int64)
            a5[:ns] = s_bl[:ns]
            s_bl = a5
        s_start[ns] = start
        s_dt[ns] = dt
        s_pf[ns] = pf_tokens
        s_dc[ns] = n_dec
        s_bl[ns] = total - free
        ns += 1
        # ---- retire finished sequences (closed loop: their clients send the next requests)
        w = 0
        for j in range(nr):
            i = run_ids[j]
            if gen[i] >= osl[i]:
                t_finish[i] = deliver
                if fe_on:
                    fe_free += fp[F_FE_FIN]  # the stream's close and its client's accounting, after the last token
                free += alloc[i]
                alloc[i] = 0
                done += 1
                if closed > 0 and issued < n:
                    # its client sends the next request once the stream is closed and counted (`fe_free`, the
                    # finish work just queued), then it takes the way of a request alone
                    arr[issued] = (fe_free if fe_on else deliver) + fp[F_REQ]
                    at[issued] = arr[issued]
                    issued += 1
            else:
                run_ids[w] = i
                w += 1
        nr = w
    return (t_sched, t_first, t_finish, preempt, failed, s_start[:ns].copy(), s_dt[:ns].copy(),
            s_pf[:ns].copy(), s_dc[:ns].copy(), s_bl[:ns].copy(), extra[:ne].copy(), hits)



@njit(cache=True)
def _take_in(arr: np.ndarray, at: np.ndarray, failed: np.ndarray, k: int, fe_free: float, upto: float,
             fe_req: float, fe_async: float) -> tuple[int, float]:
    """The front end takes in, first come first served, every request that arrived by `upto` from the `k`-th on:
    each reaches the engine (`at`) when the front end is through with the work ahead of it and its own (its own
    alone is in `arr`, the hop of a request alone), and the front end then spends `fe_async` on it (off its
    path). Returns the next request to take in and when the front end is next free."""
    n = arr.shape[0]
    while k < n and arr[k] <= upto:
        if not failed[k]:
            fe_free = max(arr[k], fe_free + fe_req)
            at[k] = fe_free
            fe_free += fe_async
        k += 1
    return k, fe_free


def kernel() -> Any:
    return run
