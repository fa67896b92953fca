"""The native engine: one rank of a Llama-family model parallelised by PyTorch's own engines.

As torchtitan does it, on a `DeviceMesh` of shape (pp, dp, tp) whose row-major rank order is the
house's `RankLayout` (tp fastest, then dp, then pp):

- **TP (+SP)**: `parallelize_module` with `ColwiseParallel`/`RowwiseParallel` on the attention and
  feed-forward projections; with `sp` the norms run `SequenceParallel` on sequence shards and the
  activations between blocks stay sharded on the sequence; the LM head is column-parallel and
  the loss is computed on vocabulary shards (`loss_parallel`).
- **DP**: FSDP2 `fully_shard` per block and at the root over the dp mesh, mixed precision (bf16
  parameters for compute, fp32 reduction); `zero=3` reshards after forward (ZeRO-3), `zero=1/2`
  keeps the gathered parameters until backward (one gather per step, gradients reduce-scattered:
  ZeRO-2); `zero=0` keeps full replicas and all-reduces the gradients (what DDP does).
- **PP**: `torch.distributed.pipelining`: each rank holds its stage's layers (`vpp` chunks,
  looped placement), run by `Schedule1F1B` or `ScheduleInterleaved1F1B` (`vpp > 1`), GPipe with
  one micro-batch per stage on the CPU test path.
- **recompute**: `checkpoint_wrapper` around whole blocks (`full`) or their feed-forward
  (`selective`); **compile**: `torch.compile` per block; **precision**: bf16 via FSDP's policy
  or autocast, or fp32.
- Data: the tokenised local corpus of `workbench.runner.data`; checkpoints with
  `torch.distributed.checkpoint` (saved at the end, resumed when the directory holds one); an
  HF-format export (safetensors + config.json + tokenizer.json) for `LlamaForCausalLM`.

Telemetry: forward and backward spans per micro-batch (and chunk, under PP) with their model
FLOPs, the optimizer, and memory by category. The collectives and pipeline transfers run inside
torch's engines on their own threads (gloo) or streams (NCCL); sampled steps run under
`torch.profiler` and each of them becomes an event with its op, bytes, group, peer and measured
duration (`workbench.runner.native_comm`): the first step after the warm-up, then one in
`comm_every` at most (the job's key or `WORKBENCH_COMM_EVERY`, default 10; 0 turns it off), further
apart when a profiled step's measured extra time would exceed `comm_budget_pct` of the steps
(`WORKBENCH_COMM_BUDGET_PCT`, default 2 %; 0: a fixed one in `comm_every`). Those events overlap
the compute spans they run beside.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from workbench.core.layout import RankLayout, split_layers
from workbench.models.spec import ModelSpec
from workbench.runner.llama import Llama, build, hf_config, hf_state_dict
from workbench.runner.native_comm import GROUP_RANGE, CommSampler, Groups
from workbench.runner.steps import run_steps
from workbench.runner.telemetry import Recorder


# ------------------------------------------------------------------ building the rank's model
def chunk_layers(spec: ModelSpec, pp: int, vpp: int, stage: int) -> list[list[int]]:
    """Global layer ids of each chunk a stage holds (looped: chunk c of stage s is virtual stage c·pp + s)."""
    counts = split_layers(spec.layers, pp * vpp)
    starts = [sum(counts[:i]) for i in range(pp * vpp)]
    return [list(range(starts[c * pp + stage], starts[c * pp + stage] + counts[c * pp + stage])) for c in range(vpp)]


def apply_tp(model: Llama, tp_mesh: Any, sp: bool) -> None:
    """Megatron TP (+ sequence parallelism) with DTensor `parallelize_module` (torchtitan's plan)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    seq = Shard(1) if sp else Replicate()
    top: dict[str, Any] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sp:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.spec.tied and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight  # both vocab-sharded (Shard(0)): tie them again
    for block in model.layers.values():
        plan: dict[str, Any] = {
            "attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(output_layouts=seq),
        }
        if block.feed_forward.w3 is not None:  # type: ignore[union-attr]
            plan["feed_forward.w3"] = ColwiseParallel()
        if sp:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


def apply_recompute(model: Llama, mode: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for key, block in list(model.layers.items()):
        if mode == "full":
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            block.feed_forward = checkpoint_wrapper(block.feed_forward, preserve_rng_state=False)  # type: ignore[arg-type]


def apply_fsdp(model: Llama, dp_mesh: Any, precision: str, zero: int) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                              reduce_dtype=torch.float32)
    reshard = zero >= 3
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


def _bytes(tensors: Iterable[Any]) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


# ------------------------------------------------------------------ one rank's trainer
class NativeTrainer:
    """Builds the rank's model chunks, optimizer, pipeline schedule, and runs steps."""

    def __init__(self, job: dict[str, Any], rank: int, world: int, device: torch.device, rec: Recorder) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from workbench.runner import data

        self.job, self.rank, self.device, self.rec = job, rank, device, rec
        p = job["plan"]
        self.p = p
        self.spec = ModelSpec(**job["model"])
        self.lay = RankLayout(tp=p["tp"], dp=p["dp"], pp=p["pp"])
        c = self.lay.coords(rank)
        self.stage, self.dp_rank, self.tp_rank = c["pp"], c["dp"], c["tp"]
        self.precision, self.sp = p["precision"], bool(p["sp"]) and p["tp"] > 1
        self.micro = p["gbs"] // (p["dp"] * p["mbs"])
        self.mesh = init_device_mesh(device.type, (p["pp"], p["dp"], p["tp"]), mesh_dim_names=("pp", "dp", "tp"))
        if job.get("tokens"):  # prepared once by the launcher: every rank reads the same file
            tok = job.get("tokenizer")
            corpus = data.Corpus(Path(tok) if tok else None, Path(job["tokens"]), int(job["tokenizer_vocab"]))
        else:  # under a plain torchrun: each rank prepares (deterministic; cached by content)
            corpus = data.prepare(data.corpus_files(job.get("corpus")), self.spec.vocab, job.get("cache_dir"))
        self.corpus, self.tokens = corpus, corpus.load()
        spec, untied = self.spec, p["pp"] > 1 and self.spec.tied
        if untied:  # each end of the pipeline keeps its own copy of the shared matrix
            from dataclasses import replace

            spec = replace(spec, tied=False)
        self.chunks: list[Llama] = []
        self.chunk_ids = chunk_layers(self.spec, p["pp"], p["vpp"], self.stage)
        nv = p["pp"] * p["vpp"]
        for ci, ids in enumerate(self.chunk_ids):
            m = build(spec, job["seed"], device, untied)
            vs = ci * p["pp"] + self.stage
            if p["pp"] > 1:
                m.keep_stage(ids, first=vs == 0, last=vs == nv - 1)
            self.chunks.append(m)
        self.first = self.stage == 0
        self.last_vs = nv - 1
        for m in self.chunks:
            if p["tp"] > 1:
                apply_tp(m, self.mesh["tp"], self.sp)
            if p["recompute"] != "none":
                apply_recompute(m, p["recompute"])
            if job.get("compile"):
                for key, block in list(m.layers.items()):
                    m.layers[key] = torch.compile(block)  # type: ignore[assignment]
            if p["dp"] > 1 and p["zero"] >= 1:
                apply_fsdp(m, self.mesh["dp"], self.precision, p["zero"])
        self.fsdp = p["dp"] > 1 and p["zero"] >= 1
        self.autocast = self.precision == "bf16" and not self.fsdp
        self.params = [q for m in self.chunks for q in m.parameters()]
        self.opts = [self._optimizer(m) for m in self.chunks]
        self.flops = self._chunk_flops()
        self.schedule = self._schedule() if p["pp"] > 1 else None
        self.start_step = self.load_checkpoint()
        rec.set_memory("weights", _bytes(self.params))

    # ----- pieces -----
    def _optimizer(self, m: nn.Module) -> torch.optim.Optimizer:
        params: Any = [q for q in m.parameters()]
        # DTensor and plain parameters (the replicated norms of TP without SP) in separate groups:
        # fused and foreach kernels cannot mix them in one call
        split = [[q for q in params if hasattr(q, "to_local")], [q for q in params if not hasattr(q, "to_local")]]
        if all(split):
            params = [{"params": g} for g in split]
        kw: dict[str, Any] = {"lr": self.job["lr"]}
        if self.job["optimizer"] == "sgd":
            return torch.optim.SGD(params, **kw)
        if self.device.type == "cuda":
            kw["fused"] = True
        return torch.optim.AdamW(params, weight_decay=0.0, **kw)

    def _chunk_flops(self) -> list[float]:
        """Forward model FLOPs of each chunk per micro-batch on this rank (the simulator's count, / tp)."""
        from workbench.models.costs import forward_flops_per_token, layer_kinds

        kinds = layer_kinds(self.spec)
        tokens = self.p["mbs"] * self.spec.seq
        out = []
        for ci, ids in enumerate(self.chunk_ids):
            f = sum(forward_flops_per_token(self.spec, kinds[i]) for i in ids) * tokens
            if ci * self.p["pp"] + self.stage == self.last_vs:
                f += 2.0 * self.spec.vocab * self.spec.hidden * tokens
            out.append(f / self.p["tp"])
        return out

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

    def _schedule(self) -> Any:
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        p = self.p
        group = self.mesh["pp"].get_group()
        stages = []
        for ci, m in enumerate(self.chunks):
            st = PipelineStage(m, ci * p["pp"] + self.stage, p["pp"] * p["vpp"], self.device, group=group)
            self._time_stage(st, ci)
            stages.append(st)
        if p["vpp"] > 1:
            return ScheduleInterleaved1F1B(stages, self.micro, loss_fn=self._loss)  # type: ignore[arg-type]
        cls = Schedule1F1B if self.micro >= p["pp"] else ScheduleGPipe
        return cls(stages[0], self.micro, loss_fn=self._loss)

    def _time_stage(self, st: Any, ci: int) -> None:
        """Forward and backward spans of each micro-batch of a pipeline chunk."""
        rec, fl = self.rec, self.flops[ci]
        fwd, bwd = st.forward_one_chunk, st.backward_one_chunk

        def forward_one_chunk(*a: Any, **k: Any) -> Any:
            with rec.compute("forward", fl):
                return fwd(*a, **k)

        def backward_one_chunk(*a: Any, **k: Any) -> Any:
            with rec.compute("backward", 2 * fl):
                return bwd(*a, **k)

        st.forward_one_chunk = forward_one_chunk
        st.backward_one_chunk = backward_one_chunk

    def _ctx(self) -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        if self.p["tp"] > 1:
            from torch.distributed.tensor.parallel import loss_parallel

            stack.enter_context(loss_parallel())
        return stack

    def _amp(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----- a step -----
    def step(self, step: int) -> float | None:
        from workbench.runner import data

        rec, p = self.rec, self.p
        rec.step = step
        with rec.compute("data"):
            x, y = data.batch(self.tokens, step, p["gbs"], self.spec.seq, self.job["seed"])
            per = p["gbs"] // p["dp"]
            x = x[self.dp_rank * per:(self.dp_rank + 1) * per].to(self.device, non_blocking=True)
            y = y[self.dp_rank * per:(self.dp_rank + 1) * per].to(self.device, non_blocking=True)
        loss_out: float | None = None
        if self.schedule is not None:
            losses: list[torch.Tensor] = []
            with self._ctx(), self._amp():
                if self.first:
                    self.schedule.step(x, target=y, losses=losses)
                elif self._holds_last():
                    self.schedule.step(target=y, losses=losses)
                else:
                    self.schedule.step()
            if losses:
                loss_out = float(torch.stack([_local(v).detach().float() for v in losses]).mean())
        else:
            m = self.chunks[0]
            total = torch.zeros((), device=self.device)
            for i in range(self.micro):
                xs, ys = x[i * p["mbs"]:(i + 1) * p["mbs"]], y[i * p["mbs"]:(i + 1) * p["mbs"]]
                if self.fsdp and p["zero"] < 3:
                    m.set_requires_gradient_sync(i == self.micro - 1)  # type: ignore[operator]
                with self._ctx():
                    with rec.compute("forward", self.flops[0]), self._amp():
                        loss = self._loss(m(xs), ys) / self.micro
                    with rec.compute("backward", 2 * self.flops[0]):
                        loss.backward()
                total += _local(loss).detach().float()
            loss_out = float(total)
        if p["dp"] > 1 and p["zero"] == 0:
            self._all_reduce_grads()
        rec.set_memory("gradients", _bytes([q.grad for q in self.params if q.grad is not None]))
        with rec.compute("optimizer"):
            for o in self.opts:
                o.step()
                o.zero_grad(set_to_none=True)
        if rec.enabled:
            rec.set_memory("optimizer", _bytes([v for o in self.opts for s in o.state.values() for v in s.values()
                                                if isinstance(v, torch.Tensor) and v.dim() > 0]))
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                static = sum(rec.memory[k] for k in ("weights", "optimizer"))
                rec.set_memory("activations", max(peak - static, 0))
        rec.set_memory("gradients", 0)
        return loss_out if self._holds_last() else None

    def _holds_last(self) -> bool:
        return any(ci * self.p["pp"] + self.stage == self.last_vs for ci in range(len(self.chunks)))

    def _all_reduce_grads(self) -> None:
        """ZeRO-0: average the gradients over the data-parallel replicas, one flat bucket per dtype."""
        group = self.mesh["dp"].get_group()
        grads = [_local(q.grad) for q in self.params if q.grad is not None]
        with record_function(GROUP_RANGE + "dp"):  # timed by the profiler on sampled steps, as every native collective
            for dtype in {g.dtype for g in grads}:
                gs = [g for g in grads if g.dtype == dtype]
                flat = torch.cat([g.reshape(-1) for g in gs])
                dist.all_reduce(flat, group=group)
                flat /= self.p["dp"]
                for g, part in zip(gs, flat.split([g.numel() for g in gs])):
                    g.copy_(part.view_as(g))

    # ----- checkpoints and export -----
    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        for ci, (m, o) in enumerate(zip(self.chunks, self.opts)):
            model |= get_model_state_dict(m)
            optim[f"chunk{ci}"] = get_optimizer_state_dict(m, o)
        return {"model": model, "optim": optim}

    def load_checkpoint(self) -> int:
        """Resume from the newest `step-N` under checkpoint_dir (model weights reshard across dp/tp;
        optimizer state needs the same pp × vpp split). Returns the step to start from."""
        d = self.job.get("checkpoint_dir")
        if not d or not Path(d).is_dir():
            return 0
        done = sorted(int(q.name.split("-")[1]) for q in Path(d).glob("step-*") if (q / ".metadata").exists())
        if not done:
            return 0
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(Path(d) / f"step-{done[-1]}"))
        for ci, (m, o) in enumerate(zip(self.chunks, self.opts)):
            set_model_state_dict(m, {k: v for k, v in state["model"].items() if k in m.state_dict()})
            set_optimizer_state_dict(m, o, state["optim"][f"chunk{ci}"])
        return done[-1]

    def save_checkpoint(self, step: int) -> str:
        import torch.distributed.checkpoint as dcp

        path = str(Path(self.job["checkpoint_dir"]) / f"step-{step}")
        dcp.save(self._state(), checkpoint_id=path)
        return path

    def export_hf(self, out: str) -> None:
        """Full bf16 weights as Hugging Face `LlamaForCausalLM` safetensors (one shard per pipeline stage),
        config.json and the corpus tokenizer.json; written by each stage's dp=0, tp=0 rank."""
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full: dict[str, torch.Tensor] = {}
        for m in self.chunks:
            sd = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))
            full |= {k: _local(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        names = hf_state_dict(full, self.spec)
        pp = self.p["pp"]
        writer = self.dp_rank == 0 and self.tp_rank == 0
        file = "model.safetensors" if pp == 1 else f"model-{self.stage + 1:05d}-of-{pp:05d}.safetensors"
        os.makedirs(out, exist_ok=True)
        if writer:
            save_file(names, os.path.join(out, file), metadata={"format": "pt"})
        index: list[Any] = [None] * dist.get_world_size() if dist.is_initialized() else [None]
        mine = {k: file for k in names} if writer else {}
        if dist.is_initialized():
            dist.all_gather_object(index, mine)
        else:
            index = [mine]
        if self.rank == 0:
            weight_map = {k: f for d in index for k, f in (d or {}).items()}
            if pp > 1:
                Path(out, "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                                indent=1))
            Path(out, "config.json").write_text(json.dumps(hf_config(self.spec), indent=1))
            if self.corpus.tokenizer is not None:
                Path(out, "tokenizer.json").write_bytes(self.corpus.tokenizer.read_bytes())


# ------------------------------------------------------------------ the rank's main loop
def train(job: dict[str, Any], rank: int, world: int, local_rank: int, rec: Recorder, sink: Any) -> list[float | None]:
    p = job["plan"]
    if world != p["dp"] * p["tp"] * p["pp"]:
        raise RuntimeError(f"WORLD_SIZE={world} but the plan needs dp*tp*pp={p['dp'] * p['tp'] * p['pp']} ranks")
    torch.set_num_threads(int(job.get("threads") or 1))
    if job["backend"] == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=float(job.get("collective_timeout_s", 120)))
    extra: dict[str, Any] = {"device_id": device} if job["backend"] == "nccl" else {}
    dist.init_process_group(job["backend"], rank=rank, world_size=world, timeout=timeout, **extra)
    try:
        tr = NativeTrainer(job, rank, world, device, rec)
        sink.send({"type": "info", "rank": rank, "p2p": "torch.distributed.pipelining" if p["pp"] > 1 else "none",
                   "engine": "native", "start_step": tr.start_step, "params": sum(q.numel() for q in tr.params)})
        profile = os.environ.get("WORKBENCH_PROFILE") if rank == 0 else None  # one late step under torch.profiler
        step: Callable[[int], Any] = tr.step
        every = int(job.get("comm_every", os.environ.get("WORKBENCH_COMM_EVERY", 10)))
        budget = float(job.get("comm_budget_pct", os.environ.get("WORKBENCH_COMM_BUDGET_PCT", 2.0)))
        reuse = os.environ.get("WORKBENCH_COMM_REUSE_SHAPES", "1") != "0"  # 0: shapes on every sample (benchmark)
        if job["telemetry"] is not False and every > 0:  # collectives and transfers from sampled steps
            pp_ranks = tuple(dist.get_process_group_ranks(tr.mesh["pp"].get_group())) if p["pp"] > 1 else ()
            step = CommSampler(rec, Groups(p["dp"], p["tp"], p["pp"], pp_ranks), every,
                               device.type == "cuda", budget, reuse).wrap(tr.step)
        losses = run_steps(step, job, rank, rec, device, start_step=tr.start_step, profile=profile)
        if job.get("checkpoint_dir"):
            path = tr.save_checkpoint(tr.start_step + job["steps"])
            sink.send({"type": "info", "rank": rank, "checkpoint": path})
        if job.get("export_dir"):
            tr.export_hf(job["export_dir"])
        dist.barrier()
        return losses
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
