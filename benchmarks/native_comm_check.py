"""Check the native engine's comm telemetry path on one rank: real c10d collectives on a one-rank process
group (NCCL on a GPU, gloo on CPU), one step under `CommSampler`, and what the profiler saw.

    python3 benchmarks/native_comm_check.py --backend nccl --out native_comm_gpu.json

Writes the events (op, bytes, group, duration, what timed them), and the raw profiler records around each
c10d op (its shapes and dtypes, the device activities linked to it), so a torch version whose records
differ shows how.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    ap.add_argument("--out", default="native_comm_check.json")
    a = ap.parse_args()
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from workbench.runner.native_comm import C10D_OPS, GROUP_RANGE, CommSampler, Groups, spans_from_profiler
    from workbench.runner.telemetry import Recorder

    cuda = a.backend == "nccl"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    extra = {"device_id": device} if cuda else {}
    dist.init_process_group(a.backend, store=dist.HashStore(), rank=0, world_size=1, **extra)
    rec = Recorder(0, cuda=cuda)
    sampler = CommSampler(rec, Groups(), every=1, cuda=cuda)
    n = 1 << 20
    shard, full = torch.ones(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    grads, out = torch.ones(n, device=device), torch.empty(n, device=device)
    act = torch.ones(64, 1024, device=device)

    def step(i: int) -> None:
        rec.step = i
        with record_function(GROUP_RANGE + "dp"):
            dist.all_gather_into_tensor(full, shard)
            dist.reduce_scatter_tensor(out, grads)
            dist.all_reduce(grads)
        funcol.all_reduce(act, "sum", dist.group.WORLD).wait()

    run = sampler.wrap(step)
    t0 = time.perf_counter()
    for i in range(3):
        run(i)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = [dict(zip(("kind", "op", "bytes", "group", "peer", "start", "end", "step"), e[:8]))
              for e in rec.take()["events"]]
    for e in events:
        e["us"] = (e["end"] - e["start"]) * 1e6
    # the raw records of one more profiled step, for versions whose records differ
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        step(9)
        if cuda:
            torch.cuda.synchronize()
    raw = []
    for e in prof.profiler.kineto_results.events():  # type: ignore[union-attr]
        name = e.name()
        dev = e.device_type() != DeviceType.CPU
        if dev or name in C10D_OPS or "nccl" in name.lower() or "gloo" in name or "comm" in name:
            raw.append({"name": name, "device": dev, "thread": e.start_thread_id(), "us": e.duration_ns() / 1e3,
                        "corr": e.correlation_id(), "linked": e.linked_correlation_id(),
                        "shapes": str(e.shapes()), "dtypes": str(e.dtypes()),
                        "structured": str(getattr(e, "structured_input_shapes", lambda: "n/a")()),
                        "meta": e.metadata_json()[:300] if hasattr(e, "metadata_json") else ""})
    spans = spans_from_profiler(prof.profiler.kineto_results)  # type: ignore[union-attr]
    report = {"machine": {"host": platform.node(), "torch": torch.__version__, "backend": a.backend,
                          "device": torch.cuda.get_device_name(0) if cuda else platform.processor()},
              "wall_s": wall, "sampled": sampler.sampled, "missed": sampler.missed, "sources": sampler.sources,
              "events": events, "spans_kept": len(spans), "raw": raw}
    dist.destroy_process_group()
    Path(a.out).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: report[k] for k in ("machine", "sampled", "missed", "sources")}))
    for e in events:
        print(f"{e['op']:>15} {e['group']:>3} {e['bytes']:>10} B {e['us']:9.1f} us step {e['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
