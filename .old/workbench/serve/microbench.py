"""Microbenchmarks of the real server, each measuring one cost on its own (the fit is in `calibrate.py`).

- `measure_compositions`: the worker's own step code path (the real worker process, driven through its pipe) on
  the compositions a continuous-batching scheduler forms: decode batches of d sequences, prefill chunks alone,
  and mixed steps (d decodes + k new prompts of p tokens), swept in isolation. Every row carries what the engine
  itself logged (`Engine.last_step`): the composition and the seconds of each phase of the step, and the worker
  loop's gap before the next step (`g_admit`, `g_send`, `g_house`);
- `measure_steps`: whole batches of n equal requests (prefill together, then decode together): the older sweep;
- `trace_run`: a serving run with everything logged: each step's composition and phases, and each request's
  time to first token split where it went (HTTP hop, front end, pipe, wait for the engine, its step, back);
- `measure_overheads`, `measure_frontend`, `measure_slowdown`: the cost of a request outside the engine, the
  front end's CPU per request / step / token, and the engine's slowdown beside a busy core.

Every run through HTTP drives the real server with the traffic benchmark from a process of its own
(`workbench.serve.service.served`), as a serving run does: the client's CPU is not the server's.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.serve.service import served

#: the step fields the worker logs beside t0/t1 (composition, phase seconds, the loop's gap before the step)
STEP_KEYS = ("prefill_seqs", "prefill_tokens", "prefill_work", "decode_seqs", "decode_kv", "sampled",
             "t_schedule", "t_build", "t_forward", "t_sync", "t_finish", "t_cpu", "t_runq", "g_admit", "g_send", "g_house")


def step_rows(got: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    """Rows of consecutive engine steps of one worker (`Backend.steps` entries): tokens, seqs, seconds (the step),
    gap (the worker loop before the next step; NaN where the worker had nothing left to run after it), period =
    seconds + gap, the logged composition and phase seconds; `g_*` of a row is the gap before the NEXT step (the
    loop logs it with that step), so that period = seconds + Σ g_* + the loop's own checks."""
    rows = []
    for a, b in zip(got, got[1:] + [None]):
        busy = b is not None and (a["running"] > 0 or a["waiting"] > 0)
        gap = (b["t0"] - a["t1"]) if busy and b is not None else float("nan")
        row = {"tokens": a["batch_tokens"], "seqs": a["batch_seqs"], "seconds": a["t1"] - a["t0"], "gap": gap,
               "period": a["t1"] - a["t0"] + gap, "t0": a["t0"], "t1": a["t1"], **extra}
        row.update({k: a[k] for k in STEP_KEYS if k in a and not k.startswith("g_")})
        row.update({k: (b[k] if busy and b is not None and k in b else float("nan"))
                    for k in ("g_admit", "g_send", "g_house")})
        rows.append(row)
    return rows


async def _drain(g: Any) -> None:
    async for _ in g:
        pass


async def _idle(backend: Any, timeout: float = 60.0) -> None:
    """Wait (bounded; between sweep points only, never beside a measured step) until no worker runs a sequence."""
    end = time.monotonic() + timeout
    while any(p.stats.get("running", 0) for p in backend.procs.values()) and time.monotonic() < end:
        await asyncio.sleep(0.01)


def measure_compositions(checkpoint: str, decodes: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16),
                         prefills: tuple[tuple[int, int], ...] = ((1, 16), (1, 48), (1, 128), (2, 48), (4, 48)),
                         context: int = 48, repeat: int = 2, between: int = 2, passes: int = 1, backend: Any = None,
                         **spec: Any) -> pd.DataFrame:
    """The real worker's steps on the compositions a continuous-batching server forms, swept in isolation.

    For each d in `decodes`: d sequences of `context` prompt tokens are started and left decoding; once every one
    has its first token, each (k, p) of `prefills` is sent `repeat` times as k new requests of p prompt tokens and
    one output token (they leave after that step, so the decode batch stays d), with `between` pure decode steps of
    the d sequences after each. The step that takes them is what a server runs when requests arrive beside running
    decodes: d decodes + k prefill chunks (d = 0: prefill alone). Returns one row per step (`step_rows`, with
    `decodes`, `k`, `prompt` of the sweep point), each with the composition the engine logged — the table is
    labelled by what ran, not by what was asked for.

    `passes` > 1 sweeps the decodes that many times, in ascending then descending order: a machine whose speed drifts
    over the sweep's seconds then weighs every point alike instead of bending the sweep's shape (in one pass on the
    2-vCPU VM decodes of 6 took 0.70 of the server's same steps a minute later, decodes of 2 0.91)."""
    from contextlib import nullcontext

    from workbench.serve.backend import Backend
    from workbench.serve.sampling import SamplingParams

    if passes < 1 or repeat < 1:
        raise WorkbenchError(f"measure_compositions: passes={passes}, repeat={repeat}: give 1 or more")
    rows: list[dict[str, Any]] = []
    inject = [(k, p) for _ in range(repeat) for k, p in prefills]
    with (nullcontext(backend) if backend is not None else Backend(checkpoint, "colocated", **spec)) as b:
        cap = int(b.context_length)
        if context + 2 > cap:
            raise WorkbenchError(f"measure_compositions: context {context} does not fit the worker's {cap} tokens")
        # each injection takes at most k + 1 steps (its prompts may reach the worker apart) and `between` more
        long_out = max(2, min(cap - context - 1, sum(k + between + 2 for k, _ in inject) + 16))

        def prompt(n: int, seed: int) -> list[int]:
            return [(seed * 31 + j * 7) % 200 + 1 for j in range(n)]

        async def point(d: int, seed: int) -> None:
            bg: list[Any] = [b.generate(prompt(context, seed + i), SamplingParams(max_tokens=long_out, temperature=0.0,
                                                                        ignore_eos=True)) for i in range(d)]
            # the first background sequence's tokens, one per step it is in; waited on, never polled (a driver
            # spinning beside the worker slows its steps: on one H200 host decodes of 2 ran 27 ms against 17 ms)
            seen, tick = [0], asyncio.Event()

            async def count(g: Any) -> None:
                try:
                    async for ev in g:
                        seen[0] += len(ev.tokens)
                        tick.set()
                finally:
                    tick.set()   # finished (or cancelled): nobody waits for more

            async def steps_of_bg(n: int) -> None:
                while seen[0] < n and counter is not None and not counter.done():
                    tick.clear()
                    await asyncio.wait_for(tick.wait(), 120.0)

            counter = None
            try:
                for g in bg:   # every background sequence has its first token: they are decoding now
                    await g.__anext__()
                if bg:
                    counter = asyncio.ensure_future(count(bg[0]))
                for j, (k, p) in enumerate(inject):
                    k0 = len(b.steps)
                    new = [b.generate(prompt(p, seed + 1000 + 17 * j + i),
                                      SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)) for i in range(k)]
                    await asyncio.gather(*(_drain(g) for g in new))
                    if bg:
                        await steps_of_bg(seen[0] + between)
                    rows.extend(step_rows(list(b.steps)[k0:], decodes=d, k=k, prompt=p))
            finally:
                if counter is not None:
                    counter.cancel()
                    await asyncio.gather(counter, return_exceptions=True)
                for g in bg:
                    await g.aclose()   # aborts the request: its pages are freed
                await _idle(b)         # the aborted sequences' last step is not the next point's

        async def sweep() -> None:
            await point(2, 0)   # warm-up: first calls allocate
            rows.clear()
            for n in range(passes):
                for i, d in enumerate(decodes if n % 2 == 0 else decodes[::-1]):
                    await point(d, 100 * (i + 1) + 10_000 * n)

        asyncio.run(sweep())
    return pd.DataFrame(rows)


def trace_run(checkpoint: str, traffic: str, **spec: Any) -> dict[str, Any]:
    """A colocated serving run (the real HTTP server, the traffic benchmark's client) with everything logged:
    {'steps': every engine step (`step_rows`), 'requests': per request the times (seconds since the backend
    started) it was submitted to the worker, reached the engine, its first step ran, its first token came back,
    'ttft': where the mean time to first token went (ms): `http` (the client's TTFT − the server's), `pipe_in` (the
    hand-off to the worker until the worker read it: it reads between steps, so mostly the running step's remainder),
    `engine_wait` (read → its first step starts), `own_step`, `pipe_out` (step end → the front end's reader) and
    `reader_to_handler`; 'metrics'}."""
    with served(checkpoint, initial_test=False, **spec) as (svc, drive):
        b = svc.backend
        drive("concurrency=1,isl=8,osl=4,requests=2")   # warm-up
        k0, r0, q0 = len(b.steps), len(svc.app.records), len(b.request_log)
        res = drive(traffic)
        st = pd.DataFrame(step_rows(list(b.steps)[k0:]))
        req = pd.DataFrame(list(b.request_log)[q0:])
        server = pd.DataFrame(list(svc.app.records)[r0:])
    ok = res.requests[res.requests["success"]] if "success" in res.requests else res.requests
    ms = 1e3
    parts = {"client_ttft": float(ok["ttft"].mean()) * ms, "server_ttft": float(server["ttft"].astype(float).mean()) * ms,
             "pipe_in": float((req["t_engine"] - req["t_submit"]).mean()) * ms,
             "engine_wait": float((req["step_t0"] - req["t_engine"]).mean()) * ms,
             "own_step": float((req["step_t1"] - req["step_t0"]).mean()) * ms,
             "pipe_out": float((req["t_first"] - req["step_t1"]).mean()) * ms}
    parts["http"] = parts["client_ttft"] - parts["server_ttft"]
    parts["reader_to_handler"] = parts["server_ttft"] - float((req["t_first"] - req["t_submit"]).mean()) * ms
    return {"steps": st, "requests": req, "ttft": parts,
            "metrics": {k: v for k, v in res.metrics.items() if not isinstance(v, dict)}}


def measure_steps(checkpoint: str, batches: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16),
                  prompts: tuple[int, ...] = (16, 48, 128), output: int = 10, repeat: int = 1, http: bool = False,
                  backend: Any = None, **spec: Any) -> pd.DataFrame:
    """Engine steps of the real worker process for batches of `batches` sequences with prompts of `prompts`
    tokens each, `output` tokens each; one row per step: tokens, seqs, seconds (the step), gap (the worker loop
    before the next step; NaN after a batch's last step), period = seconds + gap, and the shape.

    `http=False`: driven through the worker's pipe only (the engine alone). `http=True`: the same batches as
    streaming requests through the real HTTP server and the traffic benchmark's client (all of a batch sent
    at once), so the front end's CPU work (parsing, tokenising, streaming every token) runs beside the steps
    as it does in a serving run; on a small machine it slows them. `backend`: a running colocated `Backend` to
    drive (pipe only) instead of starting one."""
    rows: list[dict[str, Any]] = []

    def log(got: list[dict[str, Any]], n: int, plen: int) -> None:
        rows.extend(step_rows(got, batch=n, prompt=plen))

    shapes = [(n, plen) for _ in range(repeat) for plen in prompts for n in batches]
    if http:
        with served(checkpoint, initial_test=False, **spec) as (svc, drive):
            drive(f"rate=inf,isl=8,osl={output},requests=2")  # warm-up
            for n, plen in shapes:
                k0 = len(svc.backend.steps)
                drive(f"rate=inf,isl={plen},osl={output},requests={n}")
                log(list(svc.backend.steps)[k0:], n, plen)
        return pd.DataFrame(rows)

    from contextlib import nullcontext

    from workbench.serve.backend import Backend
    from workbench.serve.sampling import SamplingParams

    with (nullcontext(backend) if backend is not None else Backend(checkpoint, "colocated", **spec)) as backend:
        async def batch(n: int, plen: int, seed: int) -> None:
            params = SamplingParams(max_tokens=output, temperature=0.0, ignore_eos=True)
            gens = [backend.generate([(seed * 31 + i * 7 + j) % 200 + 1 for j in range(plen)], params)
                    for i in range(n)]

            async def drain(g: Any) -> None:
                async for _ in g:
                    pass

            await asyncio.gather(*(drain(g) for g in gens))

        async def sweep() -> None:
            await batch(2, 8, 0)  # warm-up: first calls allocate
            for i, (n, plen) in enumerate(shapes):
                k0 = len(backend.steps)
                await batch(n, plen, i)
                log(list(backend.steps)[k0:], n, plen)

        asyncio.run(sweep())
    return pd.DataFrame(rows)


def _turnarounds(rows: pd.DataFrame) -> np.ndarray:
    """A one-at-a-time client's gaps from each request's last token to the next request's send (seconds)."""
    ok = rows[rows["success"]].sort_values("start")
    start = ok["start"].to_numpy(float)
    end = start + ok["e2el"].to_numpy(float)
    return start[1:] - end[:-1]


def measure_overheads(checkpoint: str, requests: int = 24, output: int = 16, **spec: Any) -> dict[str, float]:
    """Per-request and per-output-token costs outside the engine, through the real HTTP server and the
    traffic benchmark's client (one request at a time): {'request_us': median over requests of the client's
    TTFT − the engine's one step of a one-token prompt, 'token_us': median of the client's TPOT − the engine's
    decode step period, 'server_request_us': the part of request_us after the server took the request,
    'turnaround_us': median time from a request's last token (as the client sees it) to its next request's send:
    the end of the stream, the client's accounting, the next request's start}."""
    with served(checkpoint, initial_test=False, **spec) as (svc, drive):
        b = svc.backend

        def run(osl: int, n: int) -> tuple[pd.DataFrame, list[dict[str, Any]], list[dict[str, Any]]]:
            k0, r0 = len(b.steps), len(svc.app.records)
            res = drive(f"concurrency=1,isl=1,osl={osl},requests={n}")
            return res.requests, list(b.steps)[k0:], list(svc.app.records)[r0:]

        run(1, 4)  # warm-up
        one, st1, rec1 = run(1, requests)
        ok = one["success"].to_numpy(bool)
        if len(st1) != len(one) or len(rec1) != len(one) or ok.sum() < len(one) // 2:
            why = one.loc[~ok, "error"].value_counts().to_dict() if "error" in one else {}
            raise WorkbenchError(f"measure_overheads: {len(one)} one-token requests made {len(st1)} engine steps and "
                                 f"{int(ok.sum())} successes (expected one step each, most succeeding; failures: "
                                 f"{why}); is the server shared?")
        step1 = np.array([s["t1"] - s["t0"] for s in st1])[ok]
        ttft = one["ttft"].to_numpy(float)[ok]
        server = np.array([r["ttft"] if r["ttft"] is not None else np.nan for r in rec1], float)[ok]
        many, stn, _ = run(output, max(requests // 4, 4))
        dec = pd.DataFrame(stn)
        dec = dec[(dec["batch_tokens"] == 1) & (dec["running"] > 0)]
        period = float(np.median(np.diff(dec["t0"].to_numpy(float)))) if len(dec) > 2 else float("nan")
        tpot = float(np.median(many["tpot"].to_numpy(float)))
    turn = np.concatenate([_turnarounds(one), _turnarounds(many)])
    return {"request_us": float(np.median(ttft - step1)) * 1e6,
            "turnaround_us": float(np.median(turn)) * 1e6 if len(turn) else float("nan"),
            "server_request_us": float(np.nanmedian(server - step1)) * 1e6,
            "token_us": (tpot - period) * 1e6, "engine_step_1tok_us": float(np.median(step1)) * 1e6,
            "decode_period_us": period * 1e6, "client_tpot_us": tpot * 1e6, "requests": float(len(one)),
            "cpu_count": float(os.cpu_count() or 0), "load_average": float(os.getloadavg()[0]), "when": time.time()}


# ====================================================================== the front end, measured on its own
FRONTEND_RUNS = ((1, 1, 12), (1, 24, 6), (2, 48, 6), (4, 1, 16), (4, 24, 12), (8, 1, 24), (8, 8, 16), (8, 32, 16))


def measure_frontend(checkpoint: str, runs: tuple[tuple[int, int, int], ...] = FRONTEND_RUNS, isl: int = 16,
                     repeats: int = 3, **spec: Any) -> dict[str, float]:
    """The front end's CPU cost (the server process: HTTP, parsing, tokenising, the pipe to the worker and back,
    detokenising, SSE), measured as this process's CPU time (the engine runs in its worker process and the
    traffic benchmark's client in its own, so neither is counted) over closed-loop runs of (concurrency, output
    tokens, requests) against the real server. The idle process's CPU per second is taken off, then least squares
    `cpu = a·requests + b·tokens + c·steps + d` (d: a run's fixed cost: the model list, the connections opened)
    over each run's median of `repeats` passes (the runs in alternation: a passing disturbance of a shared
    machine moves one pass, not the fit; `spread`: the largest of the runs' max/min CPU over their passes).
    {'fe_request_us': a, 'fe_token_us': b, 'fe_step_us': c, 'fe_run_us': d, 'idle_cpu_per_s', 'r2', 'runs',
    'repeats', 'spread'}; and the same fit of the client's CPU in its process (its work before the clock taken off:
    `client_request_us`, `client_token_us`, `client_step_us`, `client_r2`): its own load, which the serving
    simulator does not model (it is another process, on another core where the machine has one)."""
    from scipy.optimize import nnls

    rows = []
    with served(checkpoint, initial_test=False, **spec) as (svc, drive):
        b = svc.backend

        def one(c: int, osl: int, n: int) -> tuple[float, float, float, float, float, float]:
            k0, c0, w0 = len(b.steps), time.process_time(), time.perf_counter()
            res = drive(f"concurrency={c},isl={isl},osl={osl},requests={n}")
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            client = float(res.meta.get("client_cpu_s", np.nan)) - float(res.meta.get("setup_cpu_s", 0.0))
            ok = res.requests[res.requests["success"]]
            return float(len(ok)), float(ok["output_tokens"].sum()), float(len(b.steps) - k0), cpu, wall, client

        one(2, 4, 4)  # warm-up
        c0, w0 = time.process_time(), time.perf_counter()
        time.sleep(1.0)
        idle = (time.process_time() - c0) / (time.perf_counter() - w0)
        for _ in range(max(1, repeats)):
            for j, (c, osl, n) in enumerate(runs):
                req, tok, nsteps, cpu, wall, client = one(c, osl, n)
                rows.append({"run": j, "concurrency": c, "osl": osl, "requests": req, "tokens": tok, "steps": nsteps,
                             "cpu_s": cpu, "client_cpu_s": client, "wall_s": wall,
                             "load_average": os.getloadavg()[0]})
    passes = pd.DataFrame(rows)
    df = passes.groupby("run").median()
    cpu_of = passes.groupby("run")["cpu_s"]
    spread = float((cpu_of.max() / cpu_of.min().clip(lower=1e-9)).max())
    A = df[["requests", "tokens", "steps"]].assign(run=1.0).to_numpy(float)

    def fit(y: np.ndarray) -> tuple[np.ndarray, float]:
        x, _ = nnls(A, y)
        pred = A @ x
        return x, 1.0 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))

    x, r2 = fit((df["cpu_s"] - idle * df["wall_s"]).to_numpy(float))
    xc, r2c = fit(df["client_cpu_s"].to_numpy(float))  # the traffic client's own (no idle work of its own)
    return {"fe_request_us": float(x[0]) * 1e6, "fe_token_us": float(x[1]) * 1e6, "fe_step_us": float(x[2]) * 1e6,
            "fe_run_us": float(x[3]) * 1e6, "idle_cpu_per_s": idle, "r2": r2,
            "client_request_us": float(xc[0]) * 1e6, "client_token_us": float(xc[1]) * 1e6,
            "client_step_us": float(xc[2]) * 1e6, "client_r2": r2c,
            "runs": float(len(df)), "repeats": float(max(1, repeats)), "spread": spread,
            "cpu_count": float(os.cpu_count() or 0),
            "load_average": float(os.getloadavg()[0]), "when": time.time()}


def measure_slowdown(checkpoint: str, batches: tuple[int, ...] = (1, 4, 8, 16), prompts: tuple[int, ...] = (16, 64),
                     cycles: int = 2, **spec: Any) -> dict[str, Any]:
    """How much slower the engine's steps run while the front end is busy: the engine alone (through its pipe,
    `measure_steps`) without, with, and again without a process that keeps one core busy (what a saturated
    front end does: one Python process, one core at most). `fe_slowdown` = Σ periods with / mean Σ without − 1
    over the same batch shapes (≥ 0); 0 where the machine has a core to spare."""
    import subprocess
    import sys

    def total(df: pd.DataFrame) -> pd.Series:
        return df.dropna(subset=["period"]).groupby(["batch", "prompt"])["period"].sum()

    from workbench.serve.backend import Backend

    with Backend(checkpoint, "colocated", **spec) as b:
        offs, ons = [total(measure_steps(checkpoint, batches, prompts, backend=b))], []
        for _ in range(cycles):  # off, on, off, on, off: the machine drifts; each "on" against its neighbours
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                ons.append(total(measure_steps(checkpoint, batches, prompts, backend=b)))
            finally:
                burner.kill()
                burner.wait(10)
            offs.append(total(measure_steps(checkpoint, batches, prompts, backend=b)))
    keys = offs[0].index
    for x in offs[1:] + ons:
        keys = keys.intersection(x.index)
    ratios = [float(on[keys].sum() / ((offs[i][keys].sum() + offs[i + 1][keys].sum()) / 2)) for i, on in enumerate(ons)]
    ratio = float(np.median(ratios))
    return {"fe_slowdown": max(ratio - 1.0, 0.0), "ratio": ratio, "ratios": ratios,
            "off_drift": float(offs[-1][keys].sum() / offs[0][keys].sum()),
            "shapes": float(len(keys)), "cpu_count": float(os.cpu_count() or 0), "load_average": float(os.getloadavg()[0]),
            "when": time.time()}
