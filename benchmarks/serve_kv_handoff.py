"""The KV hand-off of disaggregated serving, request by request: a prefill and a decode worker (one GPU: both on it,
in two processes; two GPUs: cuda:0 and cuda:1) and a transport; one 512-token prompt alone (twice, after a warm-up),
16 at once, then a sustained closed loop (160 requests at concurrency 16, 64 tokens each). Prints one JSON line per
case: the hand-off windows (first layer's write submitted → last layer's write done), the layer writes' submit →
done times, and for the sustained loop its tokens/s. With `--profile DIR` (py-spy on PATH) both workers are sampled
during the sustained loop (all threads, and the thread holding the GIL), raw stacks into DIR.

    python benchmarks/serve_kv_handoff.py --transport tcp
    python benchmarks/serve_kv_handoff.py --transport cuda_ipc --profile /tmp/prof
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", default="tcp", choices=["tcp", "cuda_ipc", "nixl"])
    ap.add_argument("--profile", default="", help="a folder: sample both workers with py-spy in the sustained loop")
    args = ap.parse_args()

    import torch
    from serve_bench import checkpoint, kv_stats

    if not torch.cuda.is_available():
        ap.error("needs a GPU (the prefill worker on cuda:0, decode on cuda:1 or, with one GPU, on cuda:0)")

    from workbench.serve.backend import Backend
    from workbench.serve.sampling import SamplingParams

    model = checkpoint("1b", gpu=True)   # serve_bench's model: its records and these compare
    decode = f"cuda:{min(torch.cuda.device_count(), 2) - 1}"
    spec: dict[str, Any] = dict(kv_bytes=8 << 30, page_size=16, max_batched_tokens=2048, max_seqs=64, dtype="bfloat16")
    with Backend(str(model), "disaggregated", transport=args.transport, prefill={"device": "cuda:0"},
                 decode={"device": decode}, **spec) as b:
        async def one(i: int, out: int) -> None:
            async for _ in b.generate([(7 * i + j) % 250 for j in range(512)],
                                      SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)):
                pass

        async def loop(n: int, conc: int, out: int) -> None:
            sem = asyncio.Semaphore(conc)

            async def guarded(i: int) -> None:
                async with sem:
                    await one(i, out)
            await asyncio.gather(*(guarded(i) for i in range(n)))

        def case(label: str, n: int, conc: int, out: int, profile: bool = False) -> None:
            k0 = len(b.transfers)
            spies = []
            if profile:
                folder = Path(args.profile)
                folder.mkdir(parents=True, exist_ok=True)
                for name, p in b.procs.items():
                    for mode in ("threads", "gil"):
                        spies.append(subprocess.Popen(
                            ["py-spy", "record", "--pid", str(p.proc.pid), "--duration", "6", "--rate", "500",
                             "--format", "raw", "--nonblocking", "-o", str(folder / f"{name}-{mode}.txt"), f"--{mode}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            t = time.perf_counter()
            asyncio.run(loop(n, conc, out))
            wall = time.perf_counter() - t
            for s in spies:
                s.wait(30)
            b.settle(10.0)
            stats = {k: round(v, 3) for k, v in kv_stats(list(b.transfers)[k0:]).items()}
            print(json.dumps({"case": label, "transport": args.transport, "decode_device": decode, **stats,
                              "wall_s": round(wall, 3), "output_tok_s": round(n * out / wall)}), flush=True)

        case("warm-up", 1, 1, 4)
        case("alone", 1, 1, 4)
        case("alone again", 1, 1, 4)
        case("16 at once", 16, 16, 4)
        case("sustained: 160 at concurrency 16", 160, 16, 64, profile=bool(args.profile))


if __name__ == "__main__":
    main()
