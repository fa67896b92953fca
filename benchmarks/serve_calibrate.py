"""Serving simulator vs the real server on this machine: calibrate on one load level, predict another.

    python benchmarks/serve_calibrate.py --machine cpu2-vm

    python benchmarks/serve_calibrate.py --machine h200 --device cuda:0 --model-shape 1b --cluster dgx-h100:nodes=1,gpu=H200

1. Microbenchmarks (`workbench.serve.microbench`): the engine's steps through the worker's pipe, for whole
   batches of 1..16 equal requests with prompts of 16..128 tokens (`measure_steps`, "before") and for the
   compositions a continuous-batching server forms — d decodes + k new prompts of p tokens, swept in
   isolation (`measure_compositions`, "after"), the cost of a request
   outside the engine through the real HTTP server (`measure_overheads`), the front end's CPU per request,
   per engine step and per streamed token (`measure_frontend`: the server process's CPU time, the engine
   being in its own process) and the engine's slowdown while one core is kept busy (`measure_slowdown`).
   All are written to `datasets/serving/serve_{steps,overheads,frontend}_MACHINE_measured.csv` with the
   command and machine.
2. The server (colocated) under closed-loop traffic at each concurrency of `--levels`, `--repeats` runs per level
   with the levels in alternation (2, 6, 2, 6, ...): the machine's speed drifts by tens of percent over a minute, so a
   level is measured by runs spread over the whole measurement and its metrics are their mean (`pool_runs`).
3. The simulator calibrated on the microbenchmarks and the FIRST level's engine steps only (no end-to-end
   metric fitted), compared with every level: uncalibrated; before (the step shape from whole batches) and
   after (from the compositions); both with the front end as a mechanism (the measured `fe_*` terms,
   `request_us` = the hop of one request alone).
   `--trace` instead traces the server's steps and requests against both sweeps, composition by composition
   (serve-calibration-MACHINE-trace.{json,md}).
   `--rounds N` repeats 2–3 N times (the machine is shared: the spread says how much of an error is the
   machine's).
Writes benchmarks/results/serve-calibration-MACHINE.{json,md}; earlier records are kept in it as `history`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLAN = "tp=1,replicas=1,max_seqs=64,max_tokens=256,block=16,prefix_caching=false,chunked_prefill=true"
KEYS = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")
SPEC = {"page_size": 16, "max_batched_tokens": 256, "max_seqs": 64, "threads": 1}
SWEEP_PASSES = 3  # the composition sweep: three passes (up, down, up), each prefill injection once per pass
SHAPES = {"tiny": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768),
          "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192)}


def server_setup(device: str = "cpu", shape: str = "tiny") -> tuple[Path, dict[str, Any]]:
    """The calibration's random Llama checkpoint (made on first use) and the worker spec that serves it on
    `device` (bfloat16 on a GPU, float32 on the CPU)."""
    from workbench.serve.checkpoints import random_llama

    gpu = device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    model = Path(f"/tmp/wb-serve-calib-{shape}-{dtype}" if shape != "tiny" or gpu else "/tmp/wb-serve-calib")
    if not (model / "model.safetensors").is_file():
        random_llama(model, **SHAPES[shape], dtype=dtype, device="cuda" if gpu else "cpu")
    return model, SPEC | ({"device": device, "dtype": dtype} if gpu else {})


def plan_for(spec: dict[str, Any]) -> str:
    """The simulator's plan of the served worker: CUDA graphs where the worker replays its decode-only steps
    (a GPU and the spec's `cuda_graph`, on by default)."""
    graphs = str(spec.get("device", "cpu")).startswith("cuda") and bool(spec.get("cuda_graph", True))
    return f"{PLAN},cuda_graph={'true' if graphs else 'false'}"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _write_datasets(machine: str, command: str, micro: Any, overheads: dict[str, float],
                    frontend: dict[str, float]) -> list[str]:
    import pandas as pd

    d = ROOT / "datasets" / "serving"
    head = (f"# measured by `{command}` on {machine} ({platform.platform()}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}); workbench.serve.calibrate: ")
    steps = d / f"serve_steps_{machine}_measured.csv"
    steps.write_text(head + "engine steps of the real worker process driven through its pipe: whole batches of n "
                     "equal requests (path=batches, measure_steps) and the compositions a server forms, d decodes + k "
                     "new prompts of p tokens (path=compositions, measure_compositions); seconds = the step, gap = the "
                     "worker loop before the next step, period = both; the composition and phase seconds (t_*, g_*) "
                     "as the engine logged them\n"
                     + micro.to_csv(index=False, float_format="%.6g"))
    ov = d / f"serve_overheads_{machine}_measured.csv"
    rows = pd.DataFrame([{"parameter": k, "value": v} for k, v in overheads.items()])
    ov.write_text(head + "measure_overheads: one request at a time through the real HTTP server and the traffic "
                  "benchmark's client; request_us = client TTFT - the engine's one step\n"
                  + rows.to_csv(index=False, float_format="%.6g"))
    fe = d / f"serve_frontend_{machine}_measured.csv"
    rows = pd.DataFrame([{"parameter": k, "value": v} for k, v in frontend.items()])
    fe.write_text(head + "measure_frontend: the server process's CPU seconds (HTTP, tokenising, the pipe, SSE, the "
                  "benchmark client; the engine's process not counted) over closed-loop runs, least squares per "
                  "request, per streamed token and per engine step; measure_slowdown: the engine alone through its "
                  "pipe with and without one core kept busy (fe_slowdown = periods with / without - 1)\n"
                  + rows.to_csv(index=False, float_format="%.6g"))
    return [str(steps.relative_to(ROOT)), str(ov.relative_to(ROOT)), str(fe.relative_to(ROOT))]


def ttft_split(measured: Any, simulated: Any) -> dict[str, float]:
    """Where the mean time to first token went (ms), measured and simulated. Measured: the HTTP hop (the clients'
    TTFT − the server's), the wait from the request's hand-off to the worker until its first step started (the step
    then running, any queue), that step, and its token's way back to the request handler. Simulated: arrival →
    first scheduled (`queue_s`: the way in, the front end's backlog, the wait for a step) and the rest."""
    import numpy as np

    from workbench.sim.serve import requests as sim_requests

    out: dict[str, float] = {}
    req, log = getattr(measured, "requests", None), getattr(measured, "request_log", None)
    ev = measured.events
    server = ev.loc[(ev["op"] == "request") & (ev["rank"] == -1), "ttft"].astype(float)
    if req is not None and len(req):
        ok = req[req["success"]] if "success" in req else req
        out["client_ttft"] = float(ok["ttft"].mean()) * 1e3
        out["http_hop"] = out["client_ttft"] - float(server.mean()) * 1e3
    if log is not None and len(log):
        out["wait_for_step"] = float((log["step_t0"] - log["t_submit"]).mean()) * 1e3
        out["own_step"] = float((log["step_t1"] - log["step_t0"]).mean()) * 1e3
        out["back"] = float(server.mean()) * 1e3 - float((log["step_t1"] - log["t_submit"]).mean()) * 1e3
    s = sim_requests(simulated)
    if len(s):
        out["sim_ttft"] = float(np.nanmean(s["ttft_s"])) * 1e3
        out["sim_queue"] = float(np.nanmean(s["queue_s"])) * 1e3
        out["sim_rest"] = out["sim_ttft"] - out["sim_queue"]
    return out


def frontend_load(measured: Any, simulated: Any, plan: Any) -> dict[str, float]:
    """The front end's load in cores, measured and modelled: the server process's CPU per second while the traffic
    ran (its HTTP server, the pipes, the run's updates; the client runs in its own process; `frontend_cores`, the
    runs' mean), and the plan's front-end terms times the simulated run's requests, streamed tokens and engine steps
    per second. Where the model's is the
    larger, its front end queues work the real one did not (or did alongside)."""
    from workbench.sim.serve import step_events

    m, steps = simulated.metrics, len(step_events(simulated))
    per_request = plan.fe_request_us + plan.fe_finish_us + plan.fe_async_us
    work = (float(m["completed"]) * per_request + float(m["total_output_tokens"]) * plan.fe_token_us
            + steps * plan.fe_step_us) * 1e-6
    return {"fe_cores": float(measured.metrics.get("frontend_cores", float("nan"))),
            "sim_fe_cores": work / max(float(m["duration_s"]), 1e-12)}


def one_round(model: Path, levels: list[int], lengths: str, cluster: str, spec: dict[str, Any],
              repeats: int = 1) -> dict[str, Any]:
    import pandas as pd

    import workbench as wb
    from workbench.serve.calibrate import calibrate_job, fit, fit_steps, pool_runs, steps
    from workbench.serve.compare import compare_serving
    from workbench.serve.microbench import (
        measure_compositions,
        measure_frontend,
        measure_overheads,
        measure_slowdown,
        measure_steps,
    )
    from workbench.serving import Serving

    batches = measure_steps(str(model), **spec).assign(path="batches")
    comp = measure_compositions(str(model), repeat=1, passes=SWEEP_PASSES, **spec).assign(path="compositions")
    overheads = measure_overheads(str(model), **spec)
    frontend = measure_frontend(str(model), **spec) | measure_slowdown(str(model), **spec)
    print(json.dumps({"overheads": overheads, "frontend": frontend}, default=float), flush=True)
    jobs = [wb.Job.create(cluster, str(model / "config.json"), plan=plan_for(spec),
                          workload=Serving(traffic=f"concurrency={c},{lengths}")) for c in levels]
    runs: list[list[Any]] = [[] for _ in levels]
    for _ in range(repeats):  # the levels in alternation: each level's runs spread over the whole measurement
        for job, out in zip(jobs, runs):
            out.append(wb.start(job, checkpoint=str(model), **spec).wait(timeout=900))
    measured = [pool_runs(x) for x in runs]  # one level: its runs on one clock, its metrics their mean
    # before: the step shape from whole batches; after: from the compositions the server forms (both with the
    # front end as a mechanism, and scaled by the calibration run's own steps)
    old_job, old_fit = calibrate_job(jobs[0], measured[0], micro=batches, overheads=overheads, frontend=frontend)
    cal_job, fitted = calibrate_job(jobs[0], measured[0], micro=comp, overheads=overheads, frontend=frontend)
    rows = []
    for job, r, c, level_runs in zip(jobs, measured, levels, runs):
        before = compare_serving(wb.simulate(job), r, KEYS)
        old = compare_serving(wb.simulate(old_job.with_workload(traffic=job.workload.traffic)), r, KEYS)
        sim_after = wb.simulate(cal_job.with_workload(traffic=job.workload.traffic))
        after = compare_serving(sim_after, r, KEYS)
        split = ttft_split(r, sim_after) | frontend_load(r, sim_after, cal_job.plan)
        print(json.dumps({"concurrency": c, "ttft_split_ms": split}), flush=True)
        # diagnostic, not a prediction: calibrated on this run's own steps (the machine's state then)
        own_job, own = calibrate_job(job, r, micro=comp, overheads=overheads, frontend=frontend)
        self_cal = compare_serving(wb.simulate(own_job), r, KEYS)
        # the raw step factor of this run against each sweep (before the front end's modelled slowdown is taken off)
        lam_b = fit(job, r, batches).get("contention", float("nan"))
        lam_c = fit(job, r, comp).get("contention", float("nan"))
        for k in KEYS:
            rows.append({"concurrency": c, "role": "calibrated on" if c == levels[0] else "predicted",
                         "metric": k, "measured": after.loc[k, "measured"],
                         "sim_before": before.loc[k, "simulated"], "error_before": before.loc[k, "error"],
                         "sim_batches": old.loc[k, "simulated"], "error_batches": old.loc[k, "error"],
                         "sim_after": after.loc[k, "simulated"], "error_after": after.loc[k, "error"],
                         "error_self": self_cal.loc[k, "error"], "contention": own.get("contention", float("nan")),
                         "steps_over_batches": lam_b, "steps_over_compositions": lam_c,
                         "hop_us": own["hop_us"], "load_average": r.metrics.get("load_average", os.getloadavg()[0]),
                         "ttft_split_ms": split, "measured_runs": [float(x.metrics[k]) for x in level_runs]})
        print(json.dumps(rows[-3:], default=float), flush=True)
    engine_alone = fit_steps(jobs[0], batches)
    # each level's engine steps (tokens, seqs, seconds, period in s; decodes, prefill chunks and tokens)
    cols = ["tokens", "seqs", "seconds", "period", "decode_seqs", "prefill_seqs", "prefill_tokens"]
    run_steps = {str(c): steps(r, j).reindex(columns=cols).round(6).to_numpy().tolist()
                 for j, r, c in zip(jobs, measured, levels)}
    return {"rows": rows, "run_steps": run_steps, "run_steps_columns": cols, "fitted": fitted, "fitted_batches": old_fit,
            "overheads": overheads, "frontend": frontend, "micro": pd.concat([batches, comp], ignore_index=True),
            "engine_alone": engine_alone, "load_average": os.getloadavg(), "repeats": repeats}


PHASES = ("t_schedule", "t_build", "t_forward", "t_sync", "t_finish", "t_cpu", "t_runq", "g_admit", "g_send", "g_house")


def by_composition(df: Any) -> Any:
    """Median step seconds, period and phase milliseconds per composition (decodes, prefill chunks, prefill
    tokens rounded to 16), with the step count."""
    import numpy as np

    d = df.dropna(subset=["decode_seqs"]).copy()
    d["pf_tokens16"] = (np.ceil(d["prefill_tokens"] / 16) * 16).astype(int)
    cols = ["seconds", "period", *[c for c in PHASES if c in d]]
    g = d.groupby(["decode_seqs", "prefill_seqs", "pf_tokens16"])
    out = (g[cols].median() * 1e3).round(3)
    out.insert(0, "steps", g.size())
    return out.reset_index()


def trace_round(model: Path, levels: list[int], lengths: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The step the server runs against the step the microbenchmarks measure, composition by composition:
    the older sweep (`measure_steps`, whole batches), the composition sweep (`measure_compositions`, the
    worker's own step path on decode, prefill and mixed steps) and traced serving runs at each level
    (`trace_run`: every step's phases, every request's time to first token split)."""
    from workbench.serve.microbench import measure_compositions, measure_steps, trace_run

    t0, c0 = time.time(), _cpu()
    batches = measure_steps(str(model), **spec)
    comp = measure_compositions(str(model), repeat=1, passes=SWEEP_PASSES, **spec)
    out: dict[str, Any] = {"micro_batches": batches, "micro_compositions": comp, "levels": {}}
    for c in levels:
        tr = trace_run(str(model), f"concurrency={c},{lengths}", **spec)
        out["levels"][str(c)] = tr
        print(c, json.dumps({k: round(v, 2) for k, v in tr["ttft"].items()}), flush=True)
    out.update(wall_s=time.time() - t0, cpu_s=_cpu() - c0, load_average=os.getloadavg())
    return out


def _md(t: Any) -> str:
    """A DataFrame as a markdown table (no extra package)."""
    head = "| " + " | ".join(map(str, t.columns)) + " |\n|" + "---|" * len(t.columns)
    rows = ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |"
            for r in t.itertuples(index=False)]
    return "\n".join([head, *rows])


def write_trace(args: Any, command: str, tr: dict[str, Any]) -> str:
    """serve-calibration-MACHINE-trace.{json,md}: every step row and the per-composition comparison."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"micro_batches": by_composition(tr["micro_batches"]),
              "micro_compositions": by_composition(tr["micro_compositions"])}
    for c, x in tr["levels"].items():
        tables[f"run_c{c}"] = by_composition(x["steps"])
    rec = {"meta": {"machine": args.machine, "command": command, "platform": platform.platform(),
                    "cpus": os.cpu_count(), "device": args.device, "model_shape": args.model_shape,
                    "wall_s": tr["wall_s"], "cpu_s": tr["cpu_s"], "load_average": tr["load_average"]},
           "ttft_ms": {c: x["ttft"] for c, x in tr["levels"].items()},
           "metrics": {c: x["metrics"] for c, x in tr["levels"].items()},
           "tables": {k: v.to_dict(orient="list") for k, v in tables.items()},
           "steps": {"micro_batches": tr["micro_batches"].to_dict(orient="list"),
                     "micro_compositions": tr["micro_compositions"].to_dict(orient="list"),
                     **{f"run_c{c}": x["steps"].to_dict(orient="list") for c, x in tr["levels"].items()}},
           "requests": {c: x["requests"].to_dict(orient="list") for c, x in tr["levels"].items()}}
    (out / f"serve-calibration-{args.machine}-trace.json").write_text(json.dumps(rec, indent=0, default=float))
    lines = [f"# Engine steps: the server's against the microbenchmarks' on {args.machine}", "", f"`{command}`", "",
             f"{platform.platform()}, {os.cpu_count()} CPUs, {tr['wall_s']:.0f} s wall, {tr['cpu_s']:.0f} s CPU, "
             f"load average at the end {tr['load_average'][0]:.1f}. Milliseconds, medians per composition "
             "(decode sequences, prefill chunks, prefill tokens rounded up to 16): the step (`seconds`), start to "
             "the next step's start (`period`), and the phases the engine and its worker loop log.", ""]
    for c, x in tr["levels"].items():
        lines.append(f"Concurrency {c}: mean TTFT split (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in x["ttft"].items()))
    for name, t in tables.items():
        lines += ["", f"## {name}", "", _md(t)]
    (out / f"serve-calibration-{args.machine}-trace.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def demo_compare() -> dict[str, Any]:
    """`make demo`'s serving comparison: the embedded model under the demo's traffic through `workbench.loop`
    (calibrated on that run's engine steps and HTTP hop only: no microbenchmark), before and after."""
    from workbench.commands.demo import SERVE_TRAFFIC
    from workbench.core.job import Job
    from workbench.serve.demo import demo_checkpoint
    from workbench.serving import Serving
    from workbench.workflow import loop

    ckpt = demo_checkpoint()
    job = Job.create("local", str(ckpt / "config.json"), "tp=1,max_seqs=64,max_tokens=256,block=16",
                     Serving(traffic=SERVE_TRAFFIC, slo="ttft=3000,tpot=300"))
    res = loop(job, checkpoint=str(ckpt), threads=1)
    m = res.measured.metrics
    rows = []
    for k in KEYS:
        b = m.get(k)
        a0 = res.predicted.metrics.get(k) if res.predicted is not None else None
        a1 = res.recalibrated.metrics.get(k) if res.recalibrated is not None else None
        rows.append({"metric": k, "measured": b, "sim_before": a0, "sim_after": a1,
                     "error_before": a0 / b - 1 if a0 is not None and b else float("nan"),
                     "error_after": a1 / b - 1 if a1 is not None and b else float("nan")})
    print(json.dumps(rows, default=float), flush=True)
    return {"traffic": SERVE_TRAFFIC, "rows": rows, "fitted": res.calibrated, "notes": res.notes,
            "load_average": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--machine", required=True)
    ap.add_argument("--levels", default="2,6", help="closed-loop concurrencies: calibrate on the first")
    ap.add_argument("--lengths", default="isl=48,osl=16,requests=24")
    ap.add_argument("--rounds", type=int, default=1, help="repeat microbenchmarks + levels + calibration")
    ap.add_argument("--repeats", type=int, default=3, help="runs per level in a round, the levels in alternation "
                    "(a level's measurement: the mean of its runs)")
    ap.add_argument("--demo", action="store_true", help="also run make demo's serving comparison")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--device", default="cpu", help="the worker's device: cpu or cuda:N")
    ap.add_argument("--model-shape", default="tiny", choices=list(SHAPES))
    ap.add_argument("--no-cuda-graph", action="store_true", help="a GPU worker without CUDA graphs (every step eager)")
    ap.add_argument("--no-piece-graphs", action="store_true",
                    help="a GPU worker whose steps with a prefill chunk run eagerly (only decode-only steps as graphs)")
    ap.add_argument("--cluster", default="local", help="the simulator's cluster (a GPU run: e.g. dgx-h100:nodes=1,gpu=H200)")
    ap.add_argument("--trace", action="store_true", help="only trace the server's steps against the microbenchmarks' "
                    "(serve-calibration-MACHINE-trace.{json,md})")
    args = ap.parse_args()
    if args.repeats < 1 or args.rounds < 1:
        ap.error(f"--repeats {args.repeats} / --rounds {args.rounds}: give 1 or more")
    try:
        levels = [int(x) for x in args.levels.split(",")]
    except ValueError:
        ap.error(f"--levels {args.levels!r}: give closed-loop concurrencies as integers, e.g. 2,6")
    if not levels or min(levels) < 1:
        ap.error(f"--levels {args.levels!r}: every concurrency must be >= 1")

    model, spec = server_setup(args.device, args.model_shape)
    if args.no_cuda_graph:
        spec = spec | {"cuda_graph": False}
    if args.no_piece_graphs:
        spec = spec | {"piece_graphs": False}
    command = "python benchmarks/serve_calibrate.py " + " ".join(sys.argv[1:])
    if args.trace:
        print(write_trace(args, command, trace_round(model, levels, args.lengths, spec)))
        return
    t0, c0 = time.time(), _cpu()
    rounds = [one_round(model, levels, args.lengths, args.cluster, spec, args.repeats) for _ in range(args.rounds)]
    demo = demo_compare() if args.demo else None
    wall, cpu = time.time() - t0, _cpu() - c0
    files = _write_datasets(args.machine, command, rounds[-1]["micro"], rounds[-1]["overheads"], rounds[-1]["frontend"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"serve-calibration-{args.machine}.json"
    history: list[dict[str, Any]] = []  # earlier records, oldest first (meta and rows only)
    if jpath.is_file():
        old = json.loads(jpath.read_text())
        history = list(old.pop("history", None) or ([old.pop("previous")] if old.get("previous") else []))
        rounds_rows = [r["rows"] for r in old.get("rounds", [])] or [old["rows"]]
        history.append({"meta": old["meta"], "rows": old["rows"], "rounds_rows": rounds_rows,
                        "fitted": old["meta"].get("fitted") or old.get("rounds", [{}])[-1].get("fitted", {})})
    meta = {"machine": args.machine, "platform": platform.platform(), "cpus": os.cpu_count(), "command": command,
            "plan": plan_for(spec), "lengths": args.lengths, "levels": levels, "repeats": args.repeats, "wall_s": wall, "cpu_s": cpu,
            "load_average_end": os.getloadavg(), "datasets": files, "device": args.device,
            "model": {"shape": args.model_shape, **SHAPES[args.model_shape], "dtype": spec.get("dtype", "float32"),
                      "weights": "random N(0,0.02), HF Llama format"}, "cluster": args.cluster}
    if args.device.startswith("cuda"):
        import torch

        meta["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    record = {"meta": meta, "rounds": [{k: v for k, v in r.items() if k != "micro"} for r in rounds],
              "rows": rounds[-1]["rows"], "demo": demo, "history": history}
    jpath.write_text(json.dumps(record, indent=1, default=float))
    md = render(record)
    (out / f"serve-calibration-{args.machine}.md").write_text(md)
    print(md)


def _each_run(row: dict[str, Any]) -> str:
    """The calibrated simulator's error against each of the level's single runs (what one run per level would have
    reported)."""
    return ", ".join(f"{row['sim_after'] / v - 1:+.1%}" for v in row.get("measured_runs") or [])


def render(record: dict[str, Any]) -> str:
    import numpy as np

    meta = record["meta"]
    mod = meta.get("model") or {"shape": "tiny", "hidden": 256, "layers": 4, "dtype": "float32"}
    where = (f"{', '.join(meta['gpus'])}, worker on {meta['device']}" if meta.get("gpus")
             else "colocated CPU worker (1 thread)")
    runs = (f"; each level {meta['repeats']} runs, the levels in alternation, measured = their mean"
            if meta.get("repeats", 1) > 1 else "")
    lines = [f"# Serving simulator vs the real server on {meta['machine']}", "", f"`{meta['command']}`", "",
             f"{meta['platform']}, {meta['cpus']} CPUs (shared), {meta['wall_s']:.0f} s wall, {meta['cpu_s']:.0f} s CPU "
             f"(this process and its workers), load average at the end {meta['load_average_end'][0]:.1f}; random-weight "
             f"Llama (hidden {mod['hidden']}, {mod['layers']} layers, {mod['dtype']}), {where}, closed loop "
             f"`{meta['lengths']}`{runs}; simulator plan `{meta['plan']}` on the `{meta.get('cluster', 'local')}` cluster.", "",
             "Calibration inputs (no end-to-end metric is fitted, and nothing of the predicted level): the engine-step "
             f"microbenchmarks and the first level's engine steps (`{meta['datasets'][0]}`), the per-request "
             f"microbenchmark (`{meta['datasets'][1]}`), the front end's microbenchmarks (`{meta['datasets'][2]}`).", "",
             "Three simulators per level: uncalibrated; **before** (the step shape from whole batches: n equal requests "
             "sent together, prefilled together, then decoded together — `measure_steps`); **after** (the step shape "
             "from the compositions a continuous-batching server forms: decode batches, prefill chunks and mixed "
             "steps of d decodes + k new prompts, swept in isolation through the worker's own step path — "
             "`measure_compositions`). Both price each step by the composition the engine logged, model the front "
             "end as a mechanism (`fe_*` measured on their own, `request_us` = the hop of one request alone) and "
             "scale the step shape by the calibration run's steps (`contention`).", ""]
    for i, r in enumerate(record["rounds"]):
        f, o = r["fitted"], r["overheads"]
        fe = r.get("frontend")
        lines.append(f"Round {i + 1}: load average {r['load_average'][0]:.1f}. After: scheduler_us = {f['scheduler_us']:.0f}, "
                     f"seq_us = {f['seq_us']:.0f}, chunk_us = {f.get('chunk_us', 0.0):.0f}, prefill_step_us = {f.get('prefill_step_us', 0.0):.0f}, eager_us = {f.get('eager_us', 0.0):.0f}, rate factor = {f['rate_factor']:.3g} (R² {f['r2']:.2f} over "
                     f"{f['steps']:.0f} microbenchmark steps; the calibration run's {f.get('run_steps', 0):.0f} busy steps: "
                     f"contention {f.get('contention', 1.0):.2f}); request_us = {f['request_us']:.0f} (one request alone: "
                     f"client TTFT − step {o['request_us']:.0f}).")
        h = r.get("fitted_batches")
        if h:
            lines.append(f"  Before: scheduler_us = {h['scheduler_us']:.0f}, seq_us = {h['seq_us']:.0f}, rate factor = "
                         f"{h['rate_factor']:.3g} (R² {h['r2']:.2f} over {h['steps']:.0f} steps; contention "
                         f"{h.get('contention', 1.0):.2f}).")
        if fe:
            split = (f" (split at the hop of a request alone: {f['fe_request_us']:.0f} before the engine, "
                     f"fe_finish_us = {f['fe_finish_us']:.0f} after the last token"
                     + (f" within the turnaround to the next send ({o['turnaround_us']:.0f} alone), fe_async_us = "
                        f"{f.get('fe_async_us', 0.0):.0f} off the path" if "turnaround_us" in o else "") + ")"
                     if "fe_finish_us" in f else "")
            lines.append(f"  Front end: fe_request_us = {fe['fe_request_us']:.0f}{split}, fe_step_us = {fe['fe_step_us']:.0f}, "
                         f"fe_token_us = {fe['fe_token_us']:.0f} (R² {fe['r2']:.2f} over {fe['runs']:.0f} runs"
                         + (f", each the median of {fe['repeats']:.0f} passes (CPU max/min over a run's passes up to "
                            f"{fe['spread']:.2f})" if "spread" in fe else "")
                         + (f"; the traffic client's own CPU in its process: {fe['client_request_us']:.0f} per request, "
                            f"{fe['client_token_us']:.0f} per token, {fe['client_step_us']:.0f} per step"
                            if "client_request_us" in fe else "") + "), "
                         f"fe_slowdown = {fe['fe_slowdown']:.2f} (steps {fe['ratio']:.2f}× with one core kept busy; "
                         f"the runs without drifted {fe['off_drift']:.2f}×).")
    lines += ["", "Step factor per level: Σ the run's busy step periods / Σ the fitted sweep's price of the same "
              "compositions (1 = the microbenchmark measures the step the server runs). The diagnostic column is not "
              "a prediction: 'after' calibrated on that run's own steps (the machine's state then).", ""]
    if len(record["rounds"]) > 1:
        lines += ["## Median over the rounds", "", "| concurrency | role | metric | before: errors | median "
                  "| after: errors | median | step factor vs batches | vs compositions |", "|---|---|---|---|---|---|---|---|---|"]
        first = record["rounds"][0]["rows"]
        for j, x in enumerate(first):
            eb = [r["rows"][j].get("error_batches", float("nan")) for r in record["rounds"]]
            ea = [r["rows"][j]["error_after"] for r in record["rounds"]]
            lb = [r["rows"][j].get("steps_over_batches", float("nan")) for r in record["rounds"]]
            lc = [r["rows"][j].get("steps_over_compositions", float("nan")) for r in record["rounds"]]
            lines.append(f"| {x['concurrency']} | {x['role']} | {x['metric']} | {', '.join(f'{e:+.1%}' for e in eb)} "
                         f"| {float(np.median(eb)):+.1%} | {', '.join(f'{e:+.1%}' for e in ea)} "
                         f"| {float(np.median(ea)):+.1%} | {', '.join(f'{e:.2f}' for e in lb)} "
                         f"| {', '.join(f'{e:.2f}' for e in lc)} |")
        lines.append("")
    for i, r in enumerate(record["rounds"]):
        lines += [f"## Round {i + 1}", "",
                  "| concurrency | role | metric | measured | its runs | uncalibrated | error | before | error "
                  "| after | error | its error against each run | diagnostic: calibrated on this run "
                  "| step factor vs batches, vs compositions "
                  "| HTTP hop |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['concurrency']} | {x['role']} | {x['metric']} | {x['measured']:.4g} "
                  f"| {', '.join(f'{v:.4g}' for v in x.get('measured_runs') or [x['measured']])} | {x['sim_before']:.4g} "
                  f"| {x['error_before']:+.1%} | {x.get('sim_batches', float('nan')):.4g} "
                  f"| {x.get('error_batches', float('nan')):+.1%} "
                  f"| {x['sim_after']:.4g} | {x['error_after']:+.1%} "
                  f"| {_each_run(x)} "
                  f"| {x.get('error_self', float('nan')):+.1%} "
                  f"| {x.get('steps_over_batches', float('nan')):.2f}, {x.get('steps_over_compositions', float('nan')):.2f} "
                  f"| {x.get('hop_us', float('nan')) / 1e3:.0f} ms |"
                  for x in r["rows"]]
        lines.append("")
        splits = [(x["concurrency"], x["ttft_split_ms"]) for x in r["rows"] if x["metric"] == "mean_ttft_ms"
                  and x.get("ttft_split_ms")]
        if splits:
            keys = ("client_ttft", "http_hop", "wait_for_step", "own_step", "back", "sim_ttft", "sim_queue", "sim_rest",
                    "fe_cores", "sim_fe_cores")
            lines += ["Where the mean TTFT went (ms): measured — the clients' TTFT, the HTTP hop, the wait from the "
                      "hand-off to the worker until the request's first step, that step, its token's way back to the "
                      "handler; 'after' simulated — TTFT, arrival → first scheduled, the rest. The front end's load "
                      "(cores): the server process's CPU per second during the runs, and the plan's front-end terms "
                      "times the simulated run's requests, tokens and steps per second.", "",
                      "| concurrency | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            lines += [f"| {c} | " + " | ".join(f"{sp.get(k, float('nan')):.{2 if 'cores' in k else 1}f}" for k in keys)
                      + " |" for c, sp in splits]
            lines.append("")
    demo = record.get("demo")
    if demo:
        f = demo.get("fitted") or {}
        lines += ["## `make demo`'s serving comparison", "",
                  f"The embedded model, traffic `{demo['traffic']}`, through `workbench.loop`: calibrated on that run's "
                  f"engine steps and HTTP hop only (scheduler_us = {f.get('scheduler_us', 0):.0f}, seq_us = "
                  f"{f.get('seq_us', 0):.0f}, rate factor = {f.get('rate_factor', 1):.3g}, request_us = "
                  f"{f.get('request_us', 0):.0f}), compared with the same run; load average {demo['load_average'][0]:.1f}.",
                  "", "| metric | measured | sim uncalibrated | error | sim calibrated | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['metric']} | {x['measured']:.4g} | {x['sim_before']:.4g} | {x['error_before']:+.1%} | "
                  f"{x['sim_after']:.4g} | {x['error_after']:+.1%} |" for x in demo["rows"]]
        lines.append("")
    for prev in reversed(record.get("history") or []):
        pm = prev["meta"]
        fitted = prev.get("fitted") or pm.get("fitted") or {}
        rr = prev.get("rounds_rows") or [prev["rows"]]
        load = pm.get("load_average", pm.get("load_average_end"))
        lines += [f"## Earlier record: `{pm['command']}`", "",
                  f"Load average at the end {load}; code of that time; calibration of its last round: "
                  f"{', '.join(f'{k} = {v:.4g}' for k, v in fitted.items())}.", "",
                  "| concurrency | role | metric | errors of the rounds (calibrated) | median |", "|---|---|---|---|---|"]
        for j, x in enumerate(rr[0]):
            errs = [r[j]["error_after"] for r in rr]
            lines.append(f"| {x['concurrency']} | {x['role']} | {x['metric']} | "
                         f"{', '.join(f'{e:+.1%}' for e in errs)} | {float(np.median(errs)):+.1%} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
