"""`workbench demo`: the main job on the embedded default, written as one HTML report.

The report is a short list of section builders, each `(DemoContext) -> list[Section]`: the
topology (this machine, discovered, and a preset to compare with), training (a small GPT on two
CPU ranks through `workbench.loop`: predict → run → compare → calibrate) and serving (the
embedded small model served for real under the traffic benchmark, through the same loop).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.commands import Command

DEFAULT_CLUSTERS = ("local", "aws-p5:nodes=2")


@dataclass
class DemoContext:
    """What the section builders share: the clusters (loaded once) and the command's options."""

    cluster_specs: list[str]
    out: Path
    clusters: list[Any] = field(default_factory=list)
    steps: int = 8
    serve_requests: int = 24


def topology_part(ctx: DemoContext) -> list[Any]:
    from workbench.report import cluster_sections

    out = []
    for c in ctx.clusters:
        out += cluster_sections(c)
    return out


def pending_part(ctx: DemoContext) -> list[Any]:
    """Say plainly that the simulate → run → compare stages are not in this report yet."""
    from workbench.report import text_section

    if any(b not in (topology_part, pending_part) for b in SECTION_BUILDERS):
        return []
    return [text_section("Not in this report yet",
                         "The simulation, the real run and their comparison are not wired into "
                         "`workbench demo` yet, so this report shows the topology part only.")]


LOOP_MODEL = "gpt:layers=2,hidden=128,heads=4,vocab=256,seq=64"
LOOP_PLAN = "dp=2,mbs=2,gbs=8,zero=0,precision=fp32,recompute=none"


def loop_part(ctx: DemoContext) -> list[Any]:
    """Simulate a small GPT step on this machine (2 CPU ranks), train it for real over gloo, compare,
    calibrate (`workbench.loop`); the result figures and a Perfetto trace of the run (next to the report)."""
    import sys

    from workbench.core.job import Job
    from workbench.report import loop_sections, text_section
    from workbench.topology import discover
    from workbench.workflow import loop

    if ctx.steps <= 0:
        return [text_section("Simulate → run → compare", "Skipped: --steps 0.")]
    job = Job.create(discover(cpu_ranks=2), LOOP_MODEL, LOOP_PLAN, steps=ctx.steps)
    print(f"demo: training {LOOP_MODEL} ({LOOP_PLAN}) for {ctx.steps} steps on {job.cluster.name}", file=sys.stderr)
    res = loop(job)
    trace = res.measured.to_perfetto(ctx.out.with_name(ctx.out.stem + "-trace.json"))
    return loop_sections(job.cluster, res.predicted, res.measured, res.comparison, res.summary(), trace.name)


SERVE_TRAFFIC = "concurrency=4,dataset=conversation,scale=0.05,max_isl=160,max_osl=32,requests=24,seed=0"


def serve_part(ctx: DemoContext) -> list[Any]:
    """Serve the embedded small model (trained on first use) on this machine under the traffic benchmark,
    beside the serving simulator's prediction of the same job, before and after calibration."""
    import sys

    import pandas as pd

    from workbench.core.job import Job
    from workbench.report import figure_section, metrics_section, table_section, text_section
    from workbench.serve.demo import demo_checkpoint
    from workbench.serving import Serving
    from workbench.workflow import loop

    if ctx.serve_requests <= 0:
        return [text_section("Serve", "Skipped: --serve-requests 0.")]
    ckpt = demo_checkpoint()
    traffic = SERVE_TRAFFIC.replace("requests=24", f"requests={ctx.serve_requests}")
    job = Job.create("local", str(ckpt / "config.json"), "tp=1,max_seqs=64,max_tokens=256,block=16",
                     Serving(traffic=traffic, slo="ttft=3000,tpot=300"))
    print(f"demo: serving the embedded model ({traffic})", file=sys.stderr)
    res = loop(job, checkpoint=str(ckpt), threads=1)
    m = res.measured.metrics
    keys = ("completed", "failed", "request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "request_goodput")
    out = [metrics_section("Serving: measured (vllm bench serve metrics)", {k: m[k] for k in keys if k in m},
                           note=f"the embedded small model on this machine's CPU, colocated; traffic {traffic}")]
    rows = []
    for label, sim in (("before calibration", res.predicted), ("after calibration", res.recalibrated)):
        if sim is None:
            continue
        for k in ("mean_ttft_ms", "mean_tpot_ms", "output_throughput"):
            a, b = sim.metrics.get(k), m.get(k)
            rows.append({"prediction": label, "metric": k, "simulated": a, "measured": b,
                         "error_pct": (a / b - 1) * 100 if a is not None and b else None})
    if rows:
        out.append(table_section("Serving: simulated vs measured", pd.DataFrame(rows),
                                 note="calibrated on this run's engine steps only (per-step host cost and a rate "
                                      "factor); end-to-end metrics are never fitted"))
    from workbench.viz.serving import serving_run_figure

    best = res.recalibrated or res.predicted
    label = "after calibration" if res.recalibrated is not None else "before calibration"
    out.append(figure_section("Serving: the run with its prediction laid over it", serving_run_figure(res.measured, best),
                              note=f"solid: measured; dashed/open: the serving simulator's prediction ({label}) "
                                   "of the same job"))
    for note in res.notes:
        out.append(text_section("Serving: note", note))
    return out


SECTION_BUILDERS: list[Callable[[DemoContext], list[Any]]] = [topology_part, loop_part, serve_part, pending_part]


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/demo.html", help="where to write the HTML report")
    p.add_argument("--cluster", action="append", default=None, metavar="SPEC",
                   help=f"cluster(s) to include, repeatable (default: {' and '.join(DEFAULT_CLUSTERS)})")
    p.add_argument("--steps", type=int, default=8, help="training steps of the real run (0 skips the run)")
    p.add_argument("--serve-requests", type=int, default=24, help="requests of the serving run (0 skips it)")


def _run(args: argparse.Namespace) -> int:
    from workbench.report import write_report
    from workbench.topology import load_cluster

    ctx = DemoContext(cluster_specs=list(args.cluster or DEFAULT_CLUSTERS), out=Path(args.out),
                      steps=getattr(args, "steps", 8), serve_requests=getattr(args, "serve_requests", 24))
    ctx.clusters = [load_cluster(s) for s in ctx.cluster_specs]
    sections = [s for build in SECTION_BUILDERS for s in build(ctx)]
    path = write_report(ctx.out, sections, title="workbench demo",
                        subtitle="clusters: " + ", ".join(ctx.cluster_specs))
    print(path)
    return 0


COMMANDS = [Command("demo", None, "run the main job on the embedded default and write an HTML report", _args, _run)]
