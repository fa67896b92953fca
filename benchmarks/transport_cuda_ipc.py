"""cuda_ipc on one GPU or two, the fast path or the legacy one, in one command (issue 15's targets).

    python3 benchmarks/transport_cuda_ipc.py --path fast --target-device cuda:1 --out fast-2gpu.json
    python3 benchmarks/transport_cuda_ipc.py --path legacy --target-device cuda:0 --out legacy-1gpu.json

Runs `transport.bench.run` (the rows of `workbench bench transport`: single writes over 1 and 2
lanes, batches, paged writes and the paged layer write, the imm round trip, the device-copy and,
across GPUs, NCCL baselines in the same run) with at most `--iters` repetitions per point, then
the per-write costs of 4 KiB single writes against a fresh target: the median time until
`write()` returned (posting) and until done, and the round trip of a write whose immediate the
target echoes over the control socket (imm delivery + echo). On cuda_ipc also: the per-write overhead
(single 4 KiB p50 − device copy p50) per round over `--rounds` rounds in one process and its median
(`overhead_rounds`), and paged writes against single writes of the same total over 16, 64 and 256 MiB
in 16, 32 and 64 KiB pages (`paged_sweep`). `--pages launch|graph|resident` picks how the fast path starts
a paged write; `--probe` adds the copies alone on the GPU and the host's cost of each way of starting a
paged write against `cudaMemcpyAsync` (`launch_probe`); `--index-probe` the page kernel's GPU time at 64 and
256 MiB with its page indices in pinned host memory, in device memory, and copied there first as the path does,
against `cudaMemcpyAsync` (`index_probe`); `--sweep-modes launch,hostidx,devidx` runs the full run's sweep with
one engine per way, interleaved (`hostidx` / `devidx`: page indices read from the pinned ring slot / from device
memory at every page size, against the default's device copy for pages of >= 64 KiB); `--quick` runs only the
rounds, the sweep (one engine per `--modes` way, interleaved) and the launch probe. Writes JSON (rows, ratios, per-write
costs, which copies and immediates the path used, the machine) and prints the markdown table.
`--backend tcp --device cpu` runs the same plumbing without a GPU.

    python3 benchmarks/transport_cuda_ipc.py --quick --probe --modes launch,graph --rounds 15 --out quick.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KiB, MiB = 1 << 10, 1 << 20
SIZES = (4 * KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB, 256 * MiB)
SWEEP_TOTALS = (16 * MiB, 64 * MiB, 256 * MiB)  # 16 MiB: one KV layer of a 4k-token prompt of a 70B-class model
SWEEP_PAGES = (16 * KiB, 32 * KiB, 64 * KiB)


def _median_us(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6 if xs else float("nan")


def _paged_op(eng: Any, src: Any, desc: Any, page: int, sp: Any, dp: Any, post: list[float]) -> Any:
    """One timed paged write of pages `sp` of `src` into pages `dp` of `desc`, waited; its posting time goes to
    `post` (seconds)."""
    def op(size: int) -> None:
        a = time.perf_counter()
        t = eng.write_paged(src, desc, page_bytes=page, src_pages=sp, dst_pages=dp)
        post.append(time.perf_counter() - a)
        t.result(60)
    return op


def per_write(backend: str, device: str, target_device: str, iters: int) -> dict[str, Any]:
    """Posting and completion of 4 KiB single writes, and the round trip of a write with an echoed immediate."""
    from transport import bench
    from transport.engine import Engine

    target = bench._Target(backend, 16 * MiB, target_device)
    out: dict[str, Any] = {}
    try:
        with Engine(backend, lanes=2) as eng:
            src = eng.register(bench._source(eng, 16 * MiB, device))
            eng.connect(target.desc)
            post, done = [], []
            for i in range(iters + 20):
                a = time.perf_counter()
                t = eng.write(src, target.desc, 4 * KiB)
                b = time.perf_counter()
                t.result(60)
                c = time.perf_counter()
                if i >= 20:
                    post.append(b - a)
                    done.append(c - a)
            rt, k = [], 0
            for i in range(iters // 2 + 10):
                a = time.perf_counter()
                t = eng.write(src, target.desc, 4 * KiB, imm=9)
                k += 1
                eng.counter.wait(9, k, timeout=10)
                if i >= 10:
                    rt.append(time.perf_counter() - a)
                t.result(10)
            out = {"write_4KiB_post_us": _median_us(post), "write_4KiB_done_us": _median_us(done),
                   "write_4KiB_imm_echo_rt_us": _median_us(rt), "iters": iters}
            out.update(_path_submit(eng, src, target.desc, iters))
            out["stages"] = post_stages(eng, src, target.desc, iters)
            out["used"] = dict(getattr(getattr(eng, "_path", None), "used", {}) or {})
    finally:
        target.close()
    return out


def _mode_opts(mode: str | None) -> dict[str, Any]:
    """Engine options of a way of starting a paged write: a `pages=` mode of the cuda_ipc path (`launch`,
    `graph`, `resident`), `hostidx` / `devidx` (launched, the kernel reading its page indices from the pinned ring
    slot / from device memory at every page size: `index_device_page=0` / `1`; the default copies them to device
    memory for pages of >= `INDEX_DEVICE_PAGE`), or None (the path's defaults)."""
    if mode is None:
        return {}
    if mode == "hostidx":  # every page kernel reads its indices from the pinned ring slot (as before 64 KiB pages)
        return {"pages": "launch", "index_device_page": 0}
    if mode == "devidx":  # every page kernel reads its indices from device memory (one upload per write)
        return {"pages": "launch", "index_device_page": 1}
    if mode not in ("launch", "graph", "resident"):
        raise SystemExit(f"paged-write mode must be launch, graph, resident, hostidx or devidx, got {mode!r}")
    return {"pages": mode}


def paged_sweep(device: str, target_device: str, iters: int, totals: tuple[int, ...] = SWEEP_TOTALS,
                pages: tuple[int, ...] = SWEEP_PAGES, modes: tuple[str | None, ...] = (None,)) -> dict[str, Any]:
    """Paged writes against single writes of the same total, per total: one engine (2 lanes) per way of
    starting a paged write (`modes`: `pages=` of the cuda_ipc path, or where the kernel reads its indices, see
    `_mode_opts`; None: the path's defaults), all open at once;
    a single write (the first engine's) and a paged write of each page size and mode (random page permutations),
    interleaved op by op (`bench._interleaved`); median µs until done and until `write_paged()` returned, and
    single / paged (the issue's "paged ≥ 0.8× single" ratio). At most `iters` repetitions per op at 16 MiB,
    fewer for larger totals."""
    import numpy as np

    from transport import bench
    from transport.engine import Engine

    top = max(totals)
    target = bench._Target("cuda_ipc", top, target_device)
    out: dict[str, Any] = {}
    engines: dict[str, Any] = {}
    try:
        srcs = {}
        for mode in modes:
            name = mode or "default"
            opts = _mode_opts(mode)
            eng = engines[name] = Engine("cuda_ipc", lanes=2, **opts)
            srcs[name] = eng.register(bench._source(eng, top, device))
            eng.connect(target.desc)
        first = next(iter(engines))
        for total in totals:
            ops: dict[str, Any] = {"single": lambda size: engines[first].write(srcs[first], target.desc,
                                                                               size).result(60)}
            posts: dict[str, list[float]] = {}
            for page in pages:
                n = total // page
                rng = np.random.default_rng(page + n)
                sp, dp = rng.permutation(n), rng.permutation(n)
                for name, eng in engines.items():
                    key = f"{page // KiB}KiB" + ("" if len(engines) == 1 else f"_{name}")
                    posts[key] = []
                    ops[key] = _paged_op(eng, srcs[name], target.desc, page, sp, dp, posts[key])
            it = max(10, iters * 16 * MiB // total) if total > 16 * MiB else iters
            lat = bench._interleaved(ops, total, it)
            single = _median_us(lat["single"])
            row: dict[str, Any] = {"single_us": round(single, 2), "iters": len(lat["single"])}
            for key, post in posts.items():
                paged = _median_us(lat[key])
                row[f"paged_{key}_us"] = round(paged, 2)
                row[f"paged_{key}_post_us"] = round(_median_us(post[1:]), 2)
                row[f"paged_{key}_vs_single"] = round(single / paged, 3)
            for name in engines:
                sfx = "" if len(engines) == 1 else f"_{name}"
                row[f"min_vs_single{sfx}"] = min(v for k, v in row.items()
                                                 if k.endswith(f"{sfx}_vs_single") and k.startswith("paged_"))
            out[f"{total // MiB}MiB"] = row
        out["used"] = {name: dict(getattr(getattr(eng, "_path", None), "used", {}) or {})
                       for name, eng in engines.items()}
    finally:
        for eng in engines.values():
            eng.close()
        target.close()
    return out


def overhead_rounds(device: str, target_device: str, rounds: int, iters: int) -> dict[str, Any]:
    """The per-write overhead (issue 15: single 4 KiB write p50 − device copy 4 KiB p50) over `rounds` rounds
    in one process: each round interleaves `iters` single 4 KiB writes of a 1-lane and of a 2-lane engine
    (`write` + `result`) with the device-copy baseline (`copy_` + device synchronise); per round each p50, the
    writes' p50 until `write()` returned (`*_post`) and the difference; then the median, min and max of the
    differences over the rounds."""
    from transport import bench
    from transport.engine import Engine

    target = bench._Target("cuda_ipc", 16 * MiB, target_device)
    dcopy = bench._DeviceCopy(16 * MiB, device, target_device)
    per: dict[str, list[float]] = {"single_1lane": [], "single_2lanes": [], "device_copy": [],
                                   "overhead_1lane": [], "overhead_2lanes": [], "single_1lane_post": [],
                                   "single_2lanes_post": []}
    posts: dict[str, list[float]] = {}
    try:
        with Engine("cuda_ipc", lanes=1) as e1, Engine("cuda_ipc", lanes=2) as e2:
            ops: dict[str, Any] = {}
            for name, eng in (("single_1lane", e1), ("single_2lanes", e2)):
                src = eng.register(bench._source(eng, 16 * MiB, device))
                eng.connect(target.desc)
                posts[name] = []

                def op(size: int, eng: Any = eng, src: Any = src, post: list[float] = posts[name]) -> None:
                    a = time.perf_counter()
                    t = eng.write(src, target.desc, size)
                    post.append(time.perf_counter() - a)
                    t.result(60)
                ops[name] = op
            ops["device_copy"] = dcopy.op
            for _ in range(rounds):
                for xs in posts.values():
                    xs.clear()
                lat = bench._interleaved(ops, 4 * KiB, iters)
                p50 = {k: _median_us(v) for k, v in lat.items()}
                for k, us in p50.items():
                    per[k].append(round(us, 2))
                for k, xs in posts.items():  # where a slow round's time goes: posting, or waiting for the copy
                    per[f"{k}_post"].append(round(_median_us(xs[1:]), 2))
                per["overhead_1lane"].append(round(p50["single_1lane"] - p50["device_copy"], 2))
                per["overhead_2lanes"].append(round(p50["single_2lanes"] - p50["device_copy"], 2))
    finally:
        dcopy.close()
        target.close()
    out: dict[str, Any] = {"rounds": rounds, "iters_per_round": iters, "per_round": per}
    for k, xs in per.items():
        out[f"{k}_median_us"] = round(statistics.median(xs), 2)
    for k in ("overhead_1lane", "overhead_2lanes"):
        out[f"{k}_min_us"], out[f"{k}_max_us"] = min(per[k]), max(per[k])
    return out


def _path_submit(eng: Any, src: Any, desc: Any, iters: int) -> dict[str, float]:
    """The data path's share of posting: `submit` alone (no engine checks, no Transfer bookkeeping) for
    a 4 KiB single write and a 256 x 32 KiB paged write, median µs; the engine's share is the rest of
    `post_us`."""
    path = getattr(eng, "_path", None)
    if path is None or not hasattr(path, "submit"):
        return {}
    import numpy as np

    from transport.backends.base import Pieces
    from transport.completion import Transfer

    page, n = 32 * KiB, 256
    rng = np.random.default_rng(n)
    shapes = {"write_4KiB": Pieces.one(0, 0, 4 * KiB),
              "paged_256x32KiB": Pieces(rng.permutation(n) * page, rng.permutation(n) * page,
                                        np.full(n, page, np.int64), page)}
    out = {}
    for name, pieces in shapes.items():
        end = int((pieces.src + pieces.length).max()), int((pieces.dst + pieces.length).max())
        if end[0] > src.nbytes or end[1] > desc.nbytes:  # submit trusts the engine's checks: keep within both
            raise ValueError(f"{name}: pieces end at {end}, regions hold {src.nbytes} / {desc.nbytes} bytes")
        ts = []
        for i in range(iters + 20):
            t = Transfer(0, name, None)
            a = time.perf_counter()
            path.submit(t, src, desc, pieces, lambda exc: None)
            b = time.perf_counter()
            for hook in t.hooks:
                hook()
            if i >= 20:
                ts.append(b - a)
        out[f"{name}_path_submit_us"] = _median_us(ts)
    return out


_STAGES = (("engine", "_check_src"), ("engine", "_check_dst"), ("engine", "_link"), ("engine", "_new"),
           ("engine", "_submit_path"), ("path", "submit"), ("path", "_remote"), ("path", "_lane"),
           ("path", "_current_stream"), ("path", "_local"), ("path", "_pages"), ("path", "_event"),
           ("path", "_post_resident"), ("path", "_device_index"))


def post_stages(eng: Any, src: Any, desc: Any, iters: int) -> dict[str, dict[str, float]]:
    """Where posting goes: each engine and path step of a paged write (16 MiB in 16 KiB pages, the 256 x 32 KiB
    layer, 16 MiB in 64 KiB pages: its indices copied to device memory) and of a single 16 MiB write, timed with `perf_counter_ns` around the call (median µs per write;
    each wrapper adds ~0.2 µs), next to the whole `write()`/`write_paged()` until it returned (`post`)."""
    import numpy as np

    path = getattr(eng, "_path", None)
    if path is None:
        return {}
    owners = {"engine": eng, "path": path}
    spent: dict[str, list[int]] = {}
    wrapped = []
    for who, name in _STAGES:
        obj = owners[who]
        fn = getattr(obj, name, None)
        if fn is None:
            continue

        def timed(*a: Any, _fn: Any = fn, _key: str = f"{who}.{name}", **k: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return _fn(*a, **k)
            finally:
                spent.setdefault(_key, []).append(time.perf_counter_ns() - t0)
        setattr(obj, name, timed)
        wrapped.append((obj, name))
    out: dict[str, dict[str, float]] = {}
    try:
        shapes = {"single_16MiB": None, "paged_1024x16KiB": (16 * KiB, 1024), "paged_256x32KiB": (32 * KiB, 256),
                  "paged_256x64KiB": (64 * KiB, 256)}
        for label, shape in shapes.items():
            if shape is not None:
                rng = np.random.default_rng(shape[1])
                sp, dp = rng.permutation(shape[1]), rng.permutation(shape[1])
            posts = []
            for i in range(iters + 20):
                if i == 20:
                    _wrap_inner(path, spent, wrapped)
                    spent.clear()
                a = time.perf_counter_ns()
                if shape is None:
                    t = eng.write(src, desc, 16 * MiB)
                else:
                    t = eng.write_paged(src, desc, page_bytes=shape[0], src_pages=sp, dst_pages=dp)
                posts.append(time.perf_counter_ns() - a)
                t.result(60)
            row = {"post": statistics.median(posts[20:]) / 1e3}
            row.update({k: statistics.median(v) / 1e3 for k, v in spent.items()})
            row["calls_per_write"] = {k: round(len(v) / iters, 2) for k, v in spent.items()}  # type: ignore[assignment]
            out[label] = row
    finally:
        for obj, name in wrapped:
            if isinstance(obj, dict):
                obj[name] = obj[name].__wrapped__
            else:
                delattr(obj, name)
    return out


def _wrap_inner(path: Any, spent: dict[str, list[int]], wrapped: list[Any]) -> None:
    """Time the page kernel's launcher (`path.launch`: packing and one `cuLaunchKernel`) and the ring's `take`
    too, once the path made them (each once)."""
    def timer(fn: Any, key: str) -> Any:
        def timed(*a: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return fn(*a)
            finally:
                spent.setdefault(key, []).append(time.perf_counter_ns() - t0)
        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed
    launchers = getattr(path, "_copy_pages", None)
    if isinstance(launchers, dict):
        for dev, fn in list(launchers.items()):
            if not hasattr(fn, "__wrapped__"):
                launchers[dev] = timer(fn, "path.launch")
                wrapped.append((launchers, dev))
    ring = getattr(path, "_ring", None)
    if ring is not None and "take" not in vars(ring):
        ring.take = timer(ring.take, "path.ring_take")
        wrapped.append((ring, "take"))


def resident_compare(target_device: str, iters: int, ctas: tuple[int, ...] = (0, 32)) -> dict[str, Any]:
    """Paged writes started by a kernel launch (the default) against the resident copier (`pages="resident"`),
    in one process, interleaved op by op: for each copier size (CTAs, 0: one per SM) a launch engine and a
    resident engine are open
    at once (the resident CTAs stay on the GPU meanwhile), each paged shape's median time until done and until
    posted, the launch engine's single 16 MiB write as the reference, and the posting stages of both. No
    device-wide synchronise may run while a resident copier is up (it would wait for the engine to close)."""
    import numpy as np
    import torch

    from transport import bench
    from transport.engine import Engine

    shapes = [(16 * KiB, 1024), (32 * KiB, 512), (64 * KiB, 256), (32 * KiB, 256)]
    target = bench._Target("cuda_ipc", 32 * MiB, target_device)
    out: dict[str, Any] = {"shapes": [f"{n}x{p // KiB}KiB" for p, n in shapes]}
    try:
        with Engine("cuda_ipc", lanes=2, pages="launch") as a:
            src_a = a.register(bench._source(a, 16 * MiB, "cuda:0"))
            a.connect(target.desc)
            for k in ctas:
                torch.cuda.synchronize()  # before the copier starts (none runs now)
                with Engine("cuda_ipc", lanes=2, pages="resident", resident_ctas=k) as b:
                    src_b = b.register(bench._source(b, 16 * MiB, "cuda:0"))
                    torch.cuda.synchronize()
                    b.connect(target.desc)
                    posts: dict[str, list[float]] = {}
                    ops: dict[str, Any] = {}

                    def single(size: int, eng: Any = a, src: Any = src_a) -> None:
                        eng.write(src, target.desc, 16 * MiB).result(60)
                    ops["single_16MiB"] = single
                    for page, n in shapes:
                        rng = np.random.default_rng(page + n)
                        sp, dp = rng.permutation(n), rng.permutation(n)
                        for name, eng, src in (("launch", a, src_a), ("resident", b, src_b)):
                            key = f"{name}_{n}x{page // KiB}KiB"
                            posts[key] = []
                            ops[key] = _paged_op(eng, src, target.desc, page, sp, dp, posts[key])
                    lat = bench._interleaved(ops, 16 * MiB, iters)
                    row: dict[str, Any] = {k_: round(_median_us(v), 2) for k_, v in lat.items()}
                    row.update({f"{k_}_post": round(_median_us(v[1:]), 2) for k_, v in posts.items()})
                    ref = _median_us(lat["single_16MiB"])
                    for page, n in shapes[:3]:
                        for name in ("launch", "resident"):
                            key = f"{name}_{n}x{page // KiB}KiB"
                            row[f"{key}_vs_single"] = round(ref / _median_us(lat[key]), 3)
                    row["stages_resident"] = post_stages(b, src_b, target.desc, iters)
                    row["used_resident"] = dict(getattr(b._path, "used", {}))
                    out[f"ctas_{k}"] = row
            out["stages_launch"] = post_stages(a, src_a, target.desc, iters)
            out["used_launch"] = dict(getattr(a._path, "used", {}))
    finally:
        target.close()
    return out


def _batched(fn: Any, k: int) -> Any:
    def run() -> None:
        for _ in range(k):
            fn()
    return run


def _after_sync(fn: Any) -> Any:
    """`fn` whose timing starts once the GPU is idle (the synchronise is outside `_cpu_us`'s clock)."""
    import torch

    class _Sync:
        def __call__(self) -> None:
            fn()

        def before(self) -> None:
            torch.cuda.synchronize()
    return _Sync()


def _cpu_us(fn: Any, repeats: int) -> float:
    """Median µs of the host calling `fn` (what a posting thread pays for it)."""
    ts = []
    before = getattr(fn, "before", None)
    for _ in range(repeats):
        if before is not None:
            before()
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    return _median_us(ts)


def probe(repeats: int, k: int = 10) -> dict[str, Any]:
    """The copies under the writes, apart from the engine: GPU time (CUDA events around `k` back-to-back
    launches, per launch, so the host's issue time hides behind the GPU's work) of cudaMemcpyAsync
    against torch's `copy_` (16, 64, 256 MiB) and, for each paged shape of the benchmark, of the
    page-copy kernel (`copy_pages`, byte offsets) against the range kernel that paged writes used
    before (`copy_ranges`, 16-byte words), offsets in device memory; the host's cost of one launch of
    each, and of the numpy steps a 256-page write takes; and whether each page copy was exact. Host costs
    with the GPU idle (`_idle_`: each call after a synchronise, as in a posting thread that waited) beside
    the back-to-back ones. Where one launch costs the host more than the kernel runs, `pages_*_us` is the
    launch rate, not the kernel's GPU time."""
    import numpy as np
    import torch
    from cupy.cuda import runtime as rt

    from kernels._cuda import copy_pages, copy_ranges, index_copier, page_copier
    from kernels.bench import gpu_time

    stream = torch.cuda.current_stream().cuda_stream
    src = torch.randint(0, 255, (256 * MiB,), dtype=torch.uint8, device="cuda:0")
    dst = torch.empty_like(src)
    sp_, dp_ = src.data_ptr(), dst.data_ptr()
    out: dict[str, float] = {}
    for size in (16 * MiB, 64 * MiB, 256 * MiB):
        mc = partial(rt.memcpyAsync, dp_, sp_, size, 4, stream)
        out[f"memcpy_{size // MiB}MiB_us"] = 1e6 * gpu_time(_batched(mc, k), repeats) / k
        tc = partial(dst[:size].copy_, src[:size])
        out[f"torch_copy_{size // MiB}MiB_us"] = 1e6 * gpu_time(_batched(tc, k), repeats) / k
    go, gi = page_copier(0), index_copier(0)
    shapes = ((KiB, 16384), (4 * KiB, 4096), (16 * KiB, 1024), (32 * KiB, 512), (64 * KiB, 256), (32 * KiB, 256))
    for page, n in shapes:
        rng = np.random.default_rng(page + n)
        sp, dp = rng.permutation(n), rng.permutation(n)
        offs = torch.from_numpy(np.concatenate([sp * page, dp * page]).astype(np.int64)).to("cuda:0")
        ranges = torch.from_numpy(np.concatenate([sp * page // 16, dp * page // 16, np.full(n, page // 16)])
                                  .astype(np.int64)).to("cuda:0")
        o_, r_ = offs.data_ptr(), ranges.data_ptr()
        key = f"{page // KiB}KiBx{n}"
        pg = partial(go, sp_, dp_, o_, n, page, stream)
        out[f"pages_{key}_us"] = 1e6 * gpu_time(_batched(pg, k), repeats) / k
        idx = torch.from_numpy(np.concatenate([sp, dp]).astype(np.int64)).to("cuda:0")
        pi = partial(gi, sp_, dp_, idx.data_ptr(), n, page, page, page, stream)  # the page kernel from indices
        out[f"pages_idx_{key}_us"] = 1e6 * gpu_time(_batched(pi, k), repeats) / k
        rg = partial(copy_ranges, sp_, dp_, r_, n, 16, 0, stream)
        out[f"ranges_{key}_us"] = 1e6 * gpu_time(_batched(rg, k), repeats) / k
        dst.zero_()
        copy_pages(sp_, dp_, o_, n, page, 0, stream)
        torch.cuda.synchronize()

        def exact(n: int = n, page: int = page, sp: Any = sp, dp: Any = dp) -> float:
            return float(torch.equal(dst[:n * page].view(n, page)[torch.from_numpy(dp).cuda()],
                                     src[:n * page].view(n, page)[torch.from_numpy(sp).cuda()]))
        out[f"pages_{key}_correct"] = exact()
        out[f"host_launch_pages_{key}_us"] = _cpu_us(pg, repeats)
        torch.cuda.synchronize()
        # the host's cost with the GPU idle (each launch after a synchronise): no queue behind it
        out[f"host_launch_pages_idle_{key}_us"] = _cpu_us(_after_sync(pg), repeats)
        if n == 256:
            out["host_launch_pages_us"] = _cpu_us(pg, repeats)
            out["host_launch_pages_idx_us"] = _cpu_us(pi, repeats)  # five arguments (strides of one page)
            # eight arguments: the general kernel (strides of two pages, indices below n, within the buffers)
            out["host_launch_pages_idx8_us"] = _cpu_us(partial(gi, sp_, dp_, idx.data_ptr(), n, page, 2 * page,
                                                               2 * page, stream), repeats)
            torch.cuda.synchronize()
            dst.zero_()
            pi()
            torch.cuda.synchronize()
            out[f"pages_idx_{key}_correct"] = exact()
            buf = torch.empty(2 * n, dtype=torch.int64, pin_memory=True).numpy()
            out["host_concat_256_us"] = _cpu_us(partial(np.concatenate, (sp, dp), out=buf), repeats)
            both = np.concatenate((sp, dp))
            out["host_max_512_us"] = _cpu_us(partial(np.maximum.reduce, both.view(np.uint64)), repeats)
            out["host_mul_512_us"] = _cpu_us(partial(np.multiply, both, page, out=both), repeats)
        torch.cuda.synchronize()
    out["host_memcpy_async_us"] = _cpu_us(partial(rt.memcpyAsync, dp_, sp_, 4096, 4, stream), repeats)
    out["host_memcpy_async_idle_us"] = _cpu_us(_after_sync(partial(rt.memcpyAsync, dp_, sp_, 4096, 4, stream)), repeats)
    out["host_event_record_us"] = _cpu_us(partial(rt.eventRecord, rt.eventCreateWithFlags(2), stream), repeats)
    out["host_stream_query_us"] = _cpu_us(partial(rt.streamQuery, stream), repeats)
    torch.cuda.synchronize()
    res: dict[str, Any] = {k_: round(v, 2) for k_, v in out.items()}
    try:
        res["launch"] = launch_probe(repeats)
    except Exception as exc:  # noqa: BLE001 - the probes above stand without it
        res["launch"] = {"error": f"{type(exc).__name__}: {exc}"}
    return res


def index_probe(repeats: int, k: int = 3, totals: tuple[int, ...] = (64 * MiB, 256 * MiB),
                pages: tuple[int, ...] = SWEEP_PAGES) -> dict[str, Any]:
    """Where the page kernel reads its page indices, against `cudaMemcpyAsync` of the same total on the GPU alone
    (CUDA events around `k` back-to-back writes, µs per write, median of `repeats`), data several times the L2:
    one launch reading them from pinned host memory (what the path posts for pages below `index_device_page`),
    one reading them from device memory, the same after copying them there from pinned memory on the stream
    (`*_upload`: what the path posts for pages of >= `index_device_page` in writes of more than
    `INDEX_DEVICE_MIN_BYTES`), and `copy_pages` reading byte offsets from pinned host memory (each warp its page's
    two words, as the index kernels read theirs); `*_vs_memcpy` = memcpy / kernel; whether the upload's copy was
    exact."""
    import numpy as np
    import torch
    from cupy.cuda import runtime as rt

    from kernels._cuda import index_copier, page_copier
    from kernels.bench import gpu_time

    stream = torch.cuda.current_stream().cuda_stream
    top = max(totals)
    src = torch.randint(0, 255, (top,), dtype=torch.uint8, device="cuda:0")
    dst = torch.empty_like(src)
    sp_, dp_ = src.data_ptr(), dst.data_ptr()
    gi, go = index_copier(0), page_copier(0)
    out: dict[str, Any] = {}
    for total in totals:
        mc = partial(rt.memcpyAsync, dp_, sp_, total, 4, stream)
        memcpy = 1e6 * gpu_time(_batched(mc, k), repeats) / k
        out[f"memcpy_{total // MiB}MiB_us"] = round(memcpy, 2)
        for page in pages:
            n = total // page
            rng = np.random.default_rng(page + n)
            sp, dp = rng.permutation(n), rng.permutation(n)
            host = torch.from_numpy(np.concatenate([sp, dp])).pin_memory()
            offs = torch.from_numpy(np.concatenate([sp * page, dp * page])).pin_memory()  # byte offsets
            dev = torch.empty(2 * n, dtype=torch.int64, device="cuda:0")
            h_, d_ = host.data_ptr(), dev.data_ptr()

            def upload(n: int = n, page: int = page, h_: int = h_, d_: int = d_) -> None:
                rt.memcpyAsync(d_, h_, 16 * n, 1, stream)  # what the path does for pages >= index_device_page
                gi(sp_, dp_, d_, n, page, page, page, stream)
            row: dict[str, Any] = {}
            for name, fn in (("host_idx", partial(gi, sp_, dp_, h_, n, page, page, page, stream)),
                             ("device_idx", partial(gi, sp_, dp_, d_, n, page, page, page, stream)),
                             ("device_idx_upload", upload),
                             ("warp_host_offsets", partial(go, sp_, dp_, offs.data_ptr(), n, page, stream))):
                us = 1e6 * gpu_time(_batched(fn, k), repeats) / k
                row[f"{name}_us"] = round(us, 2)
                row[f"{name}_vs_memcpy"] = round(memcpy / us, 3)
            dst.zero_()
            dev.zero_()
            upload()
            torch.cuda.synchronize()
            got = dst[:n * page].view(n, page)[torch.from_numpy(dp).cuda()]
            row["upload_correct"] = float(torch.equal(got, src[:n * page].view(n, page)[torch.from_numpy(sp).cuda()]))
            out[f"{total // MiB}MiB_{page // KiB}KiB"] = row
    del src, dst
    torch.cuda.empty_cache()
    return out


def launch_probe(repeats: int, page: int = 32 * KiB, n: int = 256) -> dict[str, Any]:
    """The host's cost of starting one paged write of `n` pages (the 256 x 32 KiB layer) by each way there is,
    in one process, on a non-blocking stream of the kind the transport's lanes use, against cudaMemcpyAsync of
    4 KiB on that stream (median µs per call, back to back; `_idle`: each call after a synchronise). Each
    way's per-call work is what a posting thread would do: pack the arguments, then one call.

    - `memcpy_async`: CuPy's runtime binding (`cudaMemcpyAsync`), the single write's copy;
    - `nop_*`: an empty kernel, no arguments: a launch alone (`cupy_driver`: `cupy.cuda.driver.launchKernel`);
    - `pg_*`: `copy_pages_pg` (five arguments) by `cupy_rawkernel` (`RawKernel.__call__`, CuPy's marshalling),
      `cupy_driver` (the transport's `launch` path: arguments packed into a reused buffer, one
      `cuLaunchKernel`), `cuda_bindings` (cuda-python's `cuda.bindings.driver.cuLaunchKernel`, the same packed
      buffer), `ctypes` (libcuda's `cuLaunchKernel` through ctypes, the GIL released) and `ctypes_gil` (the
      same through `ctypes.PyDLL`, the GIL held);
    - `graph`: the transport's `graph` path (`kernels._cuda.GraphPages`): the job's words and indices into a
      pinned slot, one `cudaGraphLaunch`;
    - `*_correct`: the graph's and the packed launch's copies checked against the pages (1.0 = exact)."""
    import ctypes

    import numpy as np
    import torch
    from cupy.cuda import driver
    from cupy.cuda import runtime as rt

    from kernels import _cuda as kc

    out: dict[str, Any] = {}
    stream = int(rt.streamCreateWithFlags(1))
    src = torch.randint(0, 255, (n * page,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros_like(src)
    sp_, dp_ = src.data_ptr(), dst.data_ptr()
    rng = np.random.default_rng(n)
    spg, dpg = rng.permutation(n), rng.permutation(n)
    slot = torch.zeros(kc.JOB_HEADER + 2 * n, dtype=torch.int64, pin_memory=True)
    words_np = slot.numpy()
    words_np[kc.JOB_HEADER:] = np.concatenate([spg, dpg])
    idx_ptr = slot.data_ptr() + 8 * kc.JOB_HEADER  # the launched kernels read the same indices from host memory
    cpp = -(-page // kc.PAGE_CHUNK)
    grid = min(-(-(n * cpp) // kc.PAGE_WARPS), kc._MAX_GRID)
    threads = 32 * kc.PAGE_WARPS
    pg, nop = kc._raw(0, "copy_pages_pg"), kc._raw(0, "nop_kernel")
    words, pp = kc._words()
    pack = kc._PACK[5].pack_into
    args = (sp_, dp_, idx_ptr, n, page)

    def timed(name: str, fn: Any) -> None:
        try:
            fn()
            rt.streamSynchronize(stream)
            out[f"{name}_us"] = _cpu_us(fn, repeats)
            rt.streamSynchronize(stream)
            out[f"{name}_idle_us"] = _cpu_us(_Synced(fn, stream), repeats)
            rt.streamSynchronize(stream)
        except Exception as exc:  # noqa: BLE001 - a binding this machine lacks: say so, time the rest
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"

    def check(name: str) -> None:
        rt.streamSynchronize(stream)
        got = dst.view(n, page)[torch.from_numpy(dpg).cuda()]
        out[f"{name}_correct"] = float(torch.equal(got, src.view(n, page)[torch.from_numpy(spg).cuda()]))
        dst.zero_()
        torch.cuda.synchronize()

    timed("memcpy_async", partial(rt.memcpyAsync, dp_, sp_, 4096, 4, stream))
    timed("nop_cupy_driver", partial(driver.launchKernel, nop.ptr, 1, 1, 1, 32, 1, 1, 0, stream, 0, 0))
    raw_fn = kc._device_module(0).get_function("copy_pages_pg")
    cstream = kc._external(stream, 0)
    timed("pg_cupy_rawkernel", lambda: raw_fn((grid,), (threads,), (np.uint64(sp_), np.uint64(dp_), np.uint64(idx_ptr),
                                                                    np.int64(n), np.int64(page)), stream=cstream))

    def cupy_driver() -> None:
        pack(words, 0, *args)
        driver.launchKernel(pg.ptr, grid, 1, 1, threads, 1, 1, 0, stream, pp, 0)
    timed("pg_cupy_driver", cupy_driver)
    check("pg_cupy_driver")
    try:
        from cuda.bindings import driver as cbd

        fn_c, st_c = cbd.CUfunction(init_value=pg.ptr), cbd.CUstream(init_value=stream)

        def cuda_bindings() -> None:
            pack(words, 0, *args)
            err = cbd.cuLaunchKernel(fn_c, grid, 1, 1, threads, 1, 1, 0, st_c, pp, 0)[0]
            if err != cbd.CUresult.CUDA_SUCCESS:
                raise RuntimeError(str(err))
        timed("pg_cuda_bindings", cuda_bindings)
    except Exception as exc:  # noqa: BLE001
        out["pg_cuda_bindings_error"] = f"{type(exc).__name__}: {exc}"
    for name, lib in (("ctypes", ctypes.CDLL("libcuda.so.1")), ("ctypes_gil", ctypes.PyDLL("libcuda.so.1"))):
        f = lib.cuLaunchKernel
        f.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        f.restype = ctypes.c_int

        def via_ctypes(f: Any = f) -> None:
            pack(words, 0, *args)
            if f(pg.ptr, grid, 1, 1, threads, 1, 1, 0, stream, pp, None):
                raise RuntimeError("cuLaunchKernel failed")
        timed(f"pg_{name}", via_ctypes)
    gp = kc.GraphPages(0, [slot.data_ptr()])
    try:
        buf = words_np.view(np.uint8).data
        both, slot_ptr = np.concatenate([spg, dpg]), slot.data_ptr()

        def graph() -> None:  # what the transport does per write: the job's words, the indices, the launch
            kc.store_job(buf, 0, sp_, dp_, n, page, page, page)
            words_np[kc.JOB_HEADER:] = both
            gp.launch(slot_ptr, stream)
        timed("graph", graph)
        check("graph")
        timed("graph_launch_only", partial(gp.launch, slot_ptr, stream))
        out["graph_grid"] = gp.grid
        # GPU time of the graph's kernel (fixed grid) against the launched one, back to back
        ev = [rt.eventCreate() for _ in range(2)]
        for name, fn in (("graph", graph), ("pg_cupy_driver", cupy_driver)):
            rt.streamSynchronize(stream)
            rt.eventRecord(ev[0], stream)
            for _ in range(repeats):
                fn()
            rt.eventRecord(ev[1], stream)
            rt.eventSynchronize(ev[1])
            out[f"{name}_gpu_per_write_us"] = rt.eventElapsedTime(ev[0], ev[1]) * 1e3 / repeats
        for e in ev:
            rt.eventDestroy(e)
    finally:
        rt.streamSynchronize(stream)
        gp.close()
        rt.streamDestroy(stream)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


class _Synced:
    """`fn` whose timing starts once `stream` is idle (the synchronise is outside `_cpu_us`'s clock)."""

    def __init__(self, fn: Any, stream: int) -> None:
        self.fn, self.stream = fn, stream

    def __call__(self) -> None:
        self.fn()

    def before(self) -> None:
        from cupy.cuda import runtime

        runtime.streamSynchronize(self.stream)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", choices=("fast", "legacy"), default="fast", help="the cuda_ipc data path")
    ap.add_argument("--peer", choices=("staged", "direct"), default=None, help="how writes cross GPUs (fast path)")
    ap.add_argument("--backend", default="cuda_ipc")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--target-device", default="cuda:0")
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--iters", type=int, default=100, help="at most this many repetitions per point")
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES), help="single-write sizes in bytes")
    ap.add_argument("--machine", default=platform.node())
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--probe", action="store_true", help="also time the copies alone on the GPU (CUDA events)")
    ap.add_argument("--pages", choices=("launch", "graph", "resident"), default=None,
                    help="how the fast path starts a paged write on one GPU (default: the path's default)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds of the per-write overhead measurement")
    ap.add_argument("--quick", action="store_true",
                    help="only the per-write overhead rounds, the paged sweep (one engine per --modes) and, with "
                         "--probe, the launch-cost probe (no rows)")
    ap.add_argument("--modes", default="",
                    help="with --quick: comma-separated ways of starting a paged write to compare (launch,graph)")
    ap.add_argument("--sweep-modes", default="",
                    help="the full run's paged sweep: comma-separated ways of starting a paged write, one engine "
                         "each, interleaved (launch,hostidx,devidx: where the page kernel reads its indices)")
    ap.add_argument("--index-probe", action="store_true",
                    help="also time the page kernel on the GPU at 64 and 256 MiB with its indices in host memory, "
                         "in device memory and copied there first (index_probe)")
    ap.add_argument("--resident", action="store_true",
                    help="only compare launched paged writes with the resident copier (pages=resident), one GPU")
    args = ap.parse_args(argv)
    if args.resident:
        t0, c0 = time.perf_counter(), time.process_time()
        rdoc: dict[str, Any] = {"resident": resident_compare(args.target_device, args.iters)}
        rdoc["meta"] = {"machine": args.machine, "target_device": args.target_device, "cpus": len(os.sched_getaffinity(0)),
                       "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                       "loadavg": os.getloadavg(),
                       "command": "python3 benchmarks/transport_cuda_ipc.py " + " ".join(argv or sys.argv[1:])}
        Path(args.out).write_text(json.dumps(rdoc, indent=1, default=str))
        print("resident:", json.dumps(rdoc, default=str))
        return 0
    sweep_modes = tuple(m for m in args.sweep_modes.split(",") if m) or (None,)
    for m in sweep_modes:
        _mode_opts(m)  # a bad name fails here, before anything runs
    os.environ["WORKBENCH_CUDA_IPC"] = args.path  # read by every engine, the spawned targets' too
    if args.quick:
        t0, c0 = time.perf_counter(), time.process_time()
        modes = tuple(m for m in args.modes.split(",") if m) or (None,)
        qdoc: dict[str, Any] = {}
        if args.probe:
            try:
                qdoc["probe"] = {"launch": launch_probe(min(50, args.iters))}
            except Exception as exc:  # noqa: BLE001 - the rest stands without it
                qdoc["probe"] = {"launch": {"error": f"{type(exc).__name__}: {exc}"}}
            print("probe:", json.dumps(qdoc["probe"]))
        if args.index_probe:
            qdoc["index_probe"] = index_probe(10)
            print("index_probe:", json.dumps(qdoc["index_probe"]))
        qdoc["overhead_rounds"] = overhead_rounds(args.device, args.target_device, args.rounds, args.iters)
        qdoc["paged_sweep"] = paged_sweep(args.device, args.target_device, args.iters, modes=modes)
        qdoc["meta"] = {"machine": args.machine, "modes": args.modes or "default", "cpus": len(os.sched_getaffinity(0)),
                        "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                        "loadavg": os.getloadavg(),
                        "command": "python3 benchmarks/transport_cuda_ipc.py " + " ".join(argv or sys.argv[1:])}
        Path(args.out).write_text(json.dumps(qdoc, indent=1, default=str))
        for k, v in qdoc.items():
            print(f"{k}:", json.dumps({k_: v_ for k_, v_ in v.items() if k_ != "per_round"}, default=str))
        return 0
    if args.peer:
        os.environ["WORKBENCH_CUDA_IPC_PEER"] = args.peer
    if args.pages:
        os.environ["WORKBENCH_CUDA_IPC_PAGES"] = args.pages
    from transport import bench

    cap = args.iters
    base = bench.iterations

    def iterations(nbytes: int, budget: int = 512 * MiB, lo: int = 3, hi: int = 300) -> int:
        return base(nbytes, budget, min(lo, cap), min(hi, cap))

    bench.iterations = iterations  # type: ignore[assignment]
    sizes = tuple(int(s) for s in args.sizes.split(","))
    t0, c0 = time.perf_counter(), time.process_time()
    report = bench.run(args.backend, args.lanes, sizes=sizes, baselines=False, soak_writes=0, device=args.device,
                       machine=args.machine, target_device=args.target_device,
                       gpu_baselines=args.device.startswith("cuda"))
    pw = per_write(args.backend, args.device, args.target_device, min(400, 4 * cap))
    extra: dict[str, Any] = {}
    if args.backend == "cuda_ipc":
        extra["overhead_rounds"] = overhead_rounds(args.device, args.target_device, args.rounds, cap)
        extra["paged_sweep"] = paged_sweep(args.device, args.target_device, cap, modes=sweep_modes)
    meta: dict[str, Any] = {"machine": args.machine, "path": args.path, "peer": args.peer or "default",
                            "sweep_modes": args.sweep_modes or "default",
                            "pages": args.pages or os.environ.get("WORKBENCH_CUDA_IPC_PAGES", "default"),
                            "device": args.device, "target_device": args.target_device, "platform": platform.platform(),
                            "cpus": len(os.sched_getaffinity(0)), "wall_s": round(time.perf_counter() - t0, 1),
                            "cpu_s": round(time.process_time() - c0, 1), "loadavg": os.getloadavg(),
                            "command": "python3 benchmarks/transport_cuda_ipc.py " + " ".join(argv or sys.argv[1:])}
    try:
        import torch

        meta["torch"] = torch.__version__
        if torch.cuda.is_available():
            meta["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
        import cupy

        meta["cupy"] = cupy.__version__
    except Exception as exc:  # noqa: BLE001
        meta["versions_error"] = str(exc)
    doc = {"meta": meta, "rows": report.rows, "ratios": report.ratios(), "per_write": pw, "notes": report.notes,
           **extra}
    if args.probe:
        try:
            doc["probe"] = probe(min(50, cap))
        except Exception as exc:  # noqa: BLE001 - the rows above stand without it
            doc["probe"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("probe:", json.dumps(doc["probe"]))
    if args.index_probe:
        try:
            doc["index_probe"] = index_probe(10)
        except Exception as exc:  # noqa: BLE001 - the rows above stand without it
            doc["index_probe"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("index_probe:", json.dumps(doc["index_probe"]))
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
    print(f"# {args.backend} {args.path} {args.device}->{args.target_device} on {args.machine}")
    print(report.table())
    print("ratios:", json.dumps(report.ratios(), indent=1))
    print("per write:", json.dumps(pw))
    for k, v in extra.items():
        print(f"{k}:", json.dumps({k_: v_ for k_, v_ in v.items() if k_ != "per_round"}))
    print("meta:", json.dumps(meta, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
