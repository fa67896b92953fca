"""One rank of a real training run: `python -m workbench.runner.worker` (or `torchrun -m workbench.runner.worker`).

The rank reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), joins the process group (gloo on CPU, NCCL on GPUs), trains the GPT with the
plan's DP × TP × PP, and ships telemetry. The job comes from `WORKBENCH_JOB` (JSON, set by
the launcher) or from the command line (under a plain torchrun):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m workbench.runner.worker --model llama3-8b --plan dp=4,tp=4,pp=1,mbs=2,gbs=64 --steps 20 \\
        --backend nccl --compile --checkpoint-dir ck --out runs/job1

(`--engine megatron` runs the hand-written GPT instead.)

Telemetry goes to the launcher's socket (`WORKBENCH_TELEMETRY=host:port`) or, without a
launcher, to `OUT/rank<R>.jsonl` (load it with `workbench.runner.load_run(OUT)`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
import traceback
from typing import Any


def job_from_args(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="workbench.runner.worker")
    p.add_argument("--model", default=None)
    p.add_argument("--plan", default="dp=1")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-telemetry", action="store_true")
    p.add_argument("--p2p", default="auto", choices=["auto", "transport", "dist"])
    p.add_argument("--out", default="workbench-run")
    p.add_argument("--engine", default="native", choices=["native", "megatron"])
    p.add_argument("--compile", action="store_true", help="native: torch.compile each block")
    p.add_argument("--corpus", default=None, help="native: text files to train on (default: the repo's docs)")
    p.add_argument("--checkpoint-dir", default=None, help="native: torch.distributed.checkpoint save/resume here")
    p.add_argument("--export-dir", default=None, help="native: write a Hugging Face checkpoint here at the end")
    a = p.parse_args(argv)
    from workbench.runner.launcher import resolve_job

    if a.engine == "native":
        from dataclasses import replace

        from workbench.runner.launcher import local_job, runnable_plan, worker_job
        from workbench.topology import discover

        world = int(os.environ.get("WORLD_SIZE", "1"))
        here = discover(cpu_ranks=world, measure=False) if a.backend == "gloo" else discover()
        j = local_job(here, a.model, a.plan, a.steps, a.backend, telemetry=not a.no_telemetry, optimizer=a.optimizer,
                      lr=a.lr, seed=a.seed, engine="native", compile=a.compile, corpus=a.corpus,
                      checkpoint_dir=a.checkpoint_dir, export_dir=a.export_dir)
        job = worker_job(j)
        job["job"] = replace(j, plan=runnable_plan(j)).to_dict()
    else:
        job = resolve_job(a.model, a.plan, int(os.environ.get("WORLD_SIZE", "1")), a.steps, a.backend,
                          a.optimizer, a.lr, a.seed, not a.no_telemetry)
    job["out"] = a.out
    job["p2p"] = a.p2p
    return job


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    rank = int(env.get("RANK", "0"))
    world = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    job = json.loads(env["WORKBENCH_JOB"]) if "WORKBENCH_JOB" in env else job_from_args(argv)
    from workbench.runner.telemetry import Flusher, Recorder, Sink

    address = env.get("WORKBENCH_TELEMETRY")
    if not address and rank == 0:  # under a plain torchrun: leave the job beside the rank files for load_run
        os.makedirs(job.get("out", "workbench-run"), exist_ok=True)
        with open(os.path.join(job.get("out", "workbench-run"), "job.json"), "w") as f:
            json.dump(job, f)
    sink = Sink(address, None if address else os.path.join(job.get("out", "workbench-run"), f"rank{rank}.jsonl"))
    rec = Recorder(rank, enabled=job["telemetry"] is True, cuda=job["backend"] == "nccl")
    sink.send({"type": "hello", "rank": rank, "world": world, "host": env.get("WORKBENCH_HOST") or socket.gethostname(), "pid": os.getpid(),
               "perf": time.perf_counter(), "wall": time.time()})
    flusher = Flusher(rec, sink, 0.5 if job["telemetry"] is False else 0.05)
    flusher.start()
    try:
        losses = _train(job, rank, world, local_rank, rec, sink)
    except BaseException as exc:
        flusher.stop()
        sink.send({"type": "error", "rank": rank, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-4000:]})
        sink.close()
        print(f"workbench.runner.worker rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    flusher.stop()
    sink.send({"type": "done", "rank": rank, "losses": losses})
    sink.close()
    return 0


def _train(job: dict[str, Any], rank: int, world: int, local_rank: int, rec: Any, sink: Any) -> list[float | None]:
    if job.get("engine", "megatron") == "native":  # torch's own engines (workbench.runner.native)
        from workbench.runner.native import train

        return train(job, rank, world, local_rank, rec, sink)
    import torch
    import torch.distributed as dist

    from workbench.runner.gpt import GPTConfig
    from workbench.runner.parallel import Comm, Layout, Trainer
    from workbench.runner.steps import run_steps

    torch.set_num_threads(int(job.get("threads") or 1))
    plan = job["plan"]
    if world != plan["dp"] * plan["tp"] * plan["pp"]:
        raise RuntimeError(f"WORLD_SIZE={world} but the plan needs dp*tp*pp={plan['dp'] * plan['tp'] * plan['pp']} ranks")
    if job["backend"] == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=float(job.get("collective_timeout_s", 120)))
    if world > 1 or job["backend"] == "nccl":
        extra: dict[str, Any] = {"device_id": device} if job["backend"] == "nccl" else {}
        dist.init_process_group(job["backend"], rank=rank, world_size=world, timeout=timeout, **extra)
    try:
        lay = Layout(plan["dp"], plan["tp"], plan["pp"], rank)
        comm = Comm(lay, rec, device)
        tr = Trainer(GPTConfig(**job["model"]), lay, comm, rec, device, plan["gbs"], plan["mbs"],
                     plan.get("zero", 0), job["optimizer"], job["lr"], job["seed"], job.get("p2p", "auto"),
                     float(job.get("collective_timeout_s", 120)))
        sink.send({"type": "info", "rank": rank, "p2p": tr.p2p_mode})
        losses = run_steps(tr.step, job, rank, rec, device)
        if job.get("dump_params"):
            os.makedirs(job["dump_params"], exist_ok=True)
            torch.save(tr.reference_state(), os.path.join(job["dump_params"], f"rank{rank}.pt"))
        if world > 1 and device.type == "cpu":
            dist.barrier()
        tr.close()
        return losses
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
