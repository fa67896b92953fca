"""`workbench serve MODEL|demo`: the OpenAI-compatible server on this machine."""

from __future__ import annotations

import argparse

from workbench.commands import Command
from workbench.errors import WorkbenchError
from workbench.units import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a Hugging Face checkpoint directory (config.json + *.safetensors) or 'demo'")
    p.add_argument("--mode", default="colocated", choices=["colocated", "disaggregated"],
                   help="one worker, or a prefill and a decode worker with KV pages moved through the transport")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--name", default=None, help="the model name clients use (default: the directory name)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prefill-device", default=None, help="disaggregated: the prefill worker's device")
    p.add_argument("--decode-device", default=None, help="disaggregated: the decode worker's device")
    p.add_argument("--transport", default="tcp", help="disaggregated: tcp, cuda_ipc or nixl")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages of the (colocated) worker: processes holding "
                   "contiguous layer ranges, activations between them over the transport")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the (colocated) worker: "
                   "devices DEVICE, DEVICE+1, … (NCCL), or CPU processes (gloo)")
    p.add_argument("--kv-cache", default="256MiB", help="KV-cache size per worker (e.g. 256MiB, 4GiB)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--max-batched-tokens", type=int, default=256, help="token budget of one step (chunked prefill)")
    p.add_argument("--max-seqs", type=int, default=64, help="sequences in one batch at most")
    p.add_argument("--max-inflight", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--replicas", default=None, metavar="MIN:MAX",
                   help="run MIN..MAX server processes behind a router that adds one under load and removes idle "
                        "ones after draining (the same load metric drives the HPA of `workbench deploy k8s`)")


def run(args: argparse.Namespace) -> int:
    from workbench.serve.service import start_service

    if not 0 <= args.port < 65536:
        raise WorkbenchError(f"--port: must be 0..65535, got {args.port}")
    if args.tp > 1 and args.mode != "colocated":
        raise WorkbenchError("--tp: tensor parallelism is served with --mode colocated (not yet with prefill/decode workers)")
    if args.pp > 1 and (args.mode != "colocated" or args.tp > 1):
        raise WorkbenchError("--pp: pipeline stages are served with --mode colocated and --tp 1 (not yet combined)")
    for name in ("page_size", "max_batched_tokens", "max_seqs", "max_inflight", "tp", "pp"):
        if getattr(args, name) < 1:
            raise WorkbenchError(f"--{name.replace('_', '-')}: must be ≥ 1, got {getattr(args, name)}")
    if args.model != "demo":  # a clean error here, not a traceback from a worker process
        from workbench.serve.checkpoints import check_checkpoint

        check_checkpoint(args.model)
    if args.replicas:
        return _replicated(args)
    prefill = {"device": args.prefill_device} if args.prefill_device else {}
    decode = {"device": args.decode_device} if args.decode_device else {}
    svc = start_service(args.model, args.mode, host=args.host, port=args.port, api_key=args.api_key, name=args.name,
                        max_inflight=args.max_inflight, device=args.device, dtype=args.dtype,
                        kv_bytes=parse_size(args.kv_cache, "--kv-cache"), page_size=args.page_size,
                        max_batched_tokens=args.max_batched_tokens, max_seqs=args.max_seqs,
                        transport=args.transport, prefill=prefill, decode=decode, tp=args.tp, pp=args.pp)
    print(f"serving {svc.model_name!r} ({args.mode}) at {svc.url}/v1  —  metrics at {svc.url}/metrics; Ctrl-C stops",
          flush=True)
    try:
        svc.server.serve_forever()
    finally:
        svc.stop()
    return 0


_FORWARD = ("mode", "api_key", "name", "device", "dtype", "prefill_device", "decode_device", "transport", "kv_cache",
            "page_size", "max_batched_tokens", "max_seqs", "max_inflight", "tp")


def _replicated(args: argparse.Namespace) -> int:
    from workbench.deploy.router import Router, ScalePolicy, serve_command

    lo, sep, hi = str(args.replicas).partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit():
        raise WorkbenchError(f"--replicas: {str(args.replicas)[:40]!r}; use MIN:MAX, e.g. 1:4")
    extra: list[str] = []
    for name in _FORWARD:
        value = getattr(args, name, None)
        if value is not None:
            extra += [f"--{name.replace('_', '-')}", str(value)]
    router = Router(serve_command(args.model, extra), ScalePolicy(min=int(lo), max=int(hi)), host=args.host,
                    port=args.port)
    with router:
        print(f"serving {args.model!r} with {lo}..{hi} replicas at {router.url}/v1  —  replicas and load at "
              f"{router.url}/router/state; Ctrl-C stops", flush=True)
        try:
            while True:
                import time

                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


COMMANDS = [Command("serve", None, "serve a model over an OpenAI-compatible HTTP API", add_arguments, run)]
