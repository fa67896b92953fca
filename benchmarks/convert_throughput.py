"""Converter throughput: `python benchmarks/convert_throughput.py [--gb 2] [--out FILE]`.

Writes a Llama-shaped bf16 checkpoint of about `--gb` GB (random weights, sharded with a
`model.safetensors.index.json`, as `save_pretrained` lays it out) into a temporary folder, then
converts it with a 4-stage placement at bf16 (cast/copy path), fp8 and int8 (blockwise
quantisation with kernels/quant.py), and reports GB/s of checkpoint read. Baseline in the same
run: copying the same shards with `shutil.copyfile` (the disk's own speed). The checkpoint was
just written, so reads come mostly from the page cache on a machine with enough memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(d: Path, gb: float) -> dict:
    import torch
    from safetensors.torch import save_file

    h, ffn, heads, kv, vocab = 2048, 5632, 16, 4, 32000
    hd = h // heads
    per_layer = 2 * (h * h * 2 + h * kv * hd * 2 + 3 * h * ffn)  # bf16 bytes
    layers = max(4, round((gb * 1e9 - 2 * 2 * vocab * h) / per_layer) // 4 * 4)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": ffn,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
           "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    n = 0

    def flush() -> None:
        nonlocal shard, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(d / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard = {}

    shard["model.embed_tokens.weight"] = rnd(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        shard.update({p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                      p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv * hd, h),
                      p + "self_attn.v_proj.weight": rnd(kv * hd, h), p + "self_attn.o_proj.weight": rnd(h, h),
                      p + "mlp.gate_proj.weight": rnd(ffn, h), p + "mlp.up_proj.weight": rnd(ffn, h),
                      p + "mlp.down_proj.weight": rnd(h, ffn)})
        if i % 4 == 3:
            flush()
    shard["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    shard["lm_head.weight"] = rnd(vocab, h)
    flush()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/convert-cpu2.json"))
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from workbench.convert import convert
    from workbench.plan.placement import Placement, Replica, Stage

    work = Path(tempfile.mkdtemp(prefix="wb-convert-bench-", dir=args.dir))
    try:
        ck = work / "ckpt"
        ck.mkdir()
        cfg = make_checkpoint(ck, args.gb)
        L = cfg["num_hidden_layers"]
        size = sum(p.stat().st_size for p in ck.glob("*.safetensors"))
        t, c = time.perf_counter(), time.process_time()
        (work / "copy").mkdir()
        for p in ck.glob("*.safetensors"):
            shutil.copyfile(p, work / "copy" / p.name)
        copy_s, copy_cpu = time.perf_counter() - t, time.process_time() - c
        shutil.rmtree(work / "copy")
        rows: dict = {"baseline_copy": {"seconds": copy_s, "cpu_seconds": copy_cpu, "GBps": size / copy_s / 1e9}}
        import numpy as np

        from kernels.quant import quantize

        t = time.perf_counter()
        for f in ("fp8", "int8"):  # compile the numba kernels once, outside the timed conversions
            quantize(np.ones((256, 256), dtype=np.float32), f)
        rows["kernel_compile_seconds"] = time.perf_counter() - t
        q = L // 4
        for fmt in ("bf16", "fp8", "int8"):
            pl = Placement("bench", L, (Replica(tuple(Stage((f"n0.g{k}",), (k * q, (k + 1) * q - 1 if k < 3 else L - 1), fmt)
                                                      for k in range(4))),))
            res = convert(ck, pl, work / f"pkg-{fmt}", progress=False)
            rows[fmt] = {"seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"], "GBps": res["read_GBps"],
                         "GBps_per_cpu_second": size / res["cpu_seconds"] / 1e9, "bytes_written": res["bytes_written"]}
            shutil.rmtree(work / f"pkg-{fmt}")
            print(f"{fmt:5s} {res['seconds']:7.2f} s (cpu {res['cpu_seconds']:.2f} s)  {res['read_GBps']:.3f} GB/s read  "
                  f"({res['bytes_written'] / 1e9:.2f} GB written)")
        print(f"copy  {copy_s:7.2f} s  {size / copy_s / 1e9:.3f} GB/s (baseline)")
        out = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                           "processor": platform.processor() or platform.machine(),
                           "load_average_1m_at_end": os.getloadavg()[0]},
               "command": f"python benchmarks/convert_throughput.py --gb {args.gb}",
               "checkpoint": {"bytes": size, "layers": L, "dtype": "bf16", "shards": len(list(ck.glob('*.safetensors')))},
               "results": rows}
        Path(args.out).write_text(json.dumps(out, indent=1))
        print("wrote", args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
