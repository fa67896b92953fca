"""Disaggregated serving over a transport on one GPU: the KV hand-off of one request alone, then of 16 at once."""
import asyncio, json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from workbench.serve.backend import Backend
from workbench.serve.checkpoints import random_llama
from workbench.serve.sampling import SamplingParams

def main():
    transport = sys.argv[1]
    model = Path("/tmp/wb-serve-1b")
    if not (model / "model.safetensors").is_file():
        random_llama(model, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, device="cuda")
    spec = dict(kv_bytes=8 << 30, page_size=16, max_batched_tokens=2048, max_seqs=64, dtype="bfloat16")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with Backend(str(model), "disaggregated", transport=transport, prefill={"device": "cuda:0"},
                 decode={"device": "cuda:0"}, **spec) as b:
        async def one(p):
            async for ev in b.generate(p, params):
                pass
        async def many(n, isl):
            await asyncio.gather(*(one([(7 * i + j) % 250 for j in range(isl)]) for i in range(n)))
        for n, isl, label in [(1, 512, "warm"), (1, 512, "alone"), (1, 512, "alone2"), (16, 512, "16 at once")]:
            k0 = len(b.transfers)
            t = time.perf_counter()
            asyncio.run(many(n, isl))
            wall = time.perf_counter() - t
            b.settle(10.0)
            tx = list(b.transfers)[k0:]
            win = sorted(x["t1"] - x["t0"] for x in tx)
            w = [dt for x in tx for _, dt in x.get("writes", [])]
            print(json.dumps({"transport": transport, "case": label, "wall_ms": round(wall * 1e3, 1), "transfers": len(tx),
                              "bytes_each": tx[0]["bytes"] if tx else 0,
                              "window_ms": [round(v * 1e3, 1) for v in win][:16],
                              "layer_write_ms_median": round(sorted(w)[len(w) // 2] * 1e3, 2) if w else None,
                              "layer_write_ms_first": [round(v * 1e3, 2) for v in (tx[0].get("writes", []) and [d for _, d in tx[0]["writes"]])][:16] if tx else None}), flush=True)

if __name__ == "__main__":
    main()
