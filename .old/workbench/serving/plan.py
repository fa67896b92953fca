"""`ServingPlan`: how a model is served — parallelism per worker, precisions, batch caps, KV paging,
colocated or disaggregated prefill/decode. Parsed once from "tp=8,max_seqs=256,..." specs.

Defaults follow vLLM's V1 engine on a datacentre GPU where a number is needed: `max_seqs=256`
(`--max-num-seqs`), `max_tokens=8192` (`--max-num-batched-tokens`), `block=16` (`--block-size`),
`mem_util=0.9` (`--gpu-memory-utilization`), chunked prefill and prefix caching on, preemption by
recompute, CUDA graphs for decode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from workbench.errors import WorkbenchError
from workbench.options import parse_options
from workbench.validate import boolean, number, show, whole

PRECISIONS = ("bf16", "fp16", "fp8", "int8", "fp4", "fp32")
KV_PRECISIONS = ("auto", "bf16", "fp16", "fp8", "int8", "fp32")
PREEMPTION = ("recompute", "swap")
POLICIES = ("max_utilization", "guaranteed_no_evict")
# how the real server moves KV pages between disaggregated workers -> the measured protocol rows that price it
# (`datasets/net_params.csv`; "" = the route's own links, as a modelled cluster's fabric would carry them)
KV_TRANSPORTS = ("", "tcp", "cuda_ipc")
_INT = ("tp", "pp", "ep", "dp", "replicas", "max_seqs", "max_tokens", "chunk", "block", "max_len",
        "prefill_workers", "prefill_tp", "prefill_ep", "decode_workers", "decode_tp", "decode_ep")
_BOOL = ("prefix_caching", "cuda_graph", "chunked_prefill")
_HOST = ("scheduler_us", "seq_us", "chunk_us", "prefill_step_us", "eager_us", "request_us", "fe_request_us", "fe_finish_us", "fe_async_us", "fe_token_us",
         "fe_step_us", "fe_slowdown")
_OPTIONAL = ("prefill_scheduler_us", "prefill_seq_us", "decode_scheduler_us", "decode_seq_us", "kv_us", "kv_GBps")
ALIASES = {"max_num_seqs": "max_seqs", "max_num_batched_tokens": "max_tokens", "block_size": "block",
           "kv_cache_dtype": "kv_precision", "dtype": "precision", "gpu_memory_utilization": "mem_util",
           "preemption_mode": "preemption", "capacity_scheduler_policy": "policy", "max_model_len": "max_len"}


@dataclass(frozen=True)
class ServingPlan:
    """One serving configuration.

    Colocated: `replicas` copies (0 = as many as the cluster holds) of one worker with `tp` × `pp` GPUs,
    `ep` (MoE experts over ep ranks; 1 = none) and `dp` (attention data parallelism inside the worker:
    dp attention groups of tp/dp... see docs). Disaggregated when `prefill_workers` and `decode_workers`
    are both > 0: prefill workers of `prefill_tp` GPUs (`prefill_ep`) and decode workers of `decode_tp`
    (`decode_ep`), the KV cache written layer by layer from one to the other.
    `precision` is the weights' (GEMMs run at its compute precision); `kv_precision` the KV cache's
    (auto = the activations' bf16). `chunk`: the longest prefill chunk per request per step (0 = up to
    `max_tokens`). `max_len`: the longest prompt + output accepted (vLLM's max_model_len; 0 = whatever
    fits the KV pool; presets' `seq` is a training length, not a context limit). `scheduler_us`: host time per step not hidden behind the GPU (0: an overlapped
    scheduler, as vLLM V1 and SGLang run it); `seq_us`: host time per sequence in a step (Python per sequence,
    sampling, page tables); `chunk_us`: host time per prefill chunk in a step (an engine whose prefill attention
    runs per chunk: its calls for each); `prefill_step_us`: host time per step that holds any prefill chunk, once
    (an engine without CUDA graphs: its prefill attention's set-up, masks and index ops per layer, whatever the
    chunks); `eager_us`: host time per step that is not a captured CUDA graph (with
    `cuda_graph`, steps other than decode-only ones: the launches a graph saves, where the engine's kernels
    outnumber the counted ones; it overlaps the GPU's work: such a step lasts the longer of the two); `request_us`: time per request outside the engine (HTTP, tokenisation, the pipe to
    the worker, streaming back): added to TTFT and E2EL and to a closed-loop client's turnaround (both 0 unless
    calibrated: `workbench.serve.calibrate`). `prefill_scheduler_us`, `prefill_seq_us`, `decode_scheduler_us`,
    `decode_seq_us`: the same host costs for one role of a disaggregated plan (unset: the plan's). `kv_us`,
    `kv_GBps`: a KV hand-off's per-layer write priced as `kv_us` + its bytes / `kv_GBps` (measured; unset: the
    cluster's route through `workbench.sim.p2p`). `kv_transport`: the transport backend the real server moves KV
    pages with (`tcp`, `cuda_ipc`; the `--transport` of `workbench serve`): the route is then priced with that
    backend's measured rows (`tcp-engine`; `cuda_ipc`, `cuda_ipc-local` within one GPU) instead of its links'
    protocol, and a served run of the job uses that backend. The front end (`fe_*`, 0 unless measured): one server that
    spends `fe_request_us` per request before it reaches the engine, `fe_async_us` per request just after (off
    every request's path unless others wait behind it), `fe_finish_us` per request after its last token (closing
    the stream, the client's accounting: a closed-loop client sends its next request after it), `fe_token_us` per
    streamed token and `fe_step_us` per engine step's output; tokens reach clients only when it is through with the work ahead of them, and while it is busy
    the engine's steps run `1 + fe_slowdown` times slower (they share CPU cores). `policy`: max_utilization (admit what fits now, preempt
    under KV pressure: vLLM, TensorRT-LLM's MAX_UTILIZATION) or guaranteed_no_evict (reserve prompt +
    all output blocks at admission, never preempt: TensorRT-LLM's default capacity scheduler).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    replicas: int = 0
    precision: str = "bf16"
    kv_precision: str = "auto"
    max_seqs: int = 256
    max_tokens: int = 8192
    chunk: int = 0
    block: int = 16
    max_len: int = 0
    prefix_caching: bool = True
    chunked_prefill: bool = True
    cuda_graph: bool = True
    preemption: str = "recompute"
    policy: str = "max_utilization"
    mem_util: float = 0.9
    scheduler_us: float = 0.0
    seq_us: float = 0.0
    chunk_us: float = 0.0
    prefill_step_us: float = 0.0
    eager_us: float = 0.0
    request_us: float = 0.0
    prefill_scheduler_us: float | None = None
    prefill_seq_us: float | None = None
    decode_scheduler_us: float | None = None
    decode_seq_us: float | None = None
    kv_us: float | None = None
    kv_GBps: float | None = None
    kv_transport: str = ""
    fe_request_us: float = 0.0
    fe_finish_us: float = 0.0
    fe_async_us: float = 0.0
    fe_token_us: float = 0.0
    fe_step_us: float = 0.0
    fe_slowdown: float = 0.0
    prefill_workers: int = 0
    prefill_tp: int = 0
    prefill_ep: int = 0
    decode_workers: int = 0
    decode_tp: int = 0
    decode_ep: int = 0

    def __post_init__(self) -> None:
        for k in _INT:
            lo = 0 if k in ("replicas", "chunk", "max_len") or k.startswith(("prefill_", "decode_")) else 1
            object.__setattr__(self, k, whole(getattr(self, k), f"plan.{k}", lo, 1 << 24))
        for k in _BOOL:
            if not isinstance(getattr(self, k), bool):
                raise WorkbenchError(f"plan.{k}: expected true or false, got {show(getattr(self, k))}")
        if self.precision not in PRECISIONS:
            raise WorkbenchError(f"plan.precision: {show(self.precision)} is not one of {', '.join(PRECISIONS)}")
        if self.kv_precision not in KV_PRECISIONS:
            raise WorkbenchError(f"plan.kv_precision: {show(self.kv_precision)} is not one of {', '.join(KV_PRECISIONS)}")
        if self.policy not in POLICIES:
            raise WorkbenchError(f"plan.policy: {show(self.policy)} is not one of {', '.join(POLICIES)}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise WorkbenchError(f"plan.kv_transport: {show(self.kv_transport)} is not one of tcp, cuda_ipc "
                                 "(or leave it unset to price the route's own links)")
        if self.preemption not in PREEMPTION:
            raise WorkbenchError(f"plan.preemption: {show(self.preemption)} is not one of {', '.join(PREEMPTION)}")
        number(self.mem_util, "plan.mem_util", 0.0, 1.0)
        for k in _HOST:
            number(getattr(self, k), f"plan.{k}", 0.0, 1e7, lo_open=False)
        for k in _OPTIONAL:
            if getattr(self, k) is not None:
                number(getattr(self, k), f"plan.{k}", 0.0, 1e7, lo_open=k == "kv_GBps")
        if self.max_tokens < self.max_seqs and self.chunked_prefill:
            raise WorkbenchError(f"plan.max_tokens: {self.max_tokens} is below max_seqs {self.max_seqs}; a step must "
                                 "fit one token of every running sequence (raise max_tokens or lower max_seqs)")
        if (self.prefill_workers > 0) != (self.decode_workers > 0):
            raise WorkbenchError("plan.prefill_workers: disaggregated serving needs both prefill_workers and "
                                 "decode_workers > 0 (or neither, for colocated)")
        if self.disaggregated and self.pp > 1:
            raise WorkbenchError("plan.pp: disaggregated workers are modelled with tp/ep only; set pp=1")

    @property
    def disaggregated(self) -> bool:
        return self.prefill_workers > 0 and self.decode_workers > 0

    def host(self, role: str) -> tuple[float, float]:
        """(scheduler_us, seq_us) of a worker of `role`: its own where set, else the plan's."""
        s = getattr(self, f"{role}_scheduler_us", None) if role in ("prefill", "decode") else None
        q = getattr(self, f"{role}_seq_us", None) if role in ("prefill", "decode") else None
        return (self.scheduler_us if s is None else s), (self.seq_us if q is None else q)

    def kv_format(self) -> str:
        return "bf16" if self.kv_precision == "auto" else self.kv_precision

    def worker(self, role: str) -> tuple[int, int]:
        """(tp, ep) of a worker of `role` (colocated, prefill, decode)."""
        if role == "prefill":
            return self.prefill_tp or self.tp, self.prefill_ep or self.ep
        if role == "decode":
            return self.decode_tp or self.tp, self.decode_ep or self.ep
        return self.tp, self.ep

    def gpus_per_worker(self, role: str = "colocated") -> int:
        return self.worker(role)[0] * (self.pp if role == "colocated" else 1)

    # ------------------------------------------------------------ the edge
    @classmethod
    def parse(cls, spec: Any) -> ServingPlan:
        if isinstance(spec, ServingPlan):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, dict):
            raw = {str(k): v for k, v in spec.items()}
        else:
            raw = parse_options(str(spec), "plan", "tp=8,max_seqs=256")
        known = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            name = ALIASES.get(k, k)
            if name not in known:
                raise WorkbenchError(f"plan: unknown serving key {show(k, 40)} (known: {', '.join(known)})")
            if name in kw:
                raise WorkbenchError(f"plan: {name} is given twice; give each option once")
            if name in _INT:
                kw[name] = whole(v, f"plan.{name}", 0, 1 << 24)
            elif name in _BOOL:
                kw[name] = boolean(v, f"plan.{name}")
            elif name in _OPTIONAL:
                kw[name] = None if v is None or str(v).strip().lower() in ("", "none") else \
                    number(v, f"plan.{name}", 0.0, 1e7, lo_open=name == "kv_GBps")
            elif name == "mem_util" or name in _HOST:
                kw[name] = number(v, f"plan.{name}", 0.0, 1e7, lo_open=False)
            else:
                kw[name] = str(v).strip()
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> ServingPlan:
        return replace(self, **changes)

    def __str__(self) -> str:
        base = {f.name: f.default for f in fields(self)}
        return ",".join(f"{k}={_text(v)}" for k, v in asdict(self).items() if v != base[k])


def _text(v: Any) -> str:
    return ("1" if v else "0") if isinstance(v, bool) else str(v)
