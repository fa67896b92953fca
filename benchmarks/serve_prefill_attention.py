"""The engine's prefill attention, batched (one call per layer for all prefill chunks) against per chunk, in one process.

    python benchmarks/serve_prefill_attention.py --machine cpu2-vm
    python benchmarks/serve_prefill_attention.py --machine h200 --device cuda:0 --model-shape 1b

The calibration's random Llama (`serve_calibrate.server_setup`) is loaded once (`Model.load`, bf16 on a GPU) with a
paged KV cache; each composition — d decodes at a context of `--context` tokens plus k prefill chunks of p tokens from
position 0 — is built as the engine builds a step (`Batch.build`) and run through the model's forward, with
`Model.batched_prefill` True (after) and False (before: the per-chunk path, kept behind the flag) in alternation:
`--rounds` rounds, each running `--steps` synchronised steps of one path then of the other (the order flips every
round), so that a noisy machine slows both alike. Per composition: the median step of each path over all rounds,
their ratio, the range of the per-round ratios, and the largest difference of their logits (the same step both ways).
Writes benchmarks/results/serve-prefill-attention-MACHINE.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
COMPOSITIONS = "0:1:32,0:1:128,0:2:64,0:4:32,8:1:64,8:4:32,8:8:16"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from serve_step_profile import Item, Steps

    st = Steps(args.device, args.model_shape, args.comps, args.context)
    model, gpu = st.model, st.gpu

    def step(it: list[Item]) -> torch.Tensor:
        return st.step(it)[0]

    rows = []
    for d, k, p in args.comps:
        it = st.items(d, k, p)
        got = {}
        for flag in (False, True):
            model.batched_prefill = flag
            for _ in range(args.warmup):
                step(it)
            got[flag] = step(it).float()
        diff = float((got[True] - got[False]).abs().max())
        times: dict[bool, list[float]] = {False: [], True: []}
        ratios = []
        for r in range(args.rounds):
            med = {}
            for flag in ((False, True) if r % 2 == 0 else (True, False)):
                model.batched_prefill = flag
                ts = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step(it)
                    if gpu:
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                times[flag] += ts
                med[flag] = statistics.median(ts)
            ratios.append(med[True] / med[False])
        before, after = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        rows.append({"decodes": d, "chunks": k, "prompt": p, "context": args.context, "per_chunk_ms": before,
                     "batched_ms": after, "ratio": after / before, "round_ratios": ratios, "max_logit_diff": diff})
        print(f"{d} decodes + {k} x {p}: per chunk {before:.2f} ms, batched {after:.2f} ms, ratio {after / before:.2f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f}), max |logit diff| {diff:.2e}", flush=True)
    model.batched_prefill = True
    return st.record(rows)


def write(args: argparse.Namespace, command: str, rec: dict[str, Any]) -> None:
    from serve_step_profile import save

    lines = [f"# Serving engine prefill attention, batched vs per chunk ({args.machine})", "", f"`{command}`", "",
             f"Machine: {rec['machine']}; torch {rec['torch']} ({rec['threads']} threads); model `{args.model_shape}` "
             f"({rec['dtype']}) on `{args.device}`{' (' + rec['gpu'] + ')' if rec['gpu'] else ''}, page size "
             f"{rec['page_size']}. Decodes at a context of {args.context} tokens, prefill chunks from position 0. "
             f"{args.rounds} rounds of {args.steps} synchronised steps per path in alternation; median step over all "
             f"rounds.", "",
             "| decodes | prefill chunks × tokens | per chunk ms | batched ms | batched / per chunk | rounds' ratios "
             "| max \\|logit diff\\| |", "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['decodes']} | {r['chunks']} × {r['prompt']} | {r['per_chunk_ms']:.2f} | "
                     f"{r['batched_ms']:.2f} | {r['ratio']:.2f} | {min(r['round_ratios']):.2f}–"
                     f"{max(r['round_ratios']):.2f} | {r['max_logit_diff']:.1e} |")
    save(args.out, f"serve-prefill-attention-{args.machine}", rec, lines)


def main() -> None:
    from serve_step_profile import bad, parse_compositions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--machine", required=True, help="a name for the machine: the results file's suffix")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ap.add_argument("--model-shape", default="tiny", choices=("tiny", "1b"))
    ap.add_argument("--compositions", default=COMPOSITIONS, help="DECODES:CHUNKS:PROMPT,... (default %(default)s)")
    ap.add_argument("--context", type=int, default=128, help="the decodes' context tokens")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10, help="steps per path per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    args.comps = parse_compositions(args.compositions)
    if not any(k for _, k, _ in args.comps):
        bad("--compositions: give at least one with prefill chunks (e.g. 8:4:32)")
    for name in ("context", "rounds", "steps", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            bad(f"--{name}: must be >= {0 if name == 'warmup' else 1}")
    command = "python benchmarks/serve_prefill_attention.py " + " ".join(sys.argv[1:])
    write(args, command, measure(args))


if __name__ == "__main__":
    main()
