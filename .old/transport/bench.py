"""Transport benchmark: single, batched and paged writes and imm round trips against baselines.

The target engine runs in a separate process (spawned), so every byte crosses a real
socket (or CUDA IPC) between processes. Each operation is timed from submission to
completion; the baselines move the same bytes with the same completion rule:

- `raw_socket`: a plain socket pair, `sendall` + `recv_into` + a 1-byte acknowledgement
  (`raw_socket_batch`: k messages sent back to back, then k acknowledgements);
- `gloo`: torch.distributed gloo `isend`/`irecv` + a one-element acknowledgement;
- on GPUs: `device_copy` (`copy_` into a buffer on the target device, then a device sync)
  and `nccl` (NCCL send/recv to a rank on the target GPU + an acknowledgement; only when
  the target is another GPU: NCCL does not run two ranks on one GPU).

Modes of the engine: `single` (one write per call), `batch` (one `write_batch` of `writes`
writes per call), `paged` (one `write_paged` of `writes` pages), `imm` (imm round trip).

`run()` returns a `BenchReport`: rows `{backend, mode, bytes, lanes, GBps, p50_us, writes,
us_per_write}` (bytes per call; GBps = bytes over the median call time, robust to the
stalls of a shared VM; `GBps_mean` is kept too; `us_per_write` = median call time over the
writes in it; `post_us` = median time until the call returned, before completion), the
timed operations as events in the shared Result schema, and the soak result.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import statistics
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

KiB, MiB = 1 << 10, 1 << 20
SIZES = tuple(4 * KiB * 4**i for i in range(9))  # 4 KiB ... 256 MiB
PAGE_SIZES = (1 * KiB, 4 * KiB, 16 * KiB, 32 * KiB, 64 * KiB)
BATCH = ((1 * KiB, 256), (4 * KiB, 16), (4 * KiB, 256), (64 * KiB, 16), (64 * KiB, 256))  # (bytes per write, writes)
LAYER = (256, 32 * KiB)  # a paged layer write: 256 pages of 32 KiB
ROW_KEYS = ("backend", "mode", "bytes", "lanes", "GBps", "p50_us", "writes", "us_per_write")


def iterations(nbytes: int, budget: int = 512 * MiB, lo: int = 3, hi: int = 300) -> int:
    """How many timed repetitions of an operation of `nbytes` (both sides agree on it)."""
    return max(lo, min(hi, budget // max(nbytes, 1)))


@dataclass
class BenchReport:
    rows: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)
    soak: dict[str, Any] = field(default_factory=dict)
    machine: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> Any:
        import pandas as pd

        df = pd.DataFrame(self.rows)
        return df if not df.empty else pd.DataFrame(columns=list(ROW_KEYS))

    def metrics(self) -> dict[str, Any]:
        """Headline ratios and soak counts (the metrics of a measured Result built from `events`)."""
        return {**self.ratios(), **{f"soak_{k}": v for k, v in self.soak.items()}}

    def ratios(self) -> dict[str, float]:
        """Headline ratios: engine vs raw socket (>= 64 KiB, >= 1 MiB), vs device copy and NCCL
        (>= 64 MiB), batches vs back-to-back raw sends (and the per-write overhead over them), lanes vs
        one lane, paged vs single."""
        df = self.frame()
        out: dict[str, float] = {}
        single = df[df["mode"] == "single"]
        if single.empty:
            return out
        raw = df[df["mode"] == "raw_socket"].set_index("bytes")["GBps"]
        gloo = df[df["mode"] == "gloo"].set_index("bytes")["GBps"]
        best = single.groupby("bytes")["GBps"].max()
        for lo, name in ((64 * KiB, "64KiB"), (MiB, "1MiB")):
            big = [b for b in best.index if b >= lo and b in raw.index]
            if big:
                out[f"min_ratio_vs_raw_socket_ge_{name}"] = float(min(best[b] / raw[b] for b in big))
                out[f"mean_ratio_vs_raw_socket_ge_{name}"] = float(statistics.mean(best[b] / raw[b] for b in big))
        for mode in ("device_copy", "nccl"):
            base = df[df["mode"] == mode].set_index("bytes")["GBps"]
            big = [b for b in best.index if b >= 64 * MiB and b in base.index]
            if big:
                out[f"min_ratio_vs_{mode}_ge_64MiB"] = float(min(best[b] / base[b] for b in big))
        batch = df[df["mode"] == "batch"]
        if not batch.empty:
            out["batch_min_us_per_write"] = float(batch["us_per_write"].min())
            out["batch_max_writes_per_s"] = float((1e6 / batch["us_per_write"]).max())
            rb = df[df["mode"] == "raw_socket_batch"]
            pairs = [(float(r.GBps), float(rb[(rb["bytes"] == r.bytes) & (rb["writes"] == r.writes)]["GBps"].iloc[0]))
                     for r in batch.itertuples() if ((rb["bytes"] == r.bytes) & (rb["writes"] == r.writes)).any()]
            if pairs:
                out["batch_min_ratio_vs_raw_socket_batch"] = min(a / b for a, b in pairs)
            # the engine's own cost per write: its time per write less the raw socket's for the same batch
            over = [float(r.us_per_write) - float(rb[(rb["bytes"] == r.bytes) & (rb["writes"] == r.writes)]
                                                  ["us_per_write"].iloc[0])
                    for r in batch.itertuples() if ((rb["bytes"] == r.bytes) & (rb["writes"] == r.writes)).any()]
            if over:
                out["batch_max_overhead_us_per_write"] = max(over)
        bigg = [b for b in best.index if b >= MiB and b in gloo.index]
        if bigg:
            out["mean_ratio_vs_gloo_ge_1MiB"] = float(statistics.mean(best[b] / gloo[b] for b in bigg))
        lanes = sorted(single["lanes"].unique())
        if len(lanes) > 1:
            one = single[single["lanes"] == lanes[0]].set_index("bytes")["GBps"]
            worst = min(float(single[single["lanes"] == n].set_index("bytes")["GBps"].loc[b] / one.loc[b])
                        for n in lanes[1:] for b in one.index if b >= MiB)
            out["min_ratio_more_lanes_vs_one_ge_1MiB"] = worst
        paged = df[(df["mode"] == "paged") & (df["lanes"] == single["lanes"].max())]
        ref = self.notes.get("single_reference_for_paged")
        if not paged.empty and ref and "page_bytes" in paged:
            for page in (16 * KiB, 32 * KiB, 64 * KiB):
                p = paged[(paged["page_bytes"] == page) & (paged["bytes"] == ref["bytes"])]
                if not p.empty:
                    out[f"paged_{page // KiB}KiB_vs_single"] = float(p["GBps"].iloc[0] / ref["GBps"])
            layer = paged[(paged["writes"] == LAYER[0]) & (paged["page_bytes"] == LAYER[1])]
            if not layer.empty and "post_us" in layer:
                out["paged_layer_256x32KiB_post_us"] = float(layer["post_us"].iloc[0])
        return out

    def table(self) -> str:
        """A markdown table: single-write GB/s per lane count next to both baselines, with ratios."""
        df = self.frame()
        lines = []
        single = df[df["mode"] == "single"]
        lanes = sorted(single["lanes"].unique())
        raw = df[df["mode"] == "raw_socket"].set_index("bytes")["GBps"]
        gloo = df[df["mode"] == "gloo"].set_index("bytes")["GBps"]
        head = ["bytes"] + [f"{single['backend'].iloc[0] if len(single) else ''} {n} lane(s) GB/s" for n in lanes]
        head += ["raw socket GB/s", "gloo GB/s", "best/raw", "best/gloo", "p50 µs (1 lane)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for b in sorted(single["bytes"].unique()):
            vals = [single[(single["bytes"] == b) & (single["lanes"] == n)]["GBps"] for n in lanes]
            g = [float(v.iloc[0]) if len(v) else float("nan") for v in vals]
            best = max(g)
            p50 = single[(single["bytes"] == b) & (single["lanes"] == lanes[0])]["p50_us"]
            r, gl = raw.get(b, float("nan")), gloo.get(b, float("nan"))
            lines.append("| " + " | ".join([_fmt_bytes(int(b))] + [f"{x:.2f}" for x in g] + [  # noqa: B023
                f"{r:.2f}", f"{gl:.2f}", f"{best / r:.2f}", f"{best / gl:.2f}", f"{float(p50.iloc[0]):.0f}"]) + " |")
        paged = df[df["mode"] == "paged"]
        if not paged.empty:
            lines += ["", "| paged write | page | pages | lanes | GB/s | p50 µs | post µs | µs per page |",
                      "|---|---|---|---|---|---|---|---|"]
            for r_ in paged.itertuples(index=False):
                lines.append(f"| {_fmt_bytes(int(r_.bytes))} total | {_fmt_bytes(int(getattr(r_, 'page_bytes', 0)))} "
                             f"| {int(getattr(r_, 'writes', 0) or 0)} | {r_.lanes} | {r_.GBps:.2f} | {r_.p50_us:.0f} | "
                             f"{getattr(r_, 'post_us', float('nan')):.0f} | "
                             f"{getattr(r_, 'us_per_write', float('nan')):.2f} |")
        batch = df[df["mode"].isin(["batch", "raw_socket_batch"])]
        if not batch.empty:
            lines += ["", "| batched writes | bytes per write | writes per call | lanes | GB/s | p50 µs per call | "
                      "post µs | µs per write | writes/s |", "|---|---|---|---|---|---|---|---|---|"]
            for r_ in batch.itertuples(index=False):
                post = getattr(r_, "post_us", float("nan"))
                lines.append(f"| {r_.mode} | {_fmt_bytes(int(r_.write_bytes))} | {int(r_.writes)} | {r_.lanes} | "
                             f"{r_.GBps:.2f} | {r_.p50_us:.0f} | {post:.0f} | {r_.us_per_write:.1f} | "
                             f"{1e6 / r_.us_per_write:,.0f} |")
        gpu = df[df["mode"].isin(["device_copy", "nccl"])]
        if not gpu.empty:
            lines += ["", "| bytes | " + " | ".join(f"{m} GB/s" for m in sorted(gpu["mode"].unique())) + " |",
                      "|---|" + "---|" * gpu["mode"].nunique()]
            for b in sorted(gpu["bytes"].unique()):
                vals = [gpu[(gpu["bytes"] == b) & (gpu["mode"] == m)]["GBps"] for m in sorted(gpu["mode"].unique())]
                lines.append(f"| {_fmt_bytes(int(b))} | " + " | ".join(f"{float(v.iloc[0]):.2f}" if len(v) else "—"
                                                                  for v in vals) + " |")
        imm = df[df["mode"] == "imm"]
        if not imm.empty:
            lines += ["", f"imm round trip p50: {float(imm['p50_us'].iloc[0]):.0f} µs"]
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit, s in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= s and n % s == 0:
            return f"{n // s} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------- target processes
def _serve_engine(conn: Any, backend: str, nbytes: int, device: str, shm_name: str | None, secret: str) -> None:
    os.environ["WORKBENCH_TRANSPORT_SECRET"] = secret
    from transport.engine import Engine

    shm = None
    if device.startswith("cuda"):
        import torch

        buf: Any = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    else:
        from multiprocessing import shared_memory

        import numpy as np

        shm = shared_memory.SharedMemory(name=shm_name) if shm_name else None
        buf = np.ndarray((nbytes,), np.uint8, buffer=shm.buf) if shm else np.zeros(nbytes, np.uint8)
    with Engine(backend, lanes=1) as eng:
        region = eng.register(buf)
        eng.on_imm(lambda imm, peer: eng.write_imm(peer, imm))  # echo for round-trip latency
        conn.send(region.descriptor.to_bytes())
        conn.recv()  # stop
        eng.deregister(region)
    del buf


def _serve_socket(conn: Any, nbytes: int) -> None:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    conn.send(ls.getsockname()[1])
    s, _ = ls.accept()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(nbytes))
    hdr = bytearray(8)
    while True:
        if s.recv_into(hdr, 8, socket.MSG_WAITALL) < 8:
            return
        n = struct.unpack("<Q", hdr)[0]
        got = 0
        while got < n:
            k = s.recv_into(buf[got:n], n - got)
            if k == 0:
                return
            got += k
        s.sendall(b"k")


# ---------------------------------------------------------------------- measurements
ROUNDS = 5  # each mode is measured in ROUNDS slices, interleaved with the others (fair under drift)


def _row(backend: str, mode: str, nbytes: int, lanes: int, lat: list[float], writes: int = 1,
         post: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    p50 = statistics.median(lat)
    total = sum(lat)
    row = {"backend": backend, "mode": mode, "bytes": nbytes, "lanes": lanes,
           "GBps": nbytes / p50 / 1e9 if p50 > 0 and nbytes else 0.0,
           "p50_us": p50 * 1e6, "writes": writes, "us_per_write": p50 * 1e6 / writes,
           "GBps_mean": nbytes * len(lat) / total / 1e9 if total > 0 else 0.0, "iters": len(lat), **extra}
    if post:
        row["post_us"] = statistics.median(post) * 1e6
    return row


def _interleaved(ops: dict[Any, Any], size: int, iters: int, rounds: int = ROUNDS) -> dict[Any, list[float]]:
    """Per-op latencies of each op in `ops` (`fn(size)`), one warm-up each, then `rounds` interleaved slices."""
    lat: dict[Any, list[float]] = {k: [] for k in ops}
    for fn in ops.values():
        fn(size)
    per = max(1, iters // rounds)
    for _ in range(rounds):
        for k, fn in ops.items():
            for _ in range(per):
                a = time.perf_counter()
                fn(size)
                lat[k].append(time.perf_counter() - a)
    return lat


def _plan(sizes: Sequence[int], rounds: int = ROUNDS) -> list[tuple[int, int]]:
    """(size, operations) as the gloo peer will see them: one warm-up plus the interleaved slices."""
    return [(s, 1 + rounds * max(1, iterations(s) // rounds)) for s in sizes]


class _RawSocket:
    """The plain socket-pair baseline: a spawned receiver doing `recv_into` and a 1-byte ack."""

    def __init__(self, nbytes: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_socket, args=(child, nbytes), daemon=True)
        self.proc.start()
        port = self.conn.recv()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.src = memoryview(os.urandom(nbytes))
        self.ack = bytearray(1)

    def op(self, size: int) -> None:
        self.sock.sendall(struct.pack("<Q", size))
        self.sock.sendall(self.src[:size])
        self.sock.recv_into(self.ack, 1, socket.MSG_WAITALL)

    def batch(self, size: int, k: int) -> None:
        """k messages of `size` bytes sent back to back (one gathered sendmsg per 512 buffers), then k acks."""
        from transport.backends.tcp import send_gather

        hdr = struct.pack("<Q", size)
        bufs: list[Any] = []
        for i in range(k):
            bufs += [hdr, self.src[i * size:(i + 1) * size]]
        send_gather(self.sock, bufs)
        acks = bytearray(k)
        self.sock.recv_into(acks, k, socket.MSG_WAITALL)

    def close(self) -> None:
        self.sock.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


class _Gloo:
    """The torch.distributed gloo baseline: `isend` to a spawned rank doing `irecv`, then an ack."""

    def __init__(self, nbytes: int, plan: list[tuple[int, int]]) -> None:
        import torch
        import torch.distributed as dist

        with socket.socket() as tmp:
            tmp.bind(("127.0.0.1", 0))
            port = tmp.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.proc = ctx.Process(target=_serve_gloo, args=(port, plan, nbytes), daemon=True)
        self.proc.start()
        self.dist = dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
        self.src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        self.ack = torch.empty(1, dtype=torch.uint8)

    def op(self, size: int) -> None:
        work = self.dist.isend(self.src[:size], dst=1)
        assert work is not None
        work.wait()
        self.dist.recv(self.ack, src=1)

    def close(self) -> None:
        self.dist.destroy_process_group()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def _serve_gloo(port: int, plan: list[tuple[int, int]], nbytes: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    ack = torch.ones(1, dtype=torch.uint8)
    for size, ops in plan:
        for _ in range(ops):
            work = dist.irecv(buf[:size], src=0)
            assert work is not None
            work.wait()
            dist.send(ack, dst=0)
    dist.destroy_process_group()


class _Target:
    """A spawned process holding an engine with one registered buffer (shared memory on CPU)."""

    def __init__(self, backend: str, nbytes: int, device: str = "cpu") -> None:
        from transport.descriptors import MemoryDescriptor
        from transport.engine import SECRET_ENV

        self.shm = None
        if not device.startswith("cuda"):
            from multiprocessing import shared_memory

            self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        secret = os.environ.setdefault(SECRET_ENV, os.urandom(16).hex())
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_engine,  # not a daemon: a NIXL engine starts its worker
                                args=(child, backend, nbytes, device, self.shm.name if self.shm else None, secret))
        self.proc.start()
        deadline = time.monotonic() + 120
        while not self.conn.poll(0.2):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"benchmark target engine did not start (exit code {self.proc.exitcode})")
        self.desc = MemoryDescriptor.from_bytes(self.conn.recv())

    @property
    def view(self) -> Any:
        import numpy as np

        assert self.shm is not None
        return np.ndarray((self.desc.nbytes,), np.uint8, buffer=self.shm.buf)

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()


def _source(eng: Any, nbytes: int, device: str) -> Any:
    if device.startswith("cuda"):
        import torch

        return torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    import numpy as np

    buf = eng.alloc(nbytes)
    buf[:] = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    return buf


class _DeviceCopy:
    """The device-copy baseline: `copy_` into a buffer on the target device, then a device sync."""

    def __init__(self, nbytes: int, device: str, target_device: str) -> None:
        import torch

        self.torch = torch
        self.src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=target_device)

    def op(self, size: int) -> None:
        self.dst[:size].copy_(self.src[:size], non_blocking=True)
        self.torch.cuda.synchronize(self.dst.device)
        self.torch.cuda.synchronize(self.src.device)

    def close(self) -> None:
        return None


class _Nccl:
    """The NCCL baseline: send to a spawned rank on the target GPU, which receives and acknowledges."""

    def __init__(self, nbytes: int, plan: list[tuple[int, int]], device: str, target_device: str) -> None:
        import torch
        import torch.distributed as dist

        with socket.socket() as tmp:
            tmp.bind(("127.0.0.1", 0))
            port = tmp.getsockname()[1]
        ctx = mp.get_context("spawn")
        self.proc = ctx.Process(target=_serve_nccl, args=(port, plan, nbytes, target_device), daemon=True)
        self.proc.start()
        self.torch, self.dist = torch, dist
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                                device_id=torch.device(device))
        self.src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        self.ack = torch.empty(1, dtype=torch.uint8, device=device)

    def op(self, size: int) -> None:
        self.dist.send(self.src[:size], dst=1)
        self.dist.recv(self.ack, src=1)
        self.torch.cuda.synchronize(self.src.device)

    def close(self) -> None:
        self.dist.destroy_process_group()
        self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()


def _serve_nccl(port: int, plan: list[tuple[int, int]], nbytes: int, device: str) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2,
                            device_id=torch.device(device))
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ack = torch.ones(1, dtype=torch.uint8, device=device)
    for size, ops in plan:
        for _ in range(ops):
            dist.recv(buf[:size], src=0)
            dist.send(ack, dst=0)
            torch.cuda.synchronize(device)
    dist.destroy_process_group()


def bench_engine(backend: str, lanes: Sequence[int], sizes: Sequence[int], page_sizes: Sequence[int],
                 paged_total: int, device: str = "cpu", imm_iters: int = 300, baselines: bool = True,
                 events: list[dict[str, Any]] | None = None, notes: dict[str, Any] | None = None,
                 target_device: str | None = None, batches: Sequence[tuple[int, int]] = BATCH,
                 layer: tuple[int, int] | None = LAYER, gpu_baselines: bool = True) -> list[dict[str, Any]]:
    """Single writes for every lane count and the baselines, interleaved per size; batched writes
    (interleaved with back-to-back raw socket sends); paged writes (interleaved with single writes
    of the same total) and a paged layer write; the imm round trip at the most lanes.
    The target's buffer lives on `target_device` (default: `device`, e.g. cuda:0 -> cuda:1 across GPUs)."""
    import numpy as np

    from transport.engine import Engine, Target

    target_device = target_device or device
    batch_bytes = max((b * k for b, k in batches), default=0)
    layer_bytes = layer[0] * layer[1] if layer else 0
    nbytes = max(max(sizes), paged_total, batch_bytes, layer_bytes)
    target = _Target(backend, nbytes, target_device)
    engines = {n: Engine(backend, lanes=n) for n in lanes}
    raw = _RawSocket(max(max(sizes), batch_bytes)) if baselines else None
    gloo = _Gloo(max(sizes), _plan(sizes)) if baselines else None
    on_gpu = device.startswith("cuda") and gpu_baselines
    dcopy = _DeviceCopy(max(sizes), device, target_device) if on_gpu else None
    nccl: _Nccl | None = None
    rows: list[dict[str, Any]] = []
    clock0 = time.perf_counter()
    done: dict[Any, list[Any]] = {n: [] for n in lanes}
    try:
        srcs = {}
        for n, eng in engines.items():
            srcs[n] = eng.register(_source(eng, nbytes, device))
            eng.connect(target.desc)

        def writer(n: int) -> Any:
            eng, src, log = engines[n], srcs[n], done[n]

            def op(size: int) -> None:
                t = eng.write(src, target.desc, size)
                t.result(120)
                if len(log) < 20000:
                    log.append(t)
            return op

        ops: dict[Any, Any] = {("single", n): writer(n) for n in lanes}
        if raw is not None and gloo is not None:
            ops["raw_socket"], ops["gloo"] = raw.op, gloo.op
        if dcopy is not None:
            ops["device_copy"] = dcopy.op
        for size in sizes:
            lat = _interleaved(ops, size, iterations(size))
            for key, ls in lat.items():
                if isinstance(key, tuple):
                    rows.append(_row(backend, "single", size, key[1], ls, device=device))
                elif key in ("device_copy", "nccl"):
                    rows.append(_row("baseline", key, size, 1, ls, device=f"{device}->{target_device}"))
                else:
                    rows.append(_row("baseline", key, size, 1, ls, device="cpu"))
        if on_gpu and target_device != device:
            # on its own, after the others: a live NCCL communicator slowed the peer copies of the
            # other modes ~20x when interleaved (two H200s)
            nccl = _Nccl(max(sizes), _plan(sizes), device, target_device)
            for size in sizes:
                lat = _interleaved({"nccl": nccl.op}, size, iterations(size))
                rows.append(_row("baseline", "nccl", size, 1, lat["nccl"], device=f"{device}->{target_device}"))
            nccl.close()
            nccl = None
        if events is not None:
            for n in lanes:
                events.extend(_events(done[n], "write", n, clock0, device))
        nl = max(lanes)
        eng, src = engines[nl], srcs[nl]
        for wbytes, k in batches:
            targets = [Target(target.desc, wbytes, i * wbytes, i * wbytes) for i in range(k)]
            post: list[float] = []

            def bop(size: int, targets: list[Any] = targets, post: list[float] = post) -> None:
                a = time.perf_counter()
                t = eng.write_batch(src, targets)
                post.append(time.perf_counter() - a)
                t.result(120)

            bops: dict[Any, Any] = {"batch": bop}
            if raw is not None:
                bops["raw_socket_batch"] = lambda size, wbytes=wbytes, k=k: raw.batch(wbytes, k)
            lat = _interleaved(bops, wbytes * k, iterations(wbytes * k, budget=128 * MiB, lo=20, hi=200))
            rows.append(_row(backend, "batch", wbytes * k, nl, lat["batch"], writes=k, post=post[1:],
                             write_bytes=wbytes, device=device))
            if "raw_socket_batch" in lat:
                rows.append(_row("baseline", "raw_socket_batch", wbytes * k, 1, lat["raw_socket_batch"], writes=k,
                                 write_bytes=wbytes, device="cpu"))
        pops: dict[Any, Any] = {"single": writer(nl)}
        posts: dict[Any, list[float]] = {}
        shapes = [(page, paged_total // page) for page in page_sizes]
        if layer:
            shapes.append((layer[1], layer[0]))
        for page, npages in shapes:
            rng = np.random.default_rng(page + npages)
            sp, dp = rng.permutation(npages), rng.permutation(npages)
            posts[(page, npages)] = []

            def pop(size: int, page: int = page, sp: Any = sp, dp: Any = dp, post: list[float] = posts[(page, npages)]
                    ) -> None:
                a = time.perf_counter()
                t = eng.write_paged(src, target.desc, page_bytes=page, src_pages=sp, dst_pages=dp)
                post.append(time.perf_counter() - a)
                t.result(120)
            pops[(page, npages)] = pop
        lat = _interleaved(pops, paged_total, iterations(paged_total, hi=50, lo=10))
        for page, npages in shapes:
            rows.append(_row(backend, "paged", npages * page, nl, lat[(page, npages)], writes=npages,
                             post=posts[(page, npages)][1:], page_bytes=page, device=device))
        if notes is not None:
            notes["single_reference_for_paged"] = _row(backend, "single", paged_total, nl, lat["single"])
        peer = target.desc.address
        k_ = [0]

        def rt(size: int) -> None:
            k_[0] += 1
            eng.write_imm(peer, 1)
            eng.counter.wait(1, k_[0], timeout=10)

        rows.append(_row(backend, "imm", 0, nl, _interleaved({"imm": rt}, 0, imm_iters)["imm"], device=device))
        path = getattr(eng, "_path", None)
        if notes is not None and path is not None and hasattr(path, "used"):
            notes["copies"] = dict(path.used)
    finally:
        for eng in engines.values():
            eng.close()
        for b in (raw, gloo, dcopy, nccl):
            if b is not None:
                b.close()
        target.close()
    return rows


def cost_curve(backend: str = "tcp", lanes: int = 2, write_bytes: int = 4 * KiB,
               writes: Sequence[int] = (1, 4, 16, 64, 256), iters: int = 30, device: str = "cpu",
               target_device: str | None = None) -> list[dict[str, Any]]:
    """The per-operation cost curve: for each batch size k, the median time of one `write_batch` of k
    writes of `write_bytes` to a target process (until done) and until the call returned (posting),
    as rows {mode: batch, writes, us_per_write, post_us, ...}. k = 1 is a single write's cost."""
    from transport.engine import Engine, Target

    k_max = max(writes)
    target = _Target(backend, k_max * write_bytes, target_device or device)
    try:
        with Engine(backend, lanes=lanes) as eng:
            src = eng.register(_source(eng, k_max * write_bytes, device))
            eng.connect(target.desc)
            rows = []
            for k in writes:
                targets = [Target(target.desc, write_bytes, i * write_bytes, i * write_bytes) for i in range(k)]
                post: list[float] = []

                def op(size: int, targets: list[Any] = targets, post: list[float] = post) -> None:
                    a = time.perf_counter()
                    t = eng.write_batch(src, targets)
                    post.append(time.perf_counter() - a)
                    t.result(60)

                lat = _interleaved({"batch": op}, 0, iters)["batch"]
                rows.append(_row(backend, "batch", k * write_bytes, lanes, lat, writes=k, post=post[1:],
                                 write_bytes=write_bytes, device=device))
            return rows
    finally:
        target.close()


def _events(ts: list[Any], op: str, lanes: int, clock0: float, device: str) -> list[dict[str, Any]]:
    return [{"rank": 0, "device": device, "kind": "transfer", "op": op, "bytes": t.nbytes,
             "links": tuple(f"lane{i}" for i in sorted(set(t.lanes))), "start": t.submitted - clock0,
             "end": (t.completed or t.submitted) - clock0, "lanes": lanes} for t in ts]


def soak(n_writes: int = 100_000, backend: str = "tcp", lanes: int = 4, batch: int = 1000,
         max_len: int = 64 * KiB, seed: int = 0, chaos: dict[str, Any] | None = None) -> dict[str, Any]:
    """`n_writes` random writes (1 B .. max_len, random source offsets) into disjoint slots of a
    target process's shared-memory buffer, `batch` in flight at a time over `lanes` lanes; every
    slot is checked against the source by CRC32. Returns counts of lost and corrupted writes."""
    import numpy as np

    from transport.engine import Engine

    slot = max_len
    nbytes = batch * slot
    target = _Target(backend, nbytes)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, 4 * nbytes, dtype=np.uint8)
    lost = corrupted = done = 0
    dst = target.view
    t0 = time.perf_counter()
    moved = 0
    try:
        with Engine(backend, lanes=lanes, chaos=chaos) as eng:
            src_buf = eng.alloc(data.size)
            src_buf[:] = data
            src = eng.register(src_buf)
            left = n_writes
            while left > 0:
                k = min(batch, left)
                lens = rng.integers(1, max_len + 1, k)
                offs = rng.integers(0, src_buf.size - max_len, k)
                dst[: k * slot] = 0
                ts = [eng.write(src, target.desc, int(lens[i]), src_offset=int(offs[i]), dst_offset=i * slot,
                                imm=7) for i in range(k)]
                for i, t in enumerate(ts):
                    try:
                        t.result(60)
                    except Exception:  # noqa: BLE001 - counted as lost
                        lost += 1
                        continue
                    a, n = int(offs[i]), int(lens[i])
                    if zlib.crc32(dst[i * slot:i * slot + n]) != zlib.crc32(src_buf[a:a + n]):
                        corrupted += 1
                    moved += n
                done += k
                left -= k
    finally:
        target.close()
    dt = time.perf_counter() - t0
    return {"writes": done, "lost": lost, "corrupted": corrupted, "bytes": moved, "seconds": round(dt, 2),
            "lanes": lanes, "writes_per_s": round(done / dt, 1)}


def run(backend: str = "tcp", lanes: int = 4, *, sizes: Sequence[int] = SIZES, page_sizes: Sequence[int] = PAGE_SIZES,
        paged_total: int = 16 * MiB, baselines: bool = True, soak_writes: int = 100_000,
        device: str = "cpu", machine: str = "", target_device: str | None = None,
        batches: Sequence[tuple[int, int]] = BATCH, gpu_baselines: bool = True) -> BenchReport:
    """The whole benchmark: engine sweep over lane counts 1, 2, 4, … up to `lanes`, paged writes
    and imm latency at `lanes`, both baselines over the same sizes, then the soak."""
    lane_set = sorted({1, lanes} | {2**i for i in range(8) if 2**i <= lanes})
    events: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    rows = bench_engine(backend, lane_set, sizes, page_sizes, paged_total, device, baselines=baselines,
                        events=events, notes=notes, target_device=target_device, batches=batches,
                        gpu_baselines=gpu_baselines)
    report = BenchReport(rows, events, machine=machine, notes=notes)
    if soak_writes:
        report.soak = soak(soak_writes, backend if not device.startswith("cuda") else "tcp", lanes=lanes)
    return report
