"""nccl-tests-style collective sweeps through torch.distributed, printed in nccl-tests' own text format.

Run one process per GPU with torchrun (NCCL), or CPU ranks with gloo:

    torchrun --nproc-per-node 8 benchmarks/nccl_sweep.py --op all_reduce -b 8 -e 4G -f 2
    torchrun --nproc-per-node 2 benchmarks/nccl_sweep.py --backend gloo --op all_gather -e 16M

Rank 0 prints exactly the table layout of nccl-tests' `*_perf` binaries (size, count, type,
redop, root, time, algbw, busbw, #wrong for out-of-place and in-place), so the output feeds
`workbench.calibration` like real nccl-tests output. busbw follows nccl-tests' conventions:
all_reduce 2(n-1)/n, all_gather / reduce_scatter / alltoall (n-1)/n. Each size is validated
(#wrong counts mismatching elements) against the mathematically expected result.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

# torch >= 2.12 renamed the tensor collectives; older images (the device's 2.11) have the old names
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
DTYPES = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


def parse_bytes(text: str) -> int:
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B")
    suffix = text[-1] if text and text[-1] in "KMG" else ""
    return int(float(text[: len(text) - len(suffix)]) * units[suffix])


def bus_factor(op: str, n: int) -> float:
    if op == "all_reduce":
        return 2 * (n - 1) / n
    return (n - 1) / n


def sizes(lo: int, hi: int, factor: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def run_op(op: str, nbytes: int, dtype: torch.dtype, device: torch.device, world: int, rank: int,
           in_place: bool, warmup: int, iters: int) -> tuple[float, int]:
    """Mean seconds per call and #wrong elements for one size (nbytes = nccl-tests 'size').

    One call on fresh data is validated against the exact expected result; the timed calls follow.
    """
    esize = torch.tensor([], dtype=dtype).element_size()
    count = nbytes // esize
    if op != "all_reduce":
        count -= count % world
    per = count // world
    fill = float(rank + 1)
    ranks = torch.arange(1, world + 1, dtype=dtype, device=device)
    send = torch.empty((per if op == "all_gather" else count,), dtype=dtype, device=device)
    if op == "all_reduce":
        recv = send if in_place else torch.empty_like(send)
    elif op == "all_gather":
        recv = torch.empty((count,), dtype=dtype, device=device)
        if in_place:
            send = recv[rank * per:(rank + 1) * per]
    elif op == "reduce_scatter":
        recv = send[rank * per:(rank + 1) * per] if in_place else torch.empty((per,), dtype=dtype, device=device)
    else:
        recv = torch.empty_like(send)
    scratch = torch.empty_like(recv)

    def call() -> None:
        if op == "all_reduce":
            dist.all_reduce(recv) if in_place else (recv.copy_(send), dist.all_reduce(recv))
        elif op == "all_gather":
            ALL_GATHER(recv, send)
        elif op == "reduce_scatter":
            out = scratch if in_place else recv  # an output may not alias the input
            REDUCE_SCATTER(out, send)
            if in_place:
                recv.copy_(out)
        else:
            dist.all_to_all_single(recv, send)

    def expected() -> torch.Tensor:
        total = float(world * (world + 1) / 2)
        if op in ("all_reduce", "reduce_scatter"):
            return torch.full_like(recv, total)
        return ranks.repeat_interleave(per)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        send.fill_(fill)
        call()
    send.fill_(fill)
    call()
    sync()
    wrong = int((recv != expected()).sum().item())
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    sync()
    return (time.perf_counter() - t0) / max(iters, 1), wrong


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=OPS, default="all_reduce")
    ap.add_argument("-b", "--minbytes", default="8")
    ap.add_argument("-e", "--maxbytes", default="128M")
    ap.add_argument("-f", "--stepfactor", type=int, default=2)
    ap.add_argument("-w", "--warmup_iters", type=int, default=5)
    ap.add_argument("-n", "--iters", type=int, default=20)
    ap.add_argument("-d", "--datatype", choices=sorted(DTYPES), default="float")
    ap.add_argument("--backend", choices=("nccl", "gloo"), default=None)
    args = ap.parse_args(argv)

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group(backend, rank=rank, world_size=world)
    dtype = DTYPES[args.datatype]
    redop = "sum" if args.op in ("all_reduce", "reduce_scatter") else "none"
    lo, hi = parse_bytes(args.minbytes), parse_bytes(args.maxbytes)
    esize = torch.tensor([], dtype=dtype).element_size()
    lines: list[str] = []
    if rank == 0:
        lines.append(f"# nThread 1 nGpus 1 minBytes {lo} maxBytes {hi} step: {args.stepfactor}(factor) "
                     f"warmup iters: {args.warmup_iters} iters: {args.iters} agg iters: 1 validation: 1 graph: 0")
        lines.append("#")
        lines.append("# Using devices")
    names = [None] * world
    dev_name = torch.cuda.get_device_name(local) if device.type == "cuda" else "CPU (gloo)"
    dist.all_gather_object(names, (rank, socket.gethostname(), os.getpid(), local, dev_name))
    if rank == 0:
        for r, host, pid, dev, name in names:  # type: ignore[misc]
            lines.append(f"#  Rank {r:2d} Group  0 Pid {pid:6d} on {host:>10s} device {dev:2d} [0x00] {name}")
        lines += [
            "#",
            "#                                                              out-of-place                       in-place          ",
            "#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong",
            "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)       ",
        ]
        print("\n".join(lines), flush=True)
    total_busbw, n_sizes, total_wrong = 0.0, 0, 0
    for size in sizes(lo, hi, args.stepfactor):
        cells = []
        for in_place in (False, True):
            seconds, wrong = run_op(args.op, size, dtype, device, world, rank, in_place, args.warmup_iters, args.iters)
            t = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # nccl-tests reports the slowest rank
            seconds = float(t.item())
            algbw = size / seconds / 1e9 if seconds > 0 else 0.0
            busbw = algbw * bus_factor(args.op, world)
            cells.append(f"{seconds * 1e6:8.2f} {algbw:7.2f} {busbw:7.2f} {wrong:6d}")
            total_wrong += wrong
            if in_place:
                total_busbw += busbw
                n_sizes += 1
        if rank == 0:
            count = size // esize
            print(f"{size:12d} {count:13d} {args.datatype:>9s} {redop:>7s} {-1:7d} " + "  ".join(cells), flush=True)
    if rank == 0:
        print(f"# Out of bounds values : {total_wrong} {'OK' if total_wrong == 0 else 'FAILED'}")
        print(f"# Avg bus bandwidth    : {total_busbw / max(n_sizes, 1):.4f} ")
        print("#")
    dist.destroy_process_group()
    return 0 if total_wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
