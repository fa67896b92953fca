"""Calibrate the serving simulator from microbenchmarks of the real server and its engine's step logs.

Three kinds of host cost sit outside the model's arithmetic on a small CPU server, each measured on
its own (never fitted to the end-to-end TTFT/TPOT/throughput that the calibrated simulator then predicts):

- the engine step: `measure_steps` drives the real worker process with batches of 1..N sequences and
  prompts of several lengths, through its pipe alone (the engine) or as streaming requests through the
  HTTP server (the engine beside its front end, whose CPU work slows the steps on a small machine: the
  shape a serving run sees); each step's duration and the worker loop's gap before the next step
  (sending the tokens back, taking new requests) are logged.
  A least-squares fit `period = s + q·seqs + k·sim(tokens)` against the simulator's price of the same batch
  gives the per-step host cost `s` (plan `scheduler_us`), the per-sequence cost `q` (plan `seq_us`:
  Python per sequence, per-sequence attention calls, sampling, page tables) and a rate factor `k`
  (the node's compute and memory rates divided by `k`). The calibration run's own steps join the fit
  (a step's period is known when sequences still held KV pages after it: the worker went straight on);
- the request (plan `request_us`): the run's HTTP hop, the clients' mean TTFT minus the server's mean TTFT
  over the same requests (timestamps at two hops: no engine time in it), plus the part between the request
  handler and the engine (the pipe both ways), from `measure_overheads`: requests whose engine work is
  one step of one token, one at a time, the server's TTFT minus the engine's step;
- per output token outside the engine: the same with longer outputs (TPOT on the client minus the
  engine's step period); reported, not applied (the front end streams while the engine computes).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError

HOST_TERMS = ("scheduler_us", "seq_us", "request_us")


# ====================================================================== the calibration run's steps
def steps(measured: Any) -> pd.DataFrame:
    """The engine steps of a measured serving run (worker rank 0): tokens, seqs, seconds, and `period`
    (start of the next step − start of this one) where the worker was busy after the step (KV pages
    still held by running sequences), NaN where it went idle."""
    ev = measured.events
    s = ev[(ev["kind"] == "compute") & ev["op"].isin(["prefill", "decode"]) & (ev["rank"] == 0)]
    if s.empty or "batch_tokens" not in s.columns:
        raise WorkbenchError("measured: the Result has no engine steps (a serving run's Result is needed)")
    s = s.sort_values("start")
    start, end = s["start"].to_numpy(float), s["end"].to_numpy(float)
    period = np.append(start[1:] - start[:-1], np.nan)
    busy = _busy_after(measured, end)
    period[~busy] = np.nan
    return pd.DataFrame({"tokens": s["batch_tokens"].astype(float).to_numpy(), "seqs": s["batch_seqs"].astype(float).to_numpy(),
                         "seconds": end - start, "period": period})


def _busy_after(measured: Any, ends: np.ndarray) -> np.ndarray:
    """Whether sequences held KV pages after each step (the memory row logged at its end), i.e. the worker loop
    went straight on to the next step."""
    mem = measured.memory
    if mem is None or mem.empty or "category" not in mem.columns:
        return np.zeros(len(ends), bool)
    kv = mem[(mem["category"] == "kv_cache") & (mem["rank"] == 0)].sort_values("time")
    t, b = kv["time"].to_numpy(float), kv["bytes"].to_numpy(float)
    if not len(t):
        return np.zeros(len(ends), bool)
    i = np.clip(np.searchsorted(t, ends - 1e-9), 0, len(t) - 1)
    return (np.abs(t[i] - ends) < 1e-6) & (b[i] > 0)


# ====================================================================== the fit
def _price(job: Any, tokens: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    """The simulator's price of steps of `tokens` (prefill work and KV reads ignored) without host terms."""
    from workbench.sim.serve import workers

    plan = job.plan.with_(replicas=1, **dict.fromkeys(HOST_TERMS, 0.0))
    cost = workers(job.cluster, job.model, plan)[0].cost
    return np.asarray(cost.step_seconds(tokens, 0.0, 0.0, seqs, False), float)


def fit_steps(job: Any, table: pd.DataFrame) -> dict[str, float]:
    """Fit `period = s + q·seqs + k·sim(tokens)` by least squares with s, q, k ≥ 0 to rows of tokens, seqs and
    period (seconds); {'scheduler_us', 'seq_us', 'rate_factor', 'r2', 'steps', 'median_abs_error'}.

    Plain least squares on purpose: end-to-end metrics add steps up, so the fit must match their mean
    (slow steps when another process takes the CPU included), not their median."""
    from scipy.optimize import nnls

    t = table.dropna(subset=["period"])
    t = t[(t["period"] > 0) & (t["seqs"] > 0)]
    if len(t) < 4:
        raise WorkbenchError(f"measured: {len(t)} busy engine steps; at least 4 are needed to fit the step cost "
                             "(run more requests, or at a concurrency above 1)")
    y = t["period"].to_numpy(float)
    seqs = t["seqs"].to_numpy(float)
    sim = _price(job, t["tokens"].to_numpy(float), seqs)
    A = np.stack([np.ones_like(y), seqs, sim], axis=1)
    x, _ = nnls(A, y)
    s, q, k = (float(v) for v in x)
    if k <= 0:  # the steps do not grow with their tokens here: keep the node's rates
        k = 1.0
        x, _ = nnls(A[:, :2], y - sim)
        s, q = (float(v) for v in x)
    pred = s + q * seqs + k * sim
    r2 = 1.0 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    return {"scheduler_us": s * 1e6, "seq_us": q * 1e6, "rate_factor": k, "r2": r2, "steps": float(len(t)),
            "median_abs_error": float(np.median(np.abs(pred - y) / y))}


def fit(job: Any, measured: Any, micro: pd.DataFrame | None = None) -> dict[str, float]:
    """The step cost of `measured`'s engine. Without `micro`: `fit_steps` over the run's busy steps. With a
    `measure_steps` table: its wider range of batch shapes gives the shape (s, q, k), and the run's own steps
    one factor `contention` = Σ measured periods / Σ predicted over them, which scales all three (the machine
    is shared: the microbenchmark ran at another moment than the run)."""
    st = steps(measured)
    run = st[["tokens", "seqs", "period"]]
    if micro is None or not len(micro):
        if run["period"].notna().sum() < 4:  # a short run: the steps' durations (the loop's gaps unseen)
            run = st[["tokens", "seqs"]].assign(period=st["seconds"])
        return fit_steps(job, run)
    f = fit_steps(job, micro[["tokens", "seqs", "period"]])
    r = run.dropna(subset=["period"])
    r = r[(r["period"] > 0) & (r["seqs"] > 0)]
    lam = 1.0
    if len(r) >= 4:
        seqs = r["seqs"].to_numpy(float)
        pred = (f["scheduler_us"] + f["seq_us"] * seqs) * 1e-6 + f["rate_factor"] * _price(job, r["tokens"].to_numpy(float), seqs)
        lam = float(r["period"].sum() / pred.sum())
    return f | {"scheduler_us": f["scheduler_us"] * lam, "seq_us": f["seq_us"] * lam,
                "rate_factor": f["rate_factor"] * lam, "contention": lam, "run_steps": float(len(r))}


def hop_seconds(measured: Any) -> float:
    """Mean time a request spends between the client and the server's request handler (HTTP both ways,
    parsing, tokenisation, the stream back): the clients' mean TTFT minus the server's mean TTFT (taken from
    the request handler to the first token) over the same requests; NaN without both."""
    ev = measured.events
    req = getattr(measured, "requests", None)
    if ev is None or req is None or "ttft" not in ev.columns or "ttft" not in getattr(req, "columns", ()):
        return float("nan")
    server = ev.loc[(ev["op"] == "request") & (ev["rank"] == -1), "ttft"].astype(float).dropna()
    ok = req[req["success"]] if "success" in req.columns else req
    client = ok["ttft"].astype(float).dropna()
    if not len(server) or not len(client):
        return float("nan")
    return max(float(client.mean() - server.mean()), 0.0)


def calibrate_job(job: Any, measured: Any, micro: pd.DataFrame | None = None,
                  overheads: dict[str, float] | None = None) -> tuple[Any, dict[str, float]]:
    """The job with its cluster's rates and its plan's host costs fitted from `measured`'s engine steps (and
    the `measure_steps` table `micro`), and its per-request cost: the run's HTTP hop (`hop_seconds`) plus,
    from `measure_overheads`, the part between the request handler and the engine (the pipe both ways)."""
    from workbench.calibration.run import _with_specs

    f = fit(job, measured, micro)
    spec = job.cluster.nodes[0].gpu_spec
    k = f["rate_factor"]
    specs = {f"{p}_tflops": v / k for p, v in spec.peak_tflops} | {"memory_GBps": spec.memory_GBps / k}
    cluster = _with_specs(job.cluster, **specs)
    hop = hop_seconds(measured)
    inner = float(overheads["server_request_us"]) if overheads is not None else 0.0
    f["hop_us"] = hop * 1e6 if np.isfinite(hop) else 0.0
    f["request_us"] = f["hop_us"] + max(inner, 0.0)
    changes = {"scheduler_us": f["scheduler_us"], "seq_us": f["seq_us"], "request_us": f["request_us"], "replicas": 1}
    return job.with_cluster(cluster).with_plan(job.plan.with_(**changes)), f


# ====================================================================== microbenchmarks
def measure_steps(checkpoint: str, batches: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16),
                  prompts: tuple[int, ...] = (16, 48, 128), output: int = 10, repeat: int = 1, http: bool = False,
                  **spec: Any) -> pd.DataFrame:
    """Engine steps of the real worker process for batches of `batches` sequences with prompts of `prompts`
    tokens each, `output` tokens each; one row per step: tokens, seqs, seconds (the step), gap (the worker loop
    before the next step; NaN after a batch's last step), period = seconds + gap, and the shape.

    `http=False`: driven through the worker's pipe only (the engine alone). `http=True`: the same batches as
    streaming requests through the real HTTP server and the traffic benchmark's client (all of a batch sent
    at once), so the front end's CPU work (parsing, tokenising, streaming every token) runs beside the steps
    as it does in a serving run; on a small machine it slows them."""
    rows: list[dict[str, Any]] = []

    def log(got: list[dict[str, Any]], n: int, plen: int) -> None:
        for a, b in zip(got, got[1:] + [None]):
            busy = b is not None and (a["running"] > 0 or a["waiting"] > 0)
            gap = (b["t0"] - a["t1"]) if busy and b is not None else float("nan")
            rows.append({"batch": n, "prompt": plen, "tokens": a["batch_tokens"], "seqs": a["batch_seqs"],
                         "seconds": a["t1"] - a["t0"], "gap": gap, "period": a["t1"] - a["t0"] + gap})

    shapes = [(n, plen) for _ in range(repeat) for plen in prompts for n in batches]
    if http:
        from workbench.serve import bench
        from workbench.serve.service import start_service

        with start_service(checkpoint, "colocated", **spec) as svc:
            def drive(n: int, plen: int) -> None:
                asyncio.run(bench.run_async(svc.url, f"rate=inf,isl={plen},osl={output},requests={n}",
                                            progress=False, tokenizer=svc.app.tok))

            drive(2, 8)  # warm-up
            for n, plen in shapes:
                k0 = len(svc.backend.steps)
                drive(n, plen)
                log(list(svc.backend.steps)[k0:], n, plen)
        return pd.DataFrame(rows)

    from workbench.serve.backend import Backend
    from workbench.serve.sampling import SamplingParams

    with Backend(checkpoint, "colocated", **spec) as backend:
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


def measure_overheads(checkpoint: str, requests: int = 24, output: int = 16, **spec: Any) -> dict[str, float]:
    """Per-request and per-output-token costs outside the engine, through the real HTTP server and the
    traffic benchmark's client (one request at a time): {'request_us': median over requests of the client's
    TTFT − the engine's one step of a one-token prompt, 'token_us': median of the client's TPOT − the engine's
    decode step period, 'server_request_us': the part of request_us after the server took the request}."""
    from workbench.serve import bench
    from workbench.serve.service import start_service

    with start_service(checkpoint, "colocated", **spec) as svc:
        b = svc.backend

        def run(osl: int, n: int) -> tuple[pd.DataFrame, list[dict[str, Any]], list[dict[str, Any]]]:
            k0, r0 = len(b.steps), len(svc.app.records)
            res = asyncio.run(bench.run_async(svc.url, f"concurrency=1,isl=1,osl={osl},requests={n}", progress=False,
                                              tokenizer=svc.app.tok))
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
    return {"request_us": float(np.median(ttft - step1)) * 1e6,
            "server_request_us": float(np.nanmedian(server - step1)) * 1e6,
            "token_us": (tpot - period) * 1e6, "engine_step_1tok_us": float(np.median(step1)) * 1e6,
            "decode_period_us": period * 1e6, "client_tpot_us": tpot * 1e6, "requests": float(len(one)),
            "cpu_count": float(os.cpu_count() or 0), "load_average": float(os.getloadavg()[0]), "when": time.time()}
