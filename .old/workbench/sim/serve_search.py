"""Search serving configurations for the best goodput per GPU under SLOs.

Candidates: colocated workers (TP, PP, EP, attention DP, 1, 2, 4, ... replicas up to the cluster) and
disaggregated prefill/decode splits (every prefill:decode ratio of workers of one TP), each at
several batch caps (`max_seqs`, `max_tokens`) and weight precisions the GPU has. Every candidate is
simulated on the same requests (replica 0 standing for identical replicas); the DataFrame keeps
every candidate with the reason it was rejected (does not fit, bad shape, misses the SLO), best first.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.serving import SLO, ServingPlan, Traffic

MEETS = 0.9  # a configuration meets the SLO when this share of its requests meets every target
COLUMNS = ("plan", "mode", "gpus", "tp", "pp", "ep", "dp", "replicas", "prefill_workers", "decode_workers",
           "precision", "max_seqs", "max_tokens", "request_goodput", "goodput_per_gpu", "request_throughput",
           "output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "slo_share",
           "ok", "reason")


def _pow2_upto(x: int) -> list[int]:
    out, v = [], 1
    while v <= x:
        out.append(v)
        v *= 2
    return out


def candidates(cluster: Any, model: Any, max_seqs: tuple[int, ...] = (64, 256, 1024),
               max_tokens: tuple[int, ...] = (2048, 8192), precisions: tuple[str, ...] | None = None,
               disaggregated: bool = True) -> list[ServingPlan]:
    """Plans to try on `cluster` for `model` (shape errors are left to the simulator to report)."""
    from workbench.sim.serve_cost import _check_format

    n = cluster.num_gpus
    per_node = max(nd.gpus for nd in cluster.nodes)
    spec = cluster.gpu_spec(cluster.gpus[0])
    if precisions is None:
        ok = []
        for p in ("bf16", "fp8"):
            try:
                _check_format(spec, p, "plan.precision")
                ok.append(p)
            except WorkbenchError:
                pass
        precisions = tuple(ok) or ("fp16",)
    tps = [t for t in _pow2_upto(min(n, 2 * per_node))]
    out: list[ServingPlan] = []
    for prec in precisions:
        for tp in tps:
            eps = [1] if not model.is_moe else sorted({1, tp})
            dps = [1] if not model.is_mla else sorted({1, tp})
            for pp in (1, 2):
                if tp * pp > n or (pp > 1 and tp * pp > per_node):
                    continue
                for reps in _pow2_upto(n // (tp * pp)):  # fewer replicas: more load on each, fewer GPUs
                    for ep in eps:
                        for dp in dps:
                            for ms in max_seqs:
                                for mt in max_tokens:
                                    if mt < ms:
                                        continue
                                    out.append(ServingPlan(tp=tp, pp=pp, ep=ep, dp=dp, replicas=reps, precision=prec,
                                                           max_seqs=ms, max_tokens=mt))
            workers = n // tp
            if disaggregated and workers >= 2:
                for p_w in range(1, workers):
                    for ep in eps:
                        for ms in max_seqs:
                            out.append(ServingPlan(tp=tp, ep=ep, precision=prec, max_seqs=ms, max_tokens=max_tokens[-1],
                                                   prefill_workers=p_w, prefill_tp=tp, decode_workers=workers - p_w,
                                                   decode_tp=tp))
    return out


def search_serving(cluster: Any, model: Any, traffic: Any, slo: Any = None, top: int | None = None,
                   requests: int = 300, plans: list[ServingPlan] | None = None, **grid: Any) -> pd.DataFrame:
    """Every candidate with its metrics and verdict, best goodput per GPU first (`top`: keep K rows).

    `requests`: how many requests of the traffic each candidate is simulated on (the same ones for all)."""
    from workbench.models.presets import load_model
    from workbench.sim.serve import evaluate
    from workbench.topology.presets import load_cluster

    cluster, model = load_cluster(cluster), load_model(model)
    traffic, slo = Traffic.parse(traffic), SLO.parse(slo)
    if not slo.any:
        raise WorkbenchError("slo: the search ranks by goodput under SLOs; give some, e.g. --slo ttft=2000,tpot=100")
    req = traffic.with_requests(min(traffic.requests, requests)).draw()
    plans = plans if plans is not None else candidates(cluster, model, **grid)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for p in plans:
        row: dict[str, Any] = {"plan": str(p), "mode": "disaggregated" if p.disaggregated else "colocated",
                               "tp": p.tp, "pp": p.pp, "ep": p.ep, "dp": p.dp, "precision": p.precision,
                               "max_seqs": p.max_seqs, "max_tokens": p.max_tokens,
                               "prefill_workers": p.prefill_workers, "decode_workers": p.decode_workers}
        try:
            m = evaluate(cluster, model, p, req, slo)
        except WorkbenchError as exc:
            rows.append({**row, "ok": False, "reason": _short(str(exc))})
            continue
        share = m["request_goodput"] / m["request_throughput"] if m["request_throughput"] else 0.0
        ok = share >= MEETS and m["failed"] == 0
        reason = "" if ok else (f"{m['failed']} requests never fit the KV cache" if m["failed"] else
                                f"misses the SLO ({100 * share:.0f} % of requests meet it)")
        rows.append({**row, "gpus": m["num_gpus"], "replicas": m["num_gpus"] // (p.tp * p.pp) if not p.disaggregated
                     else 0, **{k: m[k] for k in COLUMNS if k in m}, "slo_share": share, "ok": ok, "reason": reason})
    seconds = time.perf_counter() - t0
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[list(COLUMNS)].sort_values(["ok", "goodput_per_gpu", "mean_ttft_ms"], ascending=[False, False, True],
                                       na_position="last")
    df = df.reset_index(drop=True)
    df.attrs.update({"evaluated": len(rows), "ok": int(df["ok"].sum()), "seconds": seconds,
                     "configs_per_s": len(rows) / seconds if seconds > 0 else 0.0, "requests": len(req)})
    return df.head(top) if top else df


def _short(msg: str) -> str:
    return msg if len(msg) <= 160 else msg[:157] + "..."


def search_job(job: Any, top: int | None = None, **options: Any) -> pd.DataFrame:
    """`workbench.search(job)` for serving jobs: the job's plan fields that are set stay fixed."""
    wl = job.workload
    base = ServingPlan()
    fixed = {k: v for k, v in job.plan.to_dict().items() if v != getattr(base, k)}
    plans = [replace(p, **fixed) for p in candidates(job.cluster, job.model)] if fixed else None
    if plans is not None:
        seen: dict[str, ServingPlan] = {}
        for p in plans:
            seen.setdefault(str(p), p)
        plans = list(seen.values())
    return search_serving(job.cluster, job.model, wl.traffic, wl.slo, top=top, plans=plans, **options)
