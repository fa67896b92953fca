"""Where the host time of posting a large paged write goes on the cuda_ipc path, without a GPU.

    python3 benchmarks/cuda_ipc_posting.py --out benchmarks/results/cuda_ipc-posting-cpu.json
    python3 benchmarks/cuda_ipc_posting.py --launch-us 4.3 --iters 200 --attribution --out posting.json

Two parts, both on the CPU alone (runs anywhere the project's tests run):

- `steps`: the numpy steps a paged write of n pages costs the host, median µs per call, the same arrays over and
  over (so in the host's caches: a lower bound; in a real posting the data is colder): the engine's
  (`np.concatenate` of the two index lists, the one unsigned max reduction that bounds both) and the path's
  (the 2n indices into a pinned-ring-sized buffer, one copy);
- `attribution` (`--attribution`): `post`'s one-kernel engine with the path's previous ring order (the slot freed
  longest ago) and its previous completion (the callback, holding the engine's index lists, kept until the
  poller thread dropped the write), one at a time, against the current path;
- `post`: `Engine.write_paged` end to end through `CudaIpcPath` on a stand-in CUDA runtime whose calls return at
  once (`--sync-us`: its eventSynchronize sleeps, the GIL released, as a caller waits for the GPU) and whose kernel
  launch spins `--launch-us` µs (the host cost of one `cuLaunchKernel` measured on one H200: ~4.1–5.3 µs), one
  engine with the defaults (`default`: the poller blocking once idle) and one with a napping
  poller (`naps`: `idle_naps=20`), interleaved write by write: median µs until the kernel was launched (when the
  GPU may start), until `write_paged` returned, and split at the path's `submit_pages` (the engine's part before
  it, the path's after), and the launches per write.

What it cannot show: the GPU's copy time, and how a VM's host compares with this one (run it there too).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KiB, MiB = 1 << 10, 1 << 20
SHAPES = ((16 * MiB, 16 * KiB), (64 * MiB, 16 * KiB), (64 * MiB, 32 * KiB), (256 * MiB, 16 * KiB),
          (256 * MiB, 32 * KiB), (256 * MiB, 64 * KiB), (8 * MiB, 32 * KiB))


def _med_us(fn: Any, iters: int) -> float:
    for _ in range(min(20, iters)):
        fn()
    ts = []
    for _ in range(iters):
        a = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - a)
    return statistics.median(ts) / 1e3


def steps(iters: int) -> dict[str, Any]:
    """The numpy steps of posting, per shape (median µs)."""
    from transport.backends.cuda_ipc import _HostRing

    umax = np.maximum.reduce
    ring = np.zeros(_HostRing.SLOT // 8, np.int64)
    out: dict[str, Any] = {}
    for total, page in SHAPES:
        n = total // page
        rng = np.random.default_rng(n)
        sp, dp = rng.permutation(n), rng.permutation(n)
        both = np.concatenate((sp, dp))
        out[f"{total // MiB}MiB_{page // KiB}KiB"] = {
            "pages": n,
            "engine_concat_us": round(_med_us(partial(np.concatenate, (sp, dp)), iters), 2),
            "engine_umax_us": round(_med_us(partial(umax, both.view(np.uint64)), iters), 2),
            "path_copy_us": round(_med_us(partial(np.copyto, ring[:2 * n], both), iters), 2),
        }
    return out


class _Rt:
    """A CUDA runtime stand-in: every call returns at once (the source's stream is idle, events never ready), but
    `eventSynchronize`, which with `sync_us` > 0 sleeps that long with the GIL released, as CuPy's binding waits
    for the GPU (other threads, the path's poller, then run while the caller waits, not while it posts)."""

    def __init__(self, sync_us: float = 0.0) -> None:
        self._ev = itertools.count(1)
        self.sync_s = sync_us * 1e-6

    def getDevice(self) -> int:
        return 0

    def setDevice(self, dev: int) -> None:
        return None

    def streamQuery(self, stream: int) -> int:
        return 0

    def eventCreateWithFlags(self, flags: int) -> int:
        return next(self._ev)

    def eventRecord(self, ev: int, stream: int) -> None:
        return None

    def streamWaitEvent(self, stream: int, ev: int, flags: int) -> None:
        return None

    def memcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> None:
        return None

    def eventSynchronize(self, ev: int) -> None:
        if self.sync_s:
            time.sleep(self.sync_s)

    def streamSynchronize(self, stream: int) -> None:
        return None

    def eventQuery(self, ev: int) -> int:
        return 600

    def eventDestroy(self, ev: int) -> None:
        return None


def post(iters: int, launch_us: float, sync_us: float = 0.0) -> dict[str, Any]:
    """`write_paged` through `CudaIpcPath` on the stand-in runtime, the defaults (`default`) against a poller napping
    once idle (`naps`: `idle_naps=20`, not woken by each submit), one kernel per write either way; each
    engine's time split at the path's `submit_pages` (`*_engine_us`: the engine's checks before it, `*_path_us`:
    the path's posting). `sync_us`: the stand-in's `eventSynchronize` sleeps that long, the GIL released."""
    import kernels._cuda as kc
    from transport.backends.cuda_ipc import CudaIpcPath, _Remote
    from transport.engine import Engine
    from transport.testing import CudaTensorStandIn, PinnedStandIn

    launched: list[int] = []
    marks: list[int] = []
    spin = int(launch_us * 1e3)

    def launch(fn: int, gx: int, gy: int, gz: int, bx: int, by: int, bz: int, shared: int, stream: int,
               params: int, extra: int) -> None:
        t = time.perf_counter_ns()
        launched.append(t)
        while time.perf_counter_ns() - t < spin:
            pass

    def raw(device: int, name: str) -> Any:
        r = kc._Raw.__new__(kc._Raw)
        r.fn, r.ptr, r.launch, r.rt = None, 1, launch, _Rt(sync_us)
        return r

    stream = SimpleNamespace(cuda_stream=0x5000, synchronize=lambda: None)
    torch = SimpleNamespace(uint8=np.uint8, cuda=SimpleNamespace(Stream=lambda device=None: stream),
                            empty=lambda n, dtype=None, pin_memory=False, device=None: PinnedStandIn(n),
                            _C=SimpleNamespace(_cuda_getCurrentRawStream=lambda dev: 0))
    real_raw = kc._raw
    kc._raw = raw  # type: ignore[assignment]
    top = max(t for t, _ in SHAPES)
    out: dict[str, Any] = {"launch_us": launch_us}
    try:
        with Engine("tcp", lanes=1) as tgt, Engine("tcp", lanes=2) as e1, Engine("tcp", lanes=2) as e2:
            dst = tgt.register(np.zeros(top, np.uint8)).descriptor  # never touched: the stand-in copies nothing
            engines = {}
            for name, eng in (("default", e1), ("naps", e2)):
                src = eng.register(np.zeros(top, np.uint8))
                src.flat = CudaTensorStandIn(top, 1 << 40)
                eng.connect(dst)
                path = CudaIpcPath(eng, runtime=(torch, _Rt(sync_us)))
                path.handles = lambda s, d: True  # type: ignore[method-assign]
                path.submit_pages = partial(_marked, path.submit_pages, marks)  # type: ignore[method-assign]
                if name == "naps":  # its poller naps 20 grace periods once idle instead of blocking at once
                    path.idle_naps = 20
                path._opened[(dst.engine, dst.region)] = _Remote(CudaTensorStandIn(top, 1 << 41))
                old = eng._path
                eng._path = path
                engines[name] = (eng, src, path, old)
            try:
                for total, page in SHAPES:
                    n = total // page
                    rng = np.random.default_rng(n)
                    sp, dp = rng.permutation(n), rng.permutation(n)
                    res: dict[str, dict[str, list[float]]] = {
                        k: {"launched": [], "post": [], "launches": [], "engine": [], "path": []} for k in engines}
                    for i in range(iters + 10):
                        for name, (eng, src, _path, _old) in engines.items():
                            launched.clear()
                            marks.clear()
                            a = time.perf_counter_ns()
                            t = eng.write_paged(src, dst, page_bytes=page, src_pages=sp, dst_pages=dp)
                            b = time.perf_counter_ns()
                            t.result(5)  # the stand-in's event "synchronises" at once (or after sync_us)
                            if i >= 10:
                                res[name]["launched"].append((launched[0] - a) / 1e3)
                                res[name]["post"].append((b - a) / 1e3)
                                res[name]["launches"].append(len(launched))
                                res[name]["engine"].append((marks[0] - a) / 1e3)
                                res[name]["path"].append((marks[1] - marks[0]) / 1e3)
                    row: dict[str, Any] = {"pages": n}
                    for name, r in res.items():
                        row[f"{name}_launched_us"] = round(statistics.median(r["launched"]), 2)
                        row[f"{name}_post_us"] = round(statistics.median(r["post"]), 2)
                        row[f"{name}_engine_us"] = round(statistics.median(r["engine"]), 2)
                        row[f"{name}_path_us"] = round(statistics.median(r["path"]), 2)
                        row[f"{name}_launches"] = int(statistics.median(r["launches"]))
                    out[f"{total // MiB}MiB_{page // KiB}KiB"] = row
            finally:
                for eng, _src, path, old in engines.values():
                    eng._path = old
                    path.close()
    finally:
        kc._raw = real_raw  # type: ignore[assignment]
    return out


def _marked(fn: Any, marks: list[int], *a: Any) -> Any:
    """`fn(*a)` with the times it was entered and left appended to `marks` (ns)."""
    marks.append(time.perf_counter_ns())
    try:
        return fn(*a)
    finally:
        marks.append(time.perf_counter_ns())


def attribution(iters: int, launch_us: float, repeats: int = 3) -> dict[str, Any]:
    """One kernel per write (`post`'s `default` engine) under the path's previous behaviours, one at a time: the
    ring handing out the slot freed longest ago (`take_oldest`) instead of the one freed last, and a completed
    write's `_Pending` keeping its callback (and with it the engine's index lists, freed later by the poller
    thread) instead of releasing it in the completing thread. Median over `repeats` runs of the median µs until
    `write_paged` returned."""
    from transport.backends.cuda_ipc import CudaIpcPath, _HostRing

    take, complete = _HostRing.take, CudaIpcPath._complete

    def take_oldest(self: Any, nwords: int) -> Any:
        """`_HostRing.take` as it was before (211925c): the slot freed longest ago first (all 32 in turn)."""
        self.free.rotate(-1)  # the slot freed longest ago to the end `take` pops from
        return take(self, nwords)

    def keep_callback(self: Any, p: Any, exc: BaseException | None) -> None:
        done = p.done
        complete(self, p, exc)
        p.done = done

    variants = {"before": (take_oldest, keep_callback), "last_freed_slot_only": (take, keep_callback),
                "callback_released_only": (take_oldest, complete), "after": (take, complete)}
    global SHAPES
    shapes = SHAPES
    SHAPES = ((256 * MiB, 16 * KiB), (256 * MiB, 64 * KiB), (16 * MiB, 16 * KiB))
    out: dict[str, Any] = {}
    try:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
        for _ in range(repeats):  # the variants in turn, `repeats` times
            for name, (t, c) in variants.items():
                _HostRing.take, CudaIpcPath._complete = t, c  # type: ignore[method-assign]
                runs[name].append(post(iters, launch_us))
        for name, rs in runs.items():
            out[name] = {k: round(statistics.median(r[k]["default_post_us"] for r in rs), 2)
                         for k in rs[0] if k != "launch_us"}
    finally:
        _HostRing.take, CudaIpcPath._complete = take, complete  # type: ignore[method-assign]
        SHAPES = shapes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200, help="timed repetitions per point")
    ap.add_argument("--launch-us", type=float, default=4.3,
                    help="host µs the stand-in kernel launch spins (one H200's cuLaunchKernel: ~4.1-5.3)")
    ap.add_argument("--sync-us", type=float, default=0.0,
                    help="the stand-in's eventSynchronize sleeps this long with the GIL released, as a caller waits "
                         "for the GPU (0: returns at once, holding the GIL)")
    ap.add_argument("--attribution", action="store_true",
                    help="also post one kernel per write under the path's previous ring order and callback "
                         "handling, one change at a time (before/after on this host)")
    ap.add_argument("--machine", default=platform.node())
    ap.add_argument("--out", default="", help="JSON file to write")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.launch_us < 0 or args.sync_us < 0:
        ap.error("--iters must be >= 1, --launch-us and --sync-us >= 0")
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"steps": steps(args.iters), "post": post(args.iters, args.launch_us, args.sync_us)}
    if args.attribution:
        doc["attribution"] = attribution(args.iters, args.launch_us)
    doc["meta"] = {"machine": args.machine, "platform": platform.platform(), "python": platform.python_version(),
                   "numpy": np.__version__, "cpus": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
                   "wall_s": round(time.perf_counter() - t0, 1),
                   "command": "python3 benchmarks/cuda_ipc_posting.py " + " ".join(argv or sys.argv[1:])}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))
    for part in ("steps", "post", "attribution"):
        if part not in doc:
            continue
        print(f"{part}:")
        for k, v in doc[part].items():
            print(f"  {k}: {json.dumps(v)}")
    print("meta:", json.dumps(doc["meta"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
