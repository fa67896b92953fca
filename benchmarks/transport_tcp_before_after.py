"""tcp transport before/after: `workbench bench transport` on an older `transport/` and on this tree, in
alternating runs on the same machine, composed into one markdown table and one benchmark record.

    python benchmarks/transport_tcp_before_after.py --before 317f609~1 --pairs 2 --soak 20000 \
        --name cpu2-vm-fastpath

    python benchmarks/transport_tcp_before_after.py --sides 3     # this tree only: each side's part (see `sides`)

The older code is `git archive REF transport` put first on PYTHONPATH (the command itself is this tree's).
Each run's raw-socket and gloo baselines are measured in that run; every ratio is within its run. Runs
alternate (before, after, after, before, …) so drift in the machine's load falls on both. The load average
and the CPU seconds of the whole process tree are recorded beside each run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CURVE = ("import json; from transport.bench import cost_curve; "
         "print(json.dumps(cost_curve('tcp', lanes=2, writes=(1, 4, 16, 64, 256), iters=60)))")
# CPU and context switches per waited single write (all threads of both processes, from /proc schedstat and
# status), engine at one lane and the raw socket, 1000 writes each at 4, 64 and 256 KiB; and the Python function
# calls the writing process makes per waited write (cProfile's count over 500 writes: independent of the load)
PER_WRITE = """
import cProfile, glob, json, os, pstats, statistics, time
from transport import bench
from transport.engine import Engine

def cpu(pid):
    ns = cs = 0
    for t in glob.glob(f"/proc/{pid}/task/*"):
        try:
            ns += int(open(t + "/schedstat").read().split()[0])
            cs += sum(int(x.split()[1]) for x in open(t + "/status") if "ctxt_switches" in x)
        except OSError:
            pass
    return ns, cs

def measure(fn, pids, n=1000):
    a = [cpu(p) for p in pids]
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
    b = [cpu(p) for p in pids]
    return {"cpu_us": round(sum(y[0] - x[0] for x, y in zip(a, b)) / n / 1e3, 1),
            "ctx_switches": round(sum(y[1] - x[1] for x, y in zip(a, b)) / n, 2),
            "p50_us": round(statistics.median(lat) * 1e6, 1), "py_calls": calls(fn)}

def calls(fn, n=500):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    return round(pstats.Stats(pr).total_calls / n, 1)

if __name__ == "__main__":
    out = []
    target, raw = bench._Target("tcp", 1 << 20), bench._RawSocket(1 << 20)
    eng = Engine("tcp", lanes=1)
    try:
        src = eng.register(bench._source(eng, 1 << 20, "cpu"))
        eng.connect(target.desc)
        for size in (4096, 65536, 262144):
            for _ in range(100):
                eng.write(src, target.desc, size).result(30)
            out.append(dict(measure(lambda: eng.write(src, target.desc, size).result(30),
                                    [os.getpid(), target.proc.pid]), mode="single", bytes=size))
            out.append(dict(measure(lambda: raw.op(size), [os.getpid(), raw.proc.pid]), mode="raw_socket", bytes=size))
    finally:
        eng.close(), raw.close(), target.close()
    print(json.dumps(out))
"""
KiB, MiB = 1 << 10, 1 << 20
# which transport a run imports, and whether its engines use the C lane loop (`WORKBENCH_TCP_NATIVE`; "n/a": a tree
# without one)
NATIVE_CHECK = ("import transport, transport.backends.tcp as t; print(transport.__file__); "
                "print(t.native_enabled() if hasattr(t, 'native_enabled') else 'n/a')")


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_one(label: str, code: str, pythonpath: str | None, soak: int, out: Path, lanes: int) -> dict[str, Any]:
    """One `workbench bench transport` run; its record plus load, wall and CPU seconds."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [str(Path(sys.executable).parent / "workbench"), "bench", "transport", "--backend", "tcp",
           "--lanes", str(lanes), "--soak", str(soak), "--save", "run", "--out-dir", str(out)]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0, t0 = _load(), time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: the benchmark failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rec = json.loads((out / "transport-run.json").read_text())
    # the per-operation cost curve: one write_batch of k 4 KiB writes, until done and until posted. `python -c`
    # puts its working directory first on sys.path: run it in `out`, so the older tree on PYTHONPATH is imported
    # (this tree comes from the editable install)
    curve = subprocess.run([sys.executable, "-c", CURVE], env=env, cwd=out, capture_output=True, text=True,
                           timeout=600)
    if curve.returncode != 0:
        raise SystemExit(f"{label}: the cost curve failed:\n{curve.stderr[-3000:]}")
    which, native = (subprocess.run([sys.executable, "-c", NATIVE_CHECK], env=env, cwd=out, capture_output=True,
                                    text=True, timeout=60).stdout.strip().splitlines() + ["?", "?"])[:2]
    if pythonpath and not which.startswith(pythonpath):
        raise SystemExit(f"{label}: imported {which}, not the tree under {pythonpath}")
    per = subprocess.run([sys.executable, "-c", PER_WRITE], env=env, cwd=out, capture_output=True, text=True,
                         timeout=600)
    if per.returncode != 0:
        raise SystemExit(f"{label}: the per-write CPU measurement failed:\n{per.stderr[-3000:]}")
    if "summary" not in rec:  # the command's earlier --save layout: {meta, rows, ratios, soak, notes}
        rec = {"machine": dict(rec.get("meta", {}), name=rec.get("meta", {}).get("machine", "")),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "rows": rec["rows"],
               "summary": {**rec.get("ratios", {}), **{f"soak_{k}": v for k, v in rec.get("soak", {}).items()}}}
    return {"label": label, "code": code, "record": rec, "curve": json.loads(curve.stdout.strip().splitlines()[-1]),
            "per_write": json.loads(per.stdout.strip().splitlines()[-1]),
            "native": native, "load_start": load0, "load_end": _load(),
            "wall_s": round(wall, 1), "cpu_user_s": round(ru1.ru_utime - ru0.ru_utime, 1),
            "cpu_sys_s": round(ru1.ru_stime - ru0.ru_stime, 1)}


def _rows(run: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in run["record"]["rows"] if r["mode"] == mode]


def _single(run: dict[str, Any]) -> dict[int, tuple[float, float, float]]:
    """bytes -> (best engine GB/s over lane counts, raw socket GB/s, engine p50 µs at one lane)."""
    raw = {r["bytes"]: r["GBps"] for r in _rows(run, "raw_socket")}
    out: dict[int, tuple[float, float, float]] = {}
    for r in _rows(run, "single"):
        b = r["bytes"]
        best, _, p50 = out.get(b, (0.0, 0.0, float("nan")))
        out[b] = (max(best, r["GBps"]), raw.get(b, float("nan")), r["p50_us"] if r["lanes"] == 1 else p50)
    return out


def _batch(run: dict[str, Any]) -> dict[tuple[Any, Any], tuple[float, float]]:
    """(bytes per write, writes) -> (engine µs per write, raw socket back-to-back µs per write)."""
    raw = {(r.get("write_bytes"), r["writes"]): r["us_per_write"] for r in _rows(run, "raw_socket_batch")}
    return {(r.get("write_bytes"), r["writes"]): (r["us_per_write"], raw.get((r.get("write_bytes"), r["writes"]),
                                                                             float("nan")))
            for r in _rows(run, "batch")}


def _headline(run: dict[str, Any], key: str) -> Any:
    """A summary number of a run (the batch overhead computed from the rows where an older record lacks it)."""
    v = run["record"]["summary"].get(key)
    if v is None and key == "batch_max_overhead_us_per_write":
        over = [e - raw for e, raw in _batch(run).values()]
        v = max(over) if over else None
    return v


def _machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m.get('platform', '?')}, {m.get('cpus_usable', m.get('cpus', '?'))} CPUs "
            f"({m.get('cpu', '?')}), Python {m.get('python', '?')}.")


def _fmt_bytes(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def compose(runs: list[dict[str, Any]], before_ref: str, name: str, command: str) -> tuple[str, dict[str, Any]]:
    before = [r for r in runs if r["code"] == "before"]
    after = [r for r in runs if r["code"] == "after"]
    lines = [f"# tcp transport before/after on {name}", "",
             f"`{command}`", "",
             _machine_line(after[0]["record"]["machine"] if after else {}), "",
             f"Before = `transport/` of `{before_ref}` (`git archive`), after = this tree; runs in the order "
             f"{', '.join(r['label'] for r in runs)}, one at a time on the same machine, each with its own raw-socket "
             "and gloo baselines (ratios are within a run). GB/s = bytes over the median call time. The machine "
             "is shared: read each run's load average beside it. "
             f"`WORKBENCH_TCP_SPIN_US` (the waiting caller's spin, µs): {os.environ.get('WORKBENCH_TCP_SPIN_US', 'unset')}"
             f" (unset: the default); `WORKBENCH_TCP_NATIVE`: {os.environ.get('WORKBENCH_TCP_NATIVE', 'unset')}; the C "
             "lane loop in use per run: "
             + ", ".join(f"{r['label']} {r.get('native', '?')}" for r in runs) + ".", "",
             "The raw socket completes like a waited write: one plain socket pair, the sender sends an 8-byte "
             "length and the payload, the receiver (another process) `recv_into`s it into its buffer and "
             "answers one byte on the same socket, the sender waits for that byte; the engine's write is done "
             "when the target's acknowledgement (40 bytes, on the write's own data socket since this change) "
             "is back.", "",
             "| run | code | load average at start → end | wall s | CPU s (user + sys, whole process tree) |",
             "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['label']} | {r['code']} | {r['load_start']} → {r['load_end']} | {r['wall_s']} | "
                     f"{r['cpu_user_s']} + {r['cpu_sys_s']} |")
    sizes = sorted(_single(runs[0]))
    lines += ["", "## Single writes (one write per call, waited): best over 1/2/4 lanes vs the raw socket", "",
              "| bytes | " + " | ".join(f"{r['label']} engine GB/s (raw) → ratio" for r in runs)
              + " | p50 µs at 1 lane, before → after (medians of runs) |",
              "|---|" + "---|" * (len(runs) + 1)]
    for b in sizes:
        cells = []
        for r in runs:
            e, raw, _ = _single(r)[b]
            cells.append(f"{e:.2f} ({raw:.2f}) → **{e / raw:.2f}**")
        p_b = statistics.median(_single(r)[b][2] for r in before)
        p_a = statistics.median(_single(r)[b][2] for r in after)
        lines.append(f"| {_fmt_bytes(b)} | " + " | ".join(cells) + f" | {p_b:.0f} → {p_a:.0f} |")
    keys = sorted(_batch(runs[0]))
    lines += ["", "## Batched writes (one `write_batch` per call): µs per write, engine (raw socket back to back)"
              " → overhead = engine − raw", "",
              "| bytes × writes | " + " | ".join(f"{r['label']} ({r['code']})" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for k in keys:
        cells = []
        for r in runs:
            e, raw = _batch(r).get(k, (float("nan"), float("nan")))
            cells.append(f"{e:.1f} ({raw:.1f}) → {e - raw:+.1f}")
        lines.append(f"| {_fmt_bytes(int(k[0]))} × {k[1]} | " + " | ".join(cells) + " |")
    heads = ["min_ratio_vs_raw_socket_ge_64KiB", "min_ratio_vs_raw_socket_ge_1MiB", "batch_min_us_per_write",
             "batch_max_writes_per_s", "batch_min_ratio_vs_raw_socket_batch", "batch_max_overhead_us_per_write",
             "paged_32KiB_vs_single", "paged_64KiB_vs_single", "paged_layer_256x32KiB_post_us",
             "soak_writes", "soak_lost", "soak_corrupted", "soak_writes_per_s"]
    lines += ["", "## Headline numbers of each run", "", "| | " + " | ".join(f"{r['label']} ({r['code']})" for r in runs)
              + " |", "|---|" + "---|" * len(runs)]
    for h in heads:
        vals = []
        for r in runs:
            v = _headline(r, h)
            vals.append("—" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
        lines.append(f"| {h} | " + " | ".join(vals) + " |")
    targets = (("≥ 0.9× a raw socket at every size ≥ 64 KiB (single writes)", "min_ratio_vs_raw_socket_ge_64KiB",
                lambda v: v >= 0.9),
               ("per-write overhead ≤ 30 µs in batches (engine − raw socket, same batch)",
                "batch_max_overhead_us_per_write", lambda v: v <= 30),
               ("≥ 50 k small writes/s batched", "batch_max_writes_per_s", lambda v: v >= 50_000),
               ("soak: 0 lost", "soak_lost", lambda v: v == 0), ("soak: 0 corrupted", "soak_corrupted", lambda v: v == 0))
    lines += ["", "## Against the targets of issue 15 (tcp over loopback)", "",
              "| target | " + " | ".join(f"{r['label']} ({r['code']})" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for text, key, ok in targets:
        cells = []
        for r in runs:
            v = _headline(r, key)
            cells.append("—" if v is None else f"{v:.3g} {'met' if ok(v) else '**not met**'}")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    ks = [c["writes"] for c in runs[0]["curve"]]
    lines += ["", "## Per-operation cost: one `write_batch` of k 4 KiB writes over 2 lanes "
              "(`transport.bench.cost_curve`): µs per write until done (until the call returned, per call)", "",
              "| writes per call | " + " | ".join(f"{r['label']} ({r['code']})" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for k in ks:
        cells = []
        for r in runs:
            c = next(c for c in r["curve"] if c["writes"] == k)
            cells.append(f"{c['us_per_write']:.1f} ({c.get('post_us', float('nan')):.0f})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "## CPU and context switches per waited single write (one lane; both processes, all threads; "
              "1000 writes each, in the same run), and the writing process's Python calls per write (cProfile)", "",
              "| bytes | mode | " + " | ".join(f"{r['label']} ({r['code']}) CPU µs, switches, p50 µs, calls"
                                             for r in runs) + " |",
              "|---|---|" + "---|" * len(runs)]
    for b in (4 * KiB, 64 * KiB, 256 * KiB):
        for mode in ("single", "raw_socket"):
            cells = []
            for r in runs:
                c = next((c for c in r.get("per_write", []) if c["bytes"] == b and c["mode"] == mode), None)
                cells.append("—" if c is None else f"{c['cpu_us']:.0f}, {c['ctx_switches']:.1f}, {c['p50_us']:.0f}, "
                             f"{c.get('py_calls', '—')}")
            if any(c != "—" for c in cells):
                lines.append(f"| {_fmt_bytes(b)} | {mode} | " + " | ".join(cells) + " |")
    imm = [f"{r['label']}: {_rows(r, 'imm')[0]['p50_us']:.0f} µs" for r in runs if _rows(r, "imm")]
    lines += ["", "imm round trip p50: " + ", ".join(imm), ""]
    summary: dict[str, Any] = {"before_ref": before_ref}
    for r in runs:
        for h in heads:
            v = _headline(r, h)
            if isinstance(v, (int, float)):
                summary[f"{r['label']}_{h}"] = v
        summary[f"{r['label']}_load_start"] = r["load_start"]
        summary[f"{r['label']}_cpu_s"] = round(r["cpu_user_s"] + r["cpu_sys_s"], 1)
        summary[f"{r['label']}_wall_s"] = r["wall_s"]
    rows = [dict(row, run=r["label"], code=r["code"]) for r in runs for row in r["record"]["rows"]]
    rows += [dict(row, mode="cost_curve", run=r["label"], code=r["code"]) for r in runs for row in r["curve"]]
    rows += [dict(row, mode=f"per_write_{row['mode']}", run=r["label"], code=r["code"]) for r in runs
             for row in r.get("per_write", [])]
    rec = {"benchmark": "transport", "machine": dict(after[0]["record"]["machine"], name=name) if after else {},
           "command": command, "date": runs[-1]["record"]["date"], "summary": summary, "rows": rows}
    return "\n".join(lines), rec


def sides(rounds: int, sizes: tuple[int, ...] = (64 * KiB, 256 * KiB, 1 * MiB), n: int = 1500) -> str:
    """Each side's part of a waited single write on this tree: median µs at one lane with the writer and the target
    process each on the C lane loop (N) or the Python one (P), the raw socket loop timed in the same round; then, both
    in C, the writer's `write()` and `result()` split by timing its C calls (`send_some`, `wait_ack`) inside it."""
    import statistics

    from transport import bench
    from transport.backends import tcp as wire
    from transport.engine import Engine

    pc = time.perf_counter_ns
    lat: dict[tuple[str, int], list[tuple[float, float]]] = {}
    split: dict[int, list[list[float]]] = {}

    def med(fn: Any, k: int) -> float:
        for _ in range(50):
            fn()
        out = []
        for _ in range(k):
            t0 = pc()
            fn()
            out.append(pc() - t0)
        return statistics.median(out) / 1e3

    for _ in range(rounds):
        for w, tg in (("P", "P"), ("N", "P"), ("P", "N"), ("N", "N")):
            os.environ["WORKBENCH_TCP_NATIVE"] = "1" if tg == "N" else "0"  # the target process inherits it
            target = bench._Target("tcp", 2 * MiB)
            os.environ["WORKBENCH_TCP_NATIVE"] = "1" if w == "N" else "0"
            raw = bench._RawSocket(2 * MiB)
            eng = Engine("tcp", lanes=1)
            try:
                if "N" in (w, tg) and not wire.native_enabled({}):
                    raise SystemExit("--sides: the C lane loop is not built here (make install)")
                src = eng.register(bench._source(eng, 2 * MiB, "cpu"))
                eng.connect(target.desc)
                for size in sizes:
                    k = n if size < MiB else n // 4
                    e = med(lambda size=size, eng=eng, src=src, target=target:
                            eng.write(src, target.desc, size).result(30), k)
                    r = med(lambda size=size, raw=raw: raw.op(size), k)
                    lat.setdefault((w + " / " + tg, size), []).append((e, r))
                    if w == tg == "N":
                        split.setdefault(size, []).append(_writer_split(eng, src, target.desc, size, 2 * k))
            finally:
                eng.close(), raw.close(), target.close()
    os.environ.pop("WORKBENCH_TCP_NATIVE", None)
    lines = [f"Median µs per waited single write at one lane (raw socket loop in the same round in brackets), "
             f"{rounds} rounds; writer / target: N = the C lane loop, P = the Python one:", "",
             "| size | writer / target | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " |",
             "|---|---|" + "---|" * rounds]
    for (pair, size), v in sorted(lat.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {_fmt_bytes(size)} | {pair} | " + " | ".join(f"{e:.1f} ({r:.1f})" for e, r in v) + " |")
    lines += ["", "Both in C, timed inside the writer (median µs; the C calls wrapped with `perf_counter_ns`):", "",
              "| size | `write()` | its `send_some` | its look for the ack | `result()` | its `wait_ack` |",
              "|---|---|---|---|---|---|"]
    for size, rows in sorted(split.items()):
        lines.append(f"| {_fmt_bytes(size)} | " + " | ".join(
            ", ".join(f"{r[i]:.1f}" for r in rows) for i in range(5)) + " |")
    return "\n".join(lines)


def _writer_split(eng: Any, src: Any, desc: Any, size: int, n: int) -> list[float]:
    """Median µs of `write()`, its `send_some`, its `wait_ack` look, `result()`, its `wait_ack` over n writes."""
    import statistics

    from transport.backends import tcp as wire

    nat, pc, acc = wire._native, time.perf_counter_ns, [0, 0, 0]

    class Timed:
        def __getattr__(self, k: str) -> Any:
            return getattr(nat, k)

        @staticmethod
        def send_some(fd: int, bufs: Any) -> int:
            t = pc()
            r = nat.send_some(fd, bufs)
            acc[0] += pc() - t
            return int(r)

        @staticmethod
        def wait_ack(fd: int, buf: Any, pos: int, end: int, timeout_ns: int, spin_ns: int) -> Any:
            t = pc()
            r = nat.wait_ack(fd, buf, pos, end, timeout_ns, spin_ns)
            acc[1 if timeout_ns == 0 else 2] += pc() - t
            return r

    wire._native = Timed()
    try:
        rows = []
        for _ in range(n):
            acc[:] = [0, 0, 0]
            t0 = pc()
            t = eng.write(src, desc, size)
            t1 = pc()
            t.result(30)
            rows.append((t1 - t0, acc[0], acc[1], pc() - t1, acc[2]))
    finally:
        wire._native = nat
    return [statistics.median(r[i] for r in rows) / 1e3 for i in range(5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, default=0, metavar="ROUNDS",
                    help="only measure each side's part on this tree (C or Python writer and target), print it")
    ap.add_argument("--before", help="git ref whose transport/ is the 'before' code (required without --sides)")
    ap.add_argument("--pairs", type=int, default=2, help="before/after pairs (alternating order)")
    ap.add_argument("--soak", type=int, default=20000)
    ap.add_argument("--lanes", type=int, default=4)
    ap.add_argument("--name", default="cpu2-vm-fastpath", help="results file: benchmarks/results/transport-NAME.*")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.sides:
        print(sides(args.sides))
        return
    if not args.before:
        ap.error("--before is required (or --sides ROUNDS)")
    command = (f"python benchmarks/transport_tcp_before_after.py --before {args.before} --pairs {args.pairs} "
               f"--soak {args.soak} --name {args.name}")
    with tempfile.TemporaryDirectory(prefix="wb-transport-before-") as tmp:
        from _trees import archive

        old = archive(args.before, "transport", Path(tmp) / "old")
        order = []
        for i in range(args.pairs):
            pair = [("before", str(old)), ("after", None)]
            order += pair if i % 2 == 0 else pair[::-1]
        runs = []
        for k, (code, path) in enumerate(order, 1):
            label = f"{code}{(k + 1) // 2}"
            print(f"[{time.strftime('%H:%M:%S')}] {label} …", flush=True)
            runs.append(run_one(label, code, path, args.soak, Path(tmp) / label, args.lanes))
    md, rec = compose(runs, args.before, args.name, command)
    out = Path(args.out)
    from workbench.bench.record import write

    md += history(out / f"transport-{args.name}.json", out / f"transport-{args.name}.md")
    write(rec, out / f"transport-{args.name}.json")
    (out / f"transport-{args.name}.md").write_text(md)
    print(md)


def history(old_json: Path, old_md: Path) -> str:
    """A "History" section: the earlier record's headline single-write ratios with each run's load and CPU seconds
    (the run this one replaces), the history lines the earlier table carried, and the earlier table's run,
    single-write and per-write CPU tables as they were."""
    lines: list[str] = []
    if old_json.exists():
        old = json.loads(old_json.read_text())
        summ = old.get("summary", {})
        cells = [f"{k.removesuffix('_min_ratio_vs_raw_socket_ge_64KiB')} {v:.2f}" for k, v in summ.items()
                 if k.endswith("_min_ratio_vs_raw_socket_ge_64KiB")]
        over = [f"{v:.1f}" for k, v in summ.items() if k.endswith("_batch_max_overhead_us_per_write")]
        runs = [k.removesuffix("_cpu_s") for k in summ if k.endswith("_cpu_s")]
        load = [f"{r} load {summ.get(f'{r}_load_start', '?')}, {summ[f'{r}_cpu_s']} CPU s" for r in runs]
        if cells:
            lines.append(f"- {old.get('date', '?')[:16]}, before = `{summ.get('before_ref', '?')}` "
                         f"(`{old.get('command', '')}`): single writes >= 64 KiB, worst ratio to the raw socket per "
                         f"run: {', '.join(cells)}; batch overhead per write at most {', '.join(over)} us"
                         + (f"; {'; '.join(load)}" if load else ""))
    tables = ""
    if old_md.exists():
        body, _, hist = old_md.read_text().partition("\n## History\n")
        lines += [ln for ln in hist.splitlines() if ln.startswith("- ")]
        keep = ["#### " + block.strip() for block in body.split("\n## ")
                if block.startswith(("Single writes", "CPU and context switches"))]
        runs_table = [ln for ln in body.splitlines() if ln.startswith(("| run |", "|---|---|---|---|---|",
                                                                        "| before", "| after"))]
        if keep:
            tables = ("\n### The replaced record's tables, as they were\n\n" + "\n".join(runs_table[:6]) + "\n\n"
                      + "\n\n".join(keep) + "\n")
    if not lines:
        return ""
    return "\n## History\n\n" + "\n".join(lines) + "\n" + tables


if __name__ == "__main__":
    main()
