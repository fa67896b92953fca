"""The serving engine's decode steps before and after a change, measured in alternation in one run.

    python benchmarks/serve_decode_attention.py --machine cpu2-vm --before f457727
    python benchmarks/serve_decode_attention.py --machine h200 --before f457727 --device cuda:0 --model-shape 1b

Two trees are measured: the `workbench` package of commit `--before` (`git archive COMMIT workbench`, into a
temporary folder; `--before-tree DIR` gives an already extracted one, on a machine without git) and this tree's.
Each runs in its own process (PYTHONPATH = the tree) holding a real colocated worker
(`workbench.serve.backend.Backend`, the calibration's random Llama and worker spec from `serve_calibrate.server_setup`);
both stay up, and the parent asks them in turn (before, after, after, before, ...) for one sweep of
`workbench.serve.microbench.measure_steps` (batches of 1..16 equal requests, driven through the worker's pipe: the
engine alone). A sweep's decode steps (every sequence of the batch one token) give, per batch size, the median step
seconds; the result per batch is the median over rounds and the ratio after / before.
Writes benchmarks/results/serve-decode-attention-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 300.0      # seconds: a worker loading the model (a 1.2 B model onto a GPU, a cold disk)
SWEEP_TIMEOUT = 600.0      # seconds: one sweep of measure_steps


# ------------------------------------------------------------------ the child: one tree's worker
def child(model: str, spec: dict[str, Any], batches: tuple[int, ...], prompt: int, output: int) -> None:
    """Serve requests from the parent on stdin ('sweep' / 'stop'), one JSON line each on stdout. Runs with the
    tree under test first on PYTHONPATH (this file's folder is not added), so `workbench` is that tree's."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # anything else written to stdout (the worker's, the library's) goes to stderr
    import workbench.serve.microbench as mb
    from workbench.serve.backend import Backend

    with Backend(model, "colocated", **spec) as b:
        proto.write(json.dumps({"ready": True, "workbench": str(Path(mb.__file__).parents[2])}) + "\n")
        proto.flush()
        for line in sys.stdin:
            if line.strip() != "sweep":
                break
            t0 = time.time()
            df = mb.measure_steps(model, batches, (prompt,), output=output, backend=b)
            dec = df[(df["tokens"] == df["seqs"]) & (df["seqs"] == df["batch"])]
            med = dec.groupby("batch")[["seconds", "period"]].median()
            n = dec.groupby("batch").size()
            proto.write(json.dumps({"seconds": {str(k): float(v) for k, v in med["seconds"].items()},
                                    "period": {str(k): float(v) for k, v in med["period"].items()},
                                    "steps": {str(k): int(v) for k, v in n.items()},
                                    "wall_s": time.time() - t0}) + "\n")
            proto.flush()


# ------------------------------------------------------------------ the parent
class Tree:
    """A child process serving one tree, asked for sweeps one at a time (every wait bounded)."""

    def __init__(self, name: str, path: Path, args: argparse.Namespace, model: Path, spec: dict[str, Any]) -> None:
        self.name = name
        cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", "--model", str(model),
               "--spec", json.dumps(spec), "--batches", args.batches, "--prompt", str(args.prompt),
               "--output", str(args.output)]
        env = dict(os.environ, PYTHONPATH=str(path), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._line(READY_TIMEOUT)

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the {self.name} tree's process answered nothing within {timeout:.0f} s "
                               f"(exit code {self.proc.poll()}; its stderr is above)")
        return dict(json.loads(line))

    def sweep(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("sweep\n")
        self.proc.stdin.flush()
        return self._line(SWEEP_TIMEOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)


def before_tree(args: argparse.Namespace, tmp: Path) -> Path:
    if args.before_tree:
        path = Path(args.before_tree).resolve()
        if not (path / "workbench" / "serve" / "model.py").is_file():
            raise SystemExit(f"--before-tree: {path} holds no workbench/serve/model.py (extract the commit's "
                             "`workbench` folder there: git archive COMMIT workbench | tar -x -C DIR)")
        return path
    from _trees import archive

    return archive(args.before, "workbench", tmp / "before")


def _git(*a: str) -> str:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def summarise(runs: dict[str, list[dict[str, Any]]], batches: list[int]) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    for n in batches:
        k = str(n)
        b = [r["seconds"][k] for r in runs["before"] if k in r["seconds"]]
        a = [r["seconds"][k] for r in runs["after"] if k in r["seconds"]]
        bp = [r["period"][k] for r in runs["before"] if k in r["period"]]
        ap = [r["period"][k] for r in runs["after"] if k in r["period"]]
        mb, ma = float(np.median(b)), float(np.median(a))
        rows.append({"batch": n, "before_ms": mb * 1e3, "after_ms": ma * 1e3, "ratio": ma / mb,
                     "before_period_ms": float(np.median(bp)) * 1e3, "after_period_ms": float(np.median(ap)) * 1e3,
                     "period_ratio": float(np.median(ap) / np.median(bp)),
                     "ratios_by_round": [x / y for x, y in zip(a, b)],
                     "before_runs_ms": [x * 1e3 for x in b], "after_runs_ms": [x * 1e3 for x in a]})
    return rows


def write(args: argparse.Namespace, command: str, record: dict[str, Any]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-decode-attention-{args.machine}.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"# Serving engine decode steps, before / after ({args.machine})", "",
             f"`{command}`", "",
             f"Machine: {record['machine']}. Model: the calibration's random Llama `{args.model_shape}` "
             f"({record['dtype']}) on `{args.device}`, worker spec {json.dumps(record['spec'])}. Batches of n equal "
             f"requests, {args.prompt}-token prompts, {args.output} output tokens (`measure_steps`, through the "
             f"worker's pipe); a decode step = every sequence of the batch one token. Before: `{record['before']}`; "
             f"after: `{record['after']}`. {args.rounds} rounds, the trees in alternation; median over rounds of each "
             "round's median step.", "",
             "| batch | before step ms | after step ms | after / before | before period ms | after period ms | "
             "period after / before | ratio per round |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['batch']} | {r['before_ms']:.3f} | {r['after_ms']:.3f} | {r['ratio']:.3f} | "
                     f"{r['before_period_ms']:.3f} | {r['after_period_ms']:.3f} | {r['period_ratio']:.3f} | "
                     + ", ".join(f"{x:.2f}" for x in r["ratios_by_round"]) + " |")
    lines += ["", f"Wall time {record['wall_s']:.0f} s; load average at the end {record['load_average'][0]:.2f}."]
    (out / f"serve-decode-attention-{args.machine}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machine", help="a name for the machine: the results file's suffix")
    ap.add_argument("--before", help="the commit whose workbench is measured as 'before'")
    ap.add_argument("--before-tree", help="a folder holding that commit's workbench/ (no git there)")
    ap.add_argument("--after-label", default="", help="how to name this tree in the record (default: git HEAD)")
    ap.add_argument("--device", default="cpu", help="the worker's device: cpu or cuda:N")
    ap.add_argument("--model-shape", default="tiny", choices=("tiny", "1b"))
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens of every request")
    ap.add_argument("--output", type=int, default=24, help="output tokens of every request")
    ap.add_argument("--rounds", type=int, default=4, help="sweeps of each tree, in alternation")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        batches = tuple(int(x) for x in args.batches.split(","))
    except ValueError:
        raise SystemExit(f"--batches: {args.batches!r} is not a comma-separated list of integers (e.g. 1,2,4,8,16)") from None
    if args.child:
        child(args.model, json.loads(args.spec), batches, args.prompt, args.output)
        return
    if not args.machine or not (args.before or args.before_tree):
        raise SystemExit("give --machine NAME and --before COMMIT (or --before-tree DIR with --before COMMIT naming it)")
    if args.rounds < 1 or args.output < 3 or args.prompt < 1:
        raise SystemExit("--rounds must be >= 1, --output >= 3 (two decode steps at least), --prompt >= 1")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_calibrate import server_setup

    command = "python benchmarks/serve_decode_attention.py " + " ".join(sys.argv[1:])
    model, spec = server_setup(args.device, args.model_shape)
    t0 = time.time()
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="wb-decode-attn-") as tmp:
        trees = {"before": before_tree(args, Path(tmp)), "after": ROOT}
        procs: dict[str, Tree] = {}
        try:
            for name, path in trees.items():
                procs[name] = Tree(name, path, args, model, spec)
                print(name, procs[name].info, file=sys.stderr, flush=True)
            for name in procs:   # warm-up sweep of each, not counted
                procs[name].sweep()
            for r in range(args.rounds):
                for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    res = procs[name].sweep()
                    runs[name].append(res)
                    print(r, name, json.dumps({k: round(v * 1e3, 3) for k, v in res["seconds"].items()}),
                          file=sys.stderr, flush=True)
        finally:
            for p in procs.values():
                p.close()
    rows = summarise(runs, list(batches))
    dirty = _git("status", "--porcelain", "workbench")
    record = {"command": command, "machine": f"{args.machine}: {platform.platform()}, {os.cpu_count()} CPUs"
              + (f", {_gpu_name(args.device)}" if args.device.startswith("cuda") else ""),
              "device": args.device, "model_shape": args.model_shape, "dtype": spec.get("dtype", "float32"),
              "spec": spec, "before": args.before or str(args.before_tree),
              "after": args.after_label or ((_git("rev-parse", "--short", "HEAD") or "this tree")
                                            + (" + uncommitted changes in workbench/" if dirty else "")),
              "batches": list(batches), "prompt": args.prompt, "output": args.output, "rounds": args.rounds,
              "rows": rows, "runs": runs, "wall_s": time.time() - t0, "load_average": list(os.getloadavg()),
              "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write(args, command, record)
    for row in rows:
        print(f"batch {row['batch']:3d}: before {row['before_ms']:8.3f} ms  after {row['after_ms']:8.3f} ms  "
              f"ratio {row['ratio']:.3f}  (per round {', '.join(f'{x:.2f}' for x in row['ratios_by_round'])})")


def _gpu_name(device: str) -> str:
    import torch

    return str(torch.cuda.get_device_name(torch.device(device))) if torch.cuda.is_available() else "no GPU seen"


if __name__ == "__main__":
    main()
