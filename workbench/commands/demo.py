"""`workbench demo`: the main job on the embedded default, written as one HTML report.

The report is a short list of section builders, each `(DemoContext) -> list[Section]`. Today
it holds the topology part (this machine, discovered, and a preset to compare with); the
simulate → run → compare stages append their builders to `SECTION_BUILDERS` as they land.
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


SECTION_BUILDERS: list[Callable[[DemoContext], list[Any]]] = [topology_part, loop_part, pending_part]


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="reports/demo.html", help="where to write the HTML report")
    p.add_argument("--cluster", action="append", default=None, metavar="SPEC",
                   help=f"cluster(s) to include, repeatable (default: {' and '.join(DEFAULT_CLUSTERS)})")
    p.add_argument("--steps", type=int, default=8, help="training steps of the real run (0 skips the run)")


def _run(args: argparse.Namespace) -> int:
    from workbench.report import write_report
    from workbench.topology import load_cluster

    ctx = DemoContext(cluster_specs=list(args.cluster or DEFAULT_CLUSTERS), out=Path(args.out),
                      steps=getattr(args, "steps", 8))
    ctx.clusters = [load_cluster(s) for s in ctx.cluster_specs]
    sections = [s for build in SECTION_BUILDERS for s in build(ctx)]
    path = write_report(ctx.out, sections, title="workbench demo",
                        subtitle="clusters: " + ", ".join(ctx.cluster_specs))
    print(path)
    return 0


COMMANDS = [Command("demo", None, "run the main job on the embedded default and write an HTML report", _args, _run)]
