"""Pipeline-parallel stages as separate processes, activations between them over `transport`.

The worker (stage 0) schedules, embeds and runs its layers; each step it sends every other stage
the batch (a two-sided control message), then WRITEs its hidden states into stage 1's registered
buffer with the step number as immediate. Stage s waits for that immediate's count, runs its
layers and writes on to stage s+1; the last stage computes the logits and writes them into stage
0's buffer. Each stage holds only its layers' weights and KV pages (same page ids everywhere).
One step is in flight at a time (no micro-batch overlap yet).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import torch

from workbench.serve.model import Batch, Model, load_config
from workbench.serve.worker_spec import WorkerSpec, num_pages, rank_device

TAG_HELLO, TAG_NEXT, TAG_STEP = 11, 12, 13
TIMEOUT = 120.0


def split_layers(n: int, pp: int) -> list[range]:
    """`pp` contiguous ranges covering `n` layers, as even as possible."""
    if not 1 <= pp <= n:
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"plan.pp: {pp} stages for {n} layers; choose 1 ≤ pp ≤ {n}")
    b = [round(i * n / pp) for i in range(pp + 1)]
    return [range(b[i], b[i + 1]) for i in range(pp)]


class PipelineModel:
    """Stage 0 of a pipeline: looks like a `Model` to the engine; `forward` runs the whole pipeline."""

    def __init__(self, spec: Any, dtype: torch.dtype) -> None:
        from transport import Engine as Transport
        from transport import MemoryDescriptor

        cfg = load_config(spec.model)
        self.ranges = split_layers(cfg.num_layers, spec.pp)
        self.stage0 = Model.load(spec.model, layers=self.ranges[0], device=spec.device, dtype=dtype)
        self.cfg, self.device, self.dtype = cfg, self.stage0.device, dtype
        self.num_kv_heads, self.layers = self.stage0.num_kv_heads, self.ranges[0]
        self.merge_pairs = self.stage0.merge_pairs   # each stage decides for its own batch (`Model.merge_pairs`)
        self.tx = Transport("tcp", lanes=spec.lanes, host=spec.transport_host, name=f"{spec.name}-pp0")
        self.act = torch.zeros(spec.max_batched_tokens * cfg.hidden_size, dtype=dtype, device=self.device)
        self.logits_buf = torch.zeros(spec.max_seqs * cfg.vocab_size, dtype=torch.float32, device=self.device)
        self.act_region, self.logits_region = self.tx.register(self.act), self.tx.register(self.logits_buf)
        code = "import sys, json; from workbench.serve.pipeline import stage_main; stage_main(*json.loads(sys.argv[1]))"
        arg = [asdict(spec), 0, self.logits_region.descriptor.to_bytes().decode()]
        self.procs = []
        for s in range(1, spec.pp):
            arg[1] = s
            self.procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(arg)]))
        hello = {}
        for _ in range(1, spec.pp):
            m = self.tx.recv(tag=TAG_HELLO, timeout=TIMEOUT)
            stage, desc = pickle.loads(m.data)
            hello[stage] = MemoryDescriptor.from_bytes(desc)
        self.stages = [hello[s] for s in range(1, spec.pp)]
        for i, d in enumerate(self.stages):  # each stage learns where it writes: the next stage, or stage 0's logits
            nxt = self.stages[i + 1].to_bytes() if i + 1 < len(self.stages) else self.logits_region.descriptor.to_bytes()
            self.tx.send(d.address, nxt, tag=TAG_NEXT)
        self.step_no = 0

    @torch.inference_mode()
    def forward(self, batch: Batch, kv: Any, after_layer: Any = None) -> torch.Tensor:
        self.step_no += 1
        msg = pickle.dumps((self.step_no, batch.items))
        for d in self.stages:
            self.tx.send(d.address, msg, tag=TAG_STEP)
        h = self.stage0.run_layers(self.stage0.embed(batch.tokens), batch, kv, after_layer)
        n = h.numel()
        self.act[:n].copy_(h.reshape(-1))
        self.tx.write(self.act_region, self.stages[0], n * self.act.element_size(), imm=self.step_no).result(TIMEOUT)
        self.tx.counter.wait(self.step_no, 1, timeout=TIMEOUT)
        b, v = len(batch.chunks), self.cfg.vocab_size
        return self.logits_buf[:b * v].view(b, v).clone()

    def close(self) -> None:
        for d in self.stages:
            try:
                self.tx.send(d.address, b"stop", tag=TAG_STEP)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.tx.close()


def stage_main(spec_d: dict[str, Any], stage: int, leader: str) -> None:
    """A stage process (1 … pp−1): its layers, its KV pages, activations in and out over the transport."""
    from transport import Engine as Transport
    from transport import MemoryDescriptor, TransferTimeout
    from workbench.serve.kv import KVCache

    spec = WorkerSpec(**spec_d)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    dev = rank_device(spec, stage)
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    dtype = getattr(torch, spec.dtype)
    cfg = load_config(spec.model)
    rng = split_layers(cfg.num_layers, spec.pp)[stage]
    last = rng.stop == cfg.num_layers
    model = Model.load(spec.model, layers=rng, device=dev, dtype=dtype)
    kv = KVCache(cfg, num_pages(spec, model), spec.page_size, layers=len(rng), dtype=dtype, device=dev)
    tx = Transport("tcp", lanes=spec.lanes, host=spec.transport_host, name=f"{spec.name}-pp{stage}")
    inbuf = torch.zeros(spec.max_batched_tokens * cfg.hidden_size, dtype=dtype, device=dev)
    out = (torch.zeros(spec.max_seqs * cfg.vocab_size, dtype=torch.float32, device=dev) if last
           else torch.zeros_like(inbuf))
    in_region, out_region = tx.register(inbuf), tx.register(out)
    lead = MemoryDescriptor.from_bytes(leader.encode())
    tx.send(lead.address, pickle.dumps((stage, in_region.descriptor.to_bytes())), tag=TAG_HELLO)
    nxt = MemoryDescriptor.from_bytes(tx.recv(tag=TAG_NEXT, timeout=TIMEOUT).data)
    parent = os.getppid()
    try:
        with torch.inference_mode():
            while True:
                try:
                    m = tx.recv(tag=TAG_STEP, timeout=2.0)
                except TransferTimeout:
                    if os.getppid() != parent:   # the worker is gone: so is this stage
                        return
                    continue
                if m.data == b"stop":
                    return
                step, items = pickle.loads(m.data)
                tx.counter.wait(step, 1, timeout=TIMEOUT)
                batch = Batch.build(items, spec.page_size, device=dev, merge_pairs=model.merge_pairs)
                t = int(batch.tokens.shape[0])
                h = inbuf[:t * cfg.hidden_size].view(t, cfg.hidden_size).clone()
                h = model.run_layers(h, batch, kv)
                res = model.logits(h, batch).reshape(-1) if last else h.reshape(-1)
                out[:res.numel()].copy_(res)
                tx.write(out_region, nxt, res.numel() * out.element_size(), imm=step).result(TIMEOUT)
    finally:
        tx.close()
