"""Calibrate the serving simulator from microbenchmarks of the real server and its engine's step logs.

Each cost outside the model's arithmetic is measured on its own, never fitted to the end-to-end
TTFT/TPOT/throughput that the calibrated simulator then predicts:

- the engine step, per worker role: `measure_steps` drives the real worker process with batches of 1..N
  sequences and prompts of several lengths, through its pipe alone (the engine) or as streaming requests
  through the HTTP server (the engine beside its front end); each step's duration and the worker loop's gap
  before the next step are logged. A least-squares fit `period = s_r + q_r·seqs [+ c_r·chunks] + sim_r(tokens; rates / k)` against
  the simulator's price of the same batch gives per role r (colocated; or a disaggregated run's prefill and
  decode workers, each fitted on its own steps) a per-step host cost `s` (plan `scheduler_us`, or
  `prefill_/decode_scheduler_us`), a per-sequence cost `q` (`seq_us`: Python per sequence, sampling, page
  tables), where the steps' compositions were logged a cost `c` per prefill chunk (`chunk_us`: the engine's
  prefill attention runs per chunk) and one rate factor `k` (the node's compute and memory rates divided
  by `k`). With a microbenchmark, its shape is scaled by one contention factor from the calibration run's own
  busy steps (the machine is shared);
- the KV hand-off of a disaggregated run (`kv_handoff`): how long each transfer ran past the prefill step that
  issued it, against the layer's bytes: plan `kv_us` and `kv_GBps`;
- the front end (`measure_frontend`, `measure_slowdown`): the server process's CPU per request, per engine step
  and per streamed token, and the engine's slowdown while a core is kept busy: plan `fe_*`, a mechanism of the
  serving kernel (a request waits behind the front end's backlog, tokens reach clients after it, steps slow
  while it is busy); `request_us` is then the hop of one request alone (`measure_overheads`). The front end's
  CPU per request is split by where it was measured to fit: inside that hop, before the engine
  (`fe_request_us`); inside a one-at-a-time client's turnaround from a last token to its next send, after the
  request's last token (`fe_finish_us`: closing the stream, the client's accounting); the rest off every
  request's path (`fe_async_us`: it delays only the work queued behind it).
  Without them, `request_us` is the calibration run's HTTP hop (the clients' mean TTFT minus the server's) plus the part
  between the request handler and the engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError

# ====================================================================== the calibration run's steps
ROLES = ("colocated", "prefill", "decode")
#: a step's composition as the engine logs it (`Engine.last_step`) and the simulator prices it
COMPOSITION = ("prefill_seqs", "prefill_tokens", "prefill_work", "decode_seqs", "decode_kv", "sampled")


def step_roles(measured: Any, job: Any = None) -> dict[int, str]:
    """The role of each worker rank that logged engine steps: a `worker` column's name where the events have
    one ("prefill-0", "decode0"), else the plan's order (disaggregated: prefill workers first, as the server
    and the simulator number them), else colocated."""
    ev = measured.events
    s = ev[(ev["kind"] == "compute") & ev["op"].isin(["prefill", "decode", "mixed"]) & (ev["rank"] >= 0)]
    ranks = sorted(int(r) for r in s["rank"].unique())
    if "worker" in s.columns and s["worker"].notna().all():
        named = s.groupby("rank")["worker"].first()
        out = {int(r): next((x for x in ROLES if str(w).startswith(x)), "") for r, w in named.items()}
        if all(out.values()):
            return out
    plan = getattr(job if job is not None else getattr(measured, "job", None), "plan", None)
    if plan is not None and getattr(plan, "disaggregated", False):
        return {r: "prefill" if i < plan.prefill_workers else "decode" for i, r in enumerate(ranks)}
    return dict.fromkeys(ranks, "colocated")


def steps(measured: Any, job: Any = None) -> pd.DataFrame:
    """The engine steps of a measured serving run, every worker's (its rank and role): tokens, seqs, seconds,
    and `period` (start of the worker's next step − start of this one) where the worker was busy after the
    step (KV pages still held), NaN where it went idle. A prefill worker's pages stay held while its KV is in
    flight, idle or not, so its period is the step itself."""
    ev = measured.events
    s = ev[(ev["kind"] == "compute") & ev["op"].isin(["prefill", "decode", "mixed"]) & (ev["rank"] >= 0)]
    if s.empty or "batch_tokens" not in s.columns:
        raise WorkbenchError("measured: the Result has no engine steps (a serving run's Result is needed)")
    roles = step_roles(measured, job)
    parts = []
    for rank, g in s.groupby("rank"):
        g = g.sort_values("start")
        start, end = g["start"].to_numpy(float), g["end"].to_numpy(float)
        role = roles.get(int(rank), "colocated")
        if role == "prefill":
            period = end - start
        else:
            period = np.append(start[1:] - start[:-1], np.nan)
            period[~_busy_after(measured, end, int(rank))] = np.nan
            if "run" in g.columns:   # pooled runs: a run's last step has no period (the next step is another run's)
                run = g["run"].to_numpy()
                period[:-1][run[1:] != run[:-1]] = np.nan
        part = pd.DataFrame({"tokens": g["batch_tokens"].astype(float).to_numpy(),
                             "seqs": g["batch_seqs"].astype(float).to_numpy(), "seconds": end - start,
                             "period": period, "rank": int(rank), "role": role, "start": start, "end": end})
        for c in COMPOSITION:   # what the engine logged the step held (runs recorded before it: absent)
            if c in g.columns:
                part[c] = g[c].astype(float).to_numpy()
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _busy_after(measured: Any, ends: np.ndarray, rank: int = 0) -> np.ndarray:
    """Whether sequences held KV pages after each step of `rank` (the memory row logged at its end), i.e. the
    worker loop went straight on to the next step."""
    mem = measured.memory
    if mem is None or mem.empty or "category" not in mem.columns:
        return np.zeros(len(ends), bool)
    kv = mem[(mem["category"] == "kv_cache") & (mem["rank"] == rank)].sort_values("time")
    t, b = kv["time"].to_numpy(float), kv["bytes"].to_numpy(float)
    if not len(t):
        return np.zeros(len(ends), bool)
    i = np.clip(np.searchsorted(t, ends - 1e-9), 0, len(t) - 1)
    return (np.abs(t[i] - ends) < 1e-6) & (b[i] > 0)


def pool_runs(runs: Any) -> Any:
    """One `Result` holding several measured runs of the same serving job, one after another on one clock (each run's
    events, memory, links and request log shifted to start after the one before; each event's `run` says which, so
    that no step's period spans two runs),
    its requests concatenated, its metrics the mean over the runs (counts by reason summed). A machine whose speed drifts between runs is
    measured at a level by runs spread over the whole measurement, alternating with the other levels; calibration and
    comparison then see the level's mean, not the state of one moment. A single run passes through unchanged."""
    from workbench.result import Result

    runs = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    if not runs:
        raise WorkbenchError("measured: no runs to pool (give at least one measured serving Result)")
    if len(runs) == 1:
        return runs[0]
    ev, mem, lk, req, log = [], [], [], [], []
    offset = 0.0
    for i, r in enumerate(runs):
        e = r.events
        t0 = float(e["start"].min()) if len(e) else 0.0
        shift = offset - t0
        ev.append(e.assign(start=e["start"] + shift, end=e["end"] + shift, run=i))
        if r.memory is not None and len(r.memory):
            mem.append(r.memory.assign(time=r.memory["time"] + shift))
        if r.links is not None and len(r.links):
            lk.append(r.links.assign(start=r.links["start"] + shift, end=r.links["end"] + shift))
        q = getattr(r, "requests", None)
        if q is not None and len(q):
            req.append(q)
        g = getattr(r, "request_log", None)
        if g is not None and len(g):
            log.append(g.assign(**{c: g[c] + shift for c in ("t_submit", "t_engine", "step_t0", "step_t1", "t_first",
                                                            "t_end") if c in g}))
        offset += (float(e["end"].max()) - t0 if len(e) else 0.0) + 1.0  # a second apart: idle between runs
    metrics: dict[str, Any] = {}
    for k in runs[0].metrics:
        vals = [r.metrics.get(k) for r in runs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            metrics[k] = float(np.mean(vals))
        elif all(isinstance(v, dict) for v in vals):  # counts by reason (`failures`): every run's, summed
            metrics[k] = {x: sum(v.get(x, 0) for v in vals) for x in dict.fromkeys(x for v in vals for x in v)}
        else:
            metrics[k] = vals[-1]
    metrics["runs"] = len(runs)
    first = runs[0]
    out = Result(pd.concat(ev, ignore_index=True), pd.concat(mem, ignore_index=True) if mem else None,
                 pd.concat(lk, ignore_index=True) if lk else None, metrics, source=first.source,
                 fidelity=first.fidelity, job=first.job)
    if req:
        out.requests = pd.concat(req, ignore_index=True)  # type: ignore[attr-defined]
    if log:
        out.request_log = pd.concat(log, ignore_index=True)  # type: ignore[attr-defined]
    return out


# ====================================================================== the fit
def rated(cluster: Any, k: float) -> Any:
    """`cluster` with its first node's compute and memory rates divided by `k` (a calibration's rate factor: how the
    simulator runs a fitted job)."""
    from workbench.calibration.run import _with_specs

    spec = cluster.nodes[0].gpu_spec
    specs = {f"{p}_tflops": v / k for p, v in spec.peak_tflops} | {"memory_GBps": spec.memory_GBps / k}
    return _with_specs(cluster, **specs)


def _price(job: Any, tokens: np.ndarray, seqs: np.ndarray, role: str = "colocated",
           composition: pd.DataFrame | None = None, rate: float = 1.0, eager_s: float = 0.0) -> np.ndarray:
    """The simulator's price of steps of `tokens` on a worker of `role`, without host terms, on the job's cluster
    with its rates divided by `rate`. With the steps' `composition` (columns `COMPOSITION`, as the engine logged
    them) they are priced as the simulator prices the steps it forms: prefill attention work, decode KV reads, rows
    sampled, decode-only or not; without it, by their tokens alone (prefill work and KV reads ignored). An eager
    step lasts the longer of its GPU work and its launches plus `eager_s` of host time (plan `eager_us`)."""
    gpu, floor, eager = _price_parts(job, tokens, seqs, role, composition, rate)
    return np.where(eager, np.maximum(gpu, floor + eager_s), gpu)


def _price_parts(job: Any, tokens: np.ndarray, seqs: np.ndarray, role: str = "colocated",
                 composition: pd.DataFrame | None = None,
                 rate: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_price`'s parts: each step's GPU time as a graph would run it (its kernels back to back), the host's floor
    for an eager step (its counted kernels' launches), and whether the simulator runs it eagerly."""
    from workbench.sim.serve import workers

    cluster = job.cluster if rate == 1.0 else rated(job.cluster, rate)
    plan = job.plan.with_(replicas=1, scheduler_us=0.0, seq_us=0.0, chunk_us=0.0, prefill_step_us=0.0, eager_us=0.0,
                          request_us=0.0,
                          prefill_scheduler_us=None, prefill_seq_us=None, decode_scheduler_us=None,
                          decode_seq_us=None, cuda_graph=True)
    ws = workers(cluster, job.model, plan)
    w = next((x for x in ws if x.role == role), ws[0])
    n = len(np.asarray(tokens))
    floor = np.full(n, w.cost.kernels * w.cost.pp * w.cost.launch_eager)
    if composition is not None and _has_composition(composition):
        c = composition
        gpu = w.cost.step_seconds(tokens, c["prefill_work"].to_numpy(float), c["decode_kv"].to_numpy(float),
                                  np.maximum(c["sampled"].to_numpy(float), 1.0), np.ones(n, bool))
        return np.asarray(gpu, float), floor, ~graph_steps(job, c, n)
    gpu = w.cost.step_seconds(tokens, 0.0, 0.0, seqs, np.ones(n, bool))
    return np.asarray(gpu, float), floor, np.ones(n, bool)


def _has_composition(t: pd.DataFrame) -> bool:
    return all(c in t.columns for c in COMPOSITION) and bool(t[list(COMPOSITION)].notna().all().all())


def fit_steps(job: Any, table: pd.DataFrame) -> dict[str, float]:
    """Fit `period = s_r + q_r·seqs [+ c_r·chunks + e_r·eager] + sim_r(tokens; rates / k)` by least squares with s, q, c, e ≥ 0 to
    rows of tokens, seqs, period (seconds) and optionally role (and the composition, whose prefill chunks give a cost
    `c_r` per prefill chunk: plan `chunk_us`; without `cuda_graph`, where a role ran steps with and without a prefill
    chunk, a cost `a_r` once per step holding one: plan `prefill_step_us`; and where the plan has `cuda_graph` and a
    role ran both kinds, a cost
    `e_r` per step that is not a graph: plan `eager_us`, see `graph_steps`): a per-step cost `s_r` and a per-sequence cost `q_r` for each worker
    role (prefill and decode workers run different loops), one rate factor `k` (the same cores or GPUs) applied as
    the simulator applies it: the cluster's compute and memory rates divided by `k`, so the parts of a step that
    do not scale with them (the kernel launches) stay as they are. `k` is searched (a grid, then bounded Brent on log k), s
    q (and c) solved by non-negative least squares at each. Returns
    {'scheduler_us', 'seq_us', 'chunk_us', 'prefill_step_us', 'eager_us', 'rate_factor', 'r2', 'steps',
    'median_abs_error'} and, per role,
    '{role}_scheduler_us', '{role}_seq_us', '{role}_chunk_us' (the plain keys hold the colocated or else the decode
    worker's; `chunk_us` the colocated or else the prefill worker's).

    Plain least squares on purpose: end-to-end metrics add steps up, so the fit must match their mean
    (slow steps when another process takes the CPU included), not their median."""
    from scipy.optimize import nnls

    t = table.dropna(subset=["period"])
    t = t[(t["period"] > 0) & (t["seqs"] > 0)]
    if len(t) < 4:
        raise WorkbenchError(f"measured: {len(t)} busy engine steps; at least 4 are needed to fit the step cost "
                             "(run more requests, or at a concurrency above 1)")
    role = t["role"].astype(str).to_numpy() if "role" in t.columns else np.full(len(t), "colocated")
    present = [r for r in ROLES if (role == r).any()]
    y = t["period"].to_numpy(float)
    seqs = t["seqs"].to_numpy(float)
    tokens = t["tokens"].to_numpy(float)
    comp = t if _has_composition(t) else None
    masks = [role == r for r in present]
    # per role: a cost per step, per sequence and (where the steps' compositions say) per prefill chunk, and per
    # step that is not a CUDA graph where a role ran both kinds (the plan's `cuda_graph`: decode-only steps)
    chunks = comp["prefill_seqs"].to_numpy(float) if comp is not None else None
    graph = graph_steps(job, comp, len(t))
    cols: list[np.ndarray] = []
    names: list[tuple[str, str]] = []
    for r, m in zip(present, masks):
        cols += [m.astype(float), seqs * m]
        names += [(r, "scheduler_us"), (r, "seq_us")]
        if chunks is not None:
            cols.append(chunks * m)
            names.append((r, "chunk_us"))
            has = chunks > 0
            if not job.plan.cuda_graph and has[m].any() and not has[m].all():
                # without CUDA graphs: a step that holds a prefill chunk costs the host a set-up of its own, once,
                # whatever its chunks (the 2-vCPU VM's sweep: a 16-token chunk added ~3.5 ms to a decode step, a
                # second chunk of 48 far less than the first); with graphs `eager_us` is that term
                cols.append(has * m)
                names.append((r, "prefill_step_us"))
        if graph[m].any() and not graph[m].all():
            cols.append((~graph).astype(float) * m)
            names.append((r, "eager_us"))
    H = np.stack(cols, axis=1)

    def parts(k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gpu, floor, eager = np.zeros(len(t)), np.zeros(len(t)), np.zeros(len(t), bool)
        for r, m in zip(present, masks):
            gpu[m], floor[m], eager[m] = _price_parts(job, tokens[m], seqs[m], r, None if comp is None else comp[m],
                                                      rate=k)
        return gpu, floor, eager

    e_cols = [i for i, (_, name) in enumerate(names) if name == "eager_us"]
    # one worker that ran both kinds of step: at each rate factor, the terms every step has (per step, per
    # sequence) from its graph steps alone, which hold nothing else, and the eager steps' own terms (per chunk,
    # per step) from what is left of those (fitted together, the eager steps' host time, which drifts with the
    # host's state, leaked into the per-sequence cost: 91 µs a sequence on one H200 against 36 for its graph
    # steps). The rate factor still from every step: decode steps alone hardly tell a slower GPU from a longer
    # per-step cost (their weight reads change little with the batch).
    staged = len(present) == 1 and bool(e_cols) and int(graph.sum()) >= 2
    common = [i for i, (_, name) in enumerate(names) if name in ("scheduler_us", "seq_us")]
    own = [i for i in range(len(names)) if i not in common]

    def lsq(Hk: np.ndarray, res: np.ndarray) -> np.ndarray:
        if not staged:
            return np.asarray(nnls(Hk, res)[0])
        x = np.zeros(Hk.shape[1])
        x[common] = nnls(Hk[graph][:, common], res[graph])[0]
        x[own] = nnls(Hk[~graph][:, own], res[~graph] - Hk[~graph][:, common] @ x[common])[0]
        return x

    def solve(k: float) -> tuple[np.ndarray, np.ndarray]:
        """(s, q, c, e per role; the prediction) at rate factor k. An eager step lasts the longer of the GPU's
        work and the host's launches (the counted ones, and `e` beyond them): where the host is the longer, `e`
        adds to its floor, else it is hidden (the fit's column for it is 0 there, found by a few rounds)."""
        gpu, floor, eager = parts(k)
        Hk = H.copy()
        host = eager.copy()
        for _ in range(4):
            sim = np.where(host, floor, np.where(eager, np.maximum(gpu, floor), gpu))
            for i in e_cols:
                Hk[:, i] = H[:, i] * host
            x = lsq(Hk, y - sim)
            e = sum(x[i] * H[:, i] for i in e_cols) if e_cols else np.zeros(len(t))
            now = eager & (gpu < floor + e)
            if (now == host).all():
                break
            host = now
        return x, Hk @ x + sim

    def loss(logk: float) -> float:
        _, pred = solve(float(np.exp(logk)))
        return float(((y - pred) ** 2).sum())

    k = float(np.exp(_argmin(loss, np.log(K_RANGE[0]), np.log(K_RANGE[1]))))
    if loss(0.0) <= loss(np.log(k)) * (1 + 1e-9):  # the steps do not tell (e.g. they do not grow with their tokens)
        k = 1.0  # keep the node's rates
    x, pred = solve(k)
    r2 = 1.0 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    out: dict[str, float] = {"rate_factor": k, "r2": r2, "steps": float(len(t)),
                             "median_abs_error": float(np.median(np.abs(pred - y) / y))}
    for r in present:
        out |= {f"{r}_chunk_us": 0.0, f"{r}_prefill_step_us": 0.0, f"{r}_eager_us": 0.0,
                f"{r}_steps": float((role == r).sum())}
    for (r, name), v in zip(names, x):
        out[f"{r}_{name}"] = float(v) * 1e6
    main = "colocated" if "colocated" in present else present[-1]
    out["scheduler_us"], out["seq_us"] = out[f"{main}_scheduler_us"], out[f"{main}_seq_us"]
    # plan-level terms: the prefill chunks run on the colocated worker, or on the prefill workers; the eager steps'
    # own cost is the colocated worker's or the decode workers' (a prefill worker's steps are all eager: theirs is
    # in its per-step term, from which the plan's eager_us, charged on them too, comes out)
    out["chunk_us"] = out.get("colocated_chunk_us", out.get("prefill_chunk_us", 0.0))
    out["prefill_step_us"] = out.get("colocated_prefill_step_us", 0.0)  # a prefill worker's steps all hold one
    out["eager_us"] = out.get("colocated_eager_us", out.get("decode_eager_us", 0.0))
    if "prefill" in present and out["eager_us"] > 0:
        out["prefill_scheduler_us"] = max(out["prefill_scheduler_us"] - out["eager_us"], 0.0)
    return out


def graph_steps(job: Any, comp: pd.DataFrame | None, n: int) -> np.ndarray:
    """Which of `n` steps the simulator prices as CUDA graphs: decode-only ones (no prefill chunk, by their
    composition) where the job's plan says `cuda_graph` (the engine replays those: `workbench.serve.graphs`)."""
    if comp is None or not job.plan.cuda_graph:
        return np.zeros(n, bool)
    return comp["prefill_seqs"].to_numpy(float) == 0


K_RANGE = (0.02, 500.0)  # the rate factors searched: 50x faster to 500x slower than the cluster's rates


def _argmin(f: Any, a: float, b: float, coarse: int = 13) -> float:
    """The argmin of `f` over [a, b]: the best of `coarse` evenly spaced points, then SciPy's bounded Brent search
    between its neighbours (the loss need not be unimodal over the whole range)."""
    from scipy.optimize import minimize_scalar

    xs = np.linspace(a, b, coarse)
    fs = [f(float(v)) for v in xs]
    i = int(np.argmin(fs))
    lo, hi = float(xs[max(i - 1, 0)]), float(xs[min(i + 1, coarse - 1)])
    r = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(r.x) if float(r.fun) < fs[i] else float(xs[i])


def _root(f: Any, a: float, b: float) -> float:
    """The root of an increasing `f` in [a, b] (SciPy's Brent), or the end nearer to it where there is none."""
    from scipy.optimize import brentq

    fa, fb = f(a), f(b)
    if fa >= 0:
        return a
    if fb <= 0:
        return b
    return float(brentq(f, a, b, xtol=1e-6))


#: the plan's step-cost terms a fit gives (`fit_steps`), as `calibrate_job` sets them
STEP_TERMS = ("scheduler_us", "seq_us", "chunk_us", "prefill_step_us", "eager_us")


def _scale(f: dict[str, float], lam: float, eager: float | None = None) -> dict[str, float]:
    """A fit with every time term multiplied by `lam` (the machine's contention at another moment), or with `eager`
    the eager steps' own terms (`chunk_us`, `prefill_step_us`, `eager_us`) by that instead."""
    own = lam if eager is None else eager
    return {k: (v * own if k.endswith(("chunk_us", "prefill_step_us", "eager_us")) else
                v * lam if k.endswith(("scheduler_us", "seq_us")) or k == "rate_factor" else v) for k, v in f.items()}


def fit(job: Any, measured: Any, micro: pd.DataFrame | None = None) -> dict[str, float]:
    """The step cost of `measured`'s engine, per worker role. Without `micro`: `fit_steps` over the run's busy
    steps. With a `measure_steps` table (a colocated worker): its wider range of batch shapes gives the shape
    (s, q, k), and the run's own steps one factor `contention` = Σ measured periods / Σ predicted over them,
    which scales all three (the machine is shared: the microbenchmark ran at another moment than the run). With
    CUDA graphs and both kinds of step in the run, two: `contention_graph` from the decode-only steps scales the
    terms every step has, `contention_eager` from the others the eager steps' own (`chunk_us`, `eager_us`).
    A disaggregated run
    is fitted on its own steps (the microbenchmark is of a colocated worker). `measured`: one run, or a list of runs
    of the job (`pool_runs`)."""
    st = steps(pool_runs(measured), job)
    extra = [c for c in COMPOSITION if c in st.columns]
    run = st[["tokens", "seqs", "period", "role", *extra]]
    disagg = bool((st["role"] != "colocated").any())
    if micro is None or not len(micro) or disagg:
        if run["period"].notna().sum() < 4:  # a short run: the steps' durations (the loop's gaps unseen)
            run = st[["tokens", "seqs", "role", *extra]].assign(period=st["seconds"])
        return fit_steps(job, run)
    # the microbenchmark and the run are priced alike: by their compositions where both logged them
    both = _has_composition(micro) and _has_composition(run.dropna(subset=["period"]))
    keep = ["tokens", "seqs", "period", *(COMPOSITION if both else ())]
    f = fit_steps(job, micro[keep])
    return with_contention(job, f, run, both)


def with_contention(job: Any, f: dict[str, float], run: pd.DataFrame, both: bool = True) -> dict[str, float]:
    """`f` (a `fit_steps` of a microbenchmark) scaled to the machine's state during `run`, a table of the run's
    steps (tokens, seqs, period and, with `both`, their composition): see `fit`."""
    r = run.dropna(subset=["period"])
    r = r[(r["period"] > 0) & (r["seqs"] > 0)]
    if len(r) < 4:
        return f | {"contention": 1.0, "run_steps": float(len(r))}
    seqs, tokens = r["seqs"].to_numpy(float), r["tokens"].to_numpy(float)
    period = r["period"].to_numpy(float)
    comp = r if both else None
    chunks = r["prefill_seqs"].to_numpy(float) if both else np.zeros(len(r))
    eager_s = f.get("eager_us", 0.0) * 1e-6

    def factor(m: np.ndarray, common: float | None = None) -> float:
        """The contention at which the steps `m` of the run, as the simulator prices them, sum to their measured
        periods: every term scaled by it, or (`common` given) the terms every step has (scheduler, sequences,
        rates) by `common` and an eager step's own ones (its prefill chunks' cost and `eager_us`) by it."""
        c = comp[m] if comp is not None else None

        def excess(loglam: float) -> float:
            le = float(np.exp(loglam))
            lm = le if common is None else common
            host = ((f["scheduler_us"] + f["seq_us"] * seqs[m]) * lm
                    + (f.get("chunk_us", 0.0) * chunks[m] + f.get("prefill_step_us", 0.0) * (chunks[m] > 0)) * le) * 1e-6
            return float(host.sum() + _price(job, tokens[m], seqs[m], composition=c, rate=f["rate_factor"] * lm,
                                             eager_s=eager_s * le).sum()) - float(period[m].sum())

        return float(np.exp(_root(excess, np.log(1 / 50), np.log(50))))

    everything = np.ones(len(r), bool)
    lam = factor(everything)
    out = _scale(f, lam) | {"contention": lam, "run_steps": float(len(r))}
    graph = graph_steps(job, comp, len(r))
    if eager_s > 0 and graph.sum() >= 2 and (~graph).sum() >= 2:
        # CUDA graphs: a graph step is GPU work behind a little host time, an eager step is mostly the host
        # launching kernels, so a shared machine's state (a busier or slower host) moves the two apart (one H200
        # host: the composition sweep's eager steps of one decode and one prompt took 9.0 to 18.7 ms from one
        # pass to the next, its graph steps of one decode 1.8 to 2.6). Two factors: the decode-only steps give
        # the one of the terms every step has, the eager steps the one of their own terms.
        lam_g = factor(graph)
        lam_e = factor(~graph, common=lam_g)
        out = _scale(f, lam_g, eager=lam_e) | {"contention": lam, "contention_graph": lam_g, "contention_eager": lam_e,
                                               "run_steps": float(len(r))}
    return out


def kv_handoff(job: Any, measured: Any) -> dict[str, float]:
    """The KV hand-off as the simulator prices it, from a disaggregated run's `kv_transfer` events: the time
    each transfer ran past the end of the prefill step that issued it (the last layer's write, exposed) against
    that layer's bytes, `tail = a + b·bytes` by least squares (b = 0 when the prompts' sizes hardly vary).
    {'kv_us': a, 'kv_GBps': 1/b in the simulator's KV bytes (the run's KV dtype may differ from the plan's),
    'kv_transfers', 'kv_tail_us' (mean)}; {} without transfers."""
    from scipy.optimize import nnls

    from workbench.sim.serve import workers

    ev = measured.events
    tr = ev[(ev["kind"] == "transfer") & (ev["op"] == "kv_transfer")]
    if tr.empty:
        return {}
    st = steps(measured, job)
    pf = st[st["role"] == "prefill"].sort_values("start")
    if pf.empty:
        return {}
    t0, t1 = tr["start"].to_numpy(float), tr["end"].to_numpy(float)
    i = np.clip(np.searchsorted(pf["start"].to_numpy(float), t0, side="right") - 1, 0, len(pf) - 1)
    tail = np.maximum(t1 - pf["end"].to_numpy(float)[i], 0.0)
    layers = float(job.model.layers)
    per_layer = tr["bytes"].to_numpy(float) / layers
    A = np.stack([np.ones_like(tail), per_layer], axis=1)
    varies = len(tail) >= 3 and per_layer.std() > 0.05 * per_layer.mean()
    x = nnls(A, tail)[0] if varies else np.array([tail.mean(), 0.0])
    out = {"kv_us": float(x[0]) * 1e6, "kv_transfers": float(len(tail)), "kv_tail_us": float(tail.mean()) * 1e6}
    if x[1] > 0:
        # the simulator's bytes for the same prompts (its KV format) over the bytes the run moved
        req = ev[(ev["op"] == "request") & (ev["rank"] == -1)]
        ratio = 1.0
        if "prompt_tokens" in req.columns and req["prompt_tokens"].notna().any():
            w = next(x for x in workers(job.cluster, job.model, job.plan) if x.role == "prefill")
            B = job.plan.block
            toks = -(-req["prompt_tokens"].dropna().to_numpy(float) // B) * B
            ratio = float(toks.mean() * w.cost.kv_bytes_per_token_model() / tr["bytes"].astype(float).mean())
        out["kv_GBps"] = ratio / float(x[1]) / 1e9
        out["kv_bytes_ratio"] = ratio
    return out


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
                  overheads: dict[str, float] | None = None,
                  frontend: dict[str, float] | None = None) -> tuple[Any, dict[str, float]]:
    """The job with its cluster's rates and its plan's host costs fitted from `measured`'s engine steps (per worker
    role; and the `measure_steps` table `micro`), a disaggregated run's KV hand-off (`kv_handoff`), and its
    per-request cost.

    Without `frontend`: `request_us` = the run's HTTP hop (`hop_seconds`) plus, from `measure_overheads`, the part
    between the request handler and the engine. With `frontend` (`measure_frontend` | `measure_slowdown`, each
    measured on its own): the front end is a mechanism of the plan (`fe_*`) and `request_us` is the hop of one
    request alone (`measure_overheads`' client TTFT − step) less the front end's own work for it, so the hop's
    growth with load comes from the front end's backlog, not from the calibration run. `measured`: one run, or a
    list of runs of the job at one load (pooled, `pool_runs`)."""
    measured = pool_runs(measured)
    f = fit(job, measured, micro)

    hop = hop_seconds(measured)
    f["hop_us"] = hop * 1e6 if np.isfinite(hop) else 0.0
    changes: dict[str, Any] = {k: f.get(k, 0.0) for k in STEP_TERMS} | {"replicas": 1}
    if frontend and overheads is not None:
        fe = {x: float(frontend.get(x, 0.0)) for x in ("fe_request_us", "fe_token_us", "fe_step_us", "fe_slowdown")}
        own = fe["fe_step_us"] + fe["fe_token_us"]  # the front end's work for a first token, scheduled by the model
        alone = max(float(overheads["request_us"]) - own, 0.0)  # a request's way in when nothing else runs
        # the front end's CPU per request: what precedes the engine fits inside the hop of a request alone; what
        # follows its last token fits inside the client's turnaround to its next send (measured alone); the rest
        # is off every request's path (queued as the request reaches the engine: it delays only work behind it)
        after = max(fe["fe_request_us"] - alone, 0.0)
        turn = float(overheads.get("turnaround_us", float("nan")))
        fe["fe_finish_us"] = min(after, turn) if np.isfinite(turn) else after
        fe["fe_async_us"] = after - fe["fe_finish_us"]
        fe["fe_request_us"] = min(fe["fe_request_us"], alone)
        f["request_us"] = alone
        f.update(fe)
        changes.update(fe)
        if fe["fe_slowdown"] > 0 and "contention" in f:
            # the run's steps were slowed by its front end as well: the model's own mean slowdown at this load
            # (the same job simulated with and without it) comes out of the machine's contention factor
            f0 = dict(f)
            for _ in range(3):  # the slowdown depends a little on the step costs it rescales: a fixed point
                trial = job.with_cluster(rated(job.cluster, f["rate_factor"])).with_plan(job.plan.with_(**changes))
                e = _mean_slowdown(trial)
                f = _scale(f0, 1.0 / e) | {"contention": f0["contention"] / e, "fe_mean_slowdown": e}
                changes.update({k: f.get(k, 0.0) for k in STEP_TERMS})
    else:
        inner = float(overheads["server_request_us"]) if overheads is not None else 0.0
        f["request_us"] = f["hop_us"] + max(inner, 0.0)
    changes["request_us"] = f["request_us"]
    if job.plan.disaggregated:
        for r in ("prefill", "decode"):
            if f"{r}_scheduler_us" in f:
                changes[f"{r}_scheduler_us"], changes[f"{r}_seq_us"] = f[f"{r}_scheduler_us"], f[f"{r}_seq_us"]
        kv = kv_handoff(job, measured)
        f.update(kv)
        if "kv_us" in kv:
            changes["kv_us"] = kv["kv_us"]
            changes["kv_GBps"] = kv.get("kv_GBps")
    return job.with_cluster(rated(job.cluster, f["rate_factor"])).with_plan(job.plan.with_(**changes)), f


def _mean_slowdown(job: Any) -> float:
    """Σ engine step time of `job` simulated / the same with `fe_slowdown=0`: how much its front end slows the
    engine on average at the job's load."""
    from workbench.core.engines import simulator
    from workbench.sim.serve import step_events

    def busy(j: Any) -> float:
        s = step_events(simulator(j.kind)(j))
        return float((s["end"] - s["start"]).sum())

    slow = job.with_plan(job.plan.with_(fe_slowdown=0.0))
    # the same steps without the slowdown take less time; the ratio is the mean factor at this load
    return max(busy(job) / max(busy(slow), 1e-12), 1.0)


# the microbenchmarks live in workbench.serve.microbench (imported here for older callers)
from workbench.serve.microbench import (  # noqa: E402,F401
    FRONTEND_RUNS,
    measure_compositions,
    measure_frontend,
    measure_overheads,
    measure_slowdown,
    measure_steps,
    trace_run,
)
