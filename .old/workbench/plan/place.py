"""The mixed-GPU placement planner: contiguous pipeline stages on TP groups, solved exactly by DP.

Search space (enumerated exhaustively): the TP degree of each node kind (a divisor of its GPU
count; TP never leaves a node, so never crosses the network), the number of replicas R (whole
nodes per replica, each node kind spread round-robin so replicas are as alike as possible), and
the order of node kinds along a pipeline. For each candidate the layer split is solved by
**dynamic programming over stage boundaries** — `f_g(j) = min_i max(f_{g-1}(i), T_g(i, j))` for
the throughput objective (the pipeline's bottleneck: busy seconds per request of its slowest
stage) and `min_i f_{g-1}(i) + T_g(i, j)` for latency — which is exact for that objective given
the device order (a group may take no layers, so the DP also chooses how many GPUs to use).
`T_g(i, j)` prices layers i..j-1 on group g with `workbench.plan.stage_cost`: the most precise
allowed format that fits (weights + KV at the replica's concurrency + activations + workspace
within vLLM's 90 %), else the least precise with the rest of the weights in host memory (then
NVMe), brought back one layer ahead over PCIe — the stage then runs at max(compute, stream).

Every candidate is then evaluated by one closed-form predictor (`evaluate`), which also prices
the two baselines a user would write by hand: the uniform split over every GPU and the split
proportional to GPU memory. The optimality gap is stated against a fluid upper bound (every GPU
busy on its own copy of the model at the largest batch, no memory or network limits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from itertools import product
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.models.spec import ModelSpec
from workbench.plan.placement import (
    Offload,
    Placement,
    Replica,
    Stage,
    supported_precisions,
)
from workbench.plan.stage_cost import GroupKind, LayerCosts, activation_bytes, layer_costs
from workbench.topology.model import Cluster

OBJECTIVES = ("throughput", "latency", "cost")
GiB = 2.0**30
FIDELITY = "closed-form (planner cost model: workbench.plan.stage_cost)"


# ------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Traffic:
    """Closed loop at `concurrency` requests in flight (as `vllm bench serve --max-concurrency`),
    or open loop at `rate` requests/s when rate > 0; fixed `isl` input and `osl` output tokens."""

    concurrency: int = 32
    isl: int = 1024
    osl: int = 256
    rate: float = 0.0

    def __post_init__(self) -> None:
        for f in ("concurrency", "isl", "osl"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise WorkbenchError(f"traffic.{f}: expected a whole number >= 1, got {v!r}")
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or self.rate < 0:
            raise WorkbenchError(f"traffic.rate: expected requests/s >= 0 (0 = closed loop), got {self.rate!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "isl": self.isl, "osl": self.osl, "rate": self.rate}


@dataclass(frozen=True)
class SLO:
    """Mean TTFT and TPOT limits in milliseconds (None = no limit)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, pred: Mapping[str, Any]) -> bool:
        if not pred.get("fits", False):
            return False
        if self.ttft_ms is not None and not pred["mean_ttft_ms"] <= self.ttft_ms:
            return False
        return not (self.tpot_ms is not None and not pred["mean_tpot_ms"] <= self.tpot_ms)

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms}


IGNORED_TRAFFIC = ("requests", "seed", "burstiness", "max_isl", "max_osl", "min_isl", "max_concurrency", "prefix",
                   "scale")  # keys of the serving simulator's traffic that a mean-value model does not use


def parse_traffic(spec: Any) -> Traffic:
    """`concurrency=64,isl=1024,osl=256` or `rate=4,isl=2048,osl=128`, or `dataset=conversation` for that
    profile's mean lengths (`datasets/traffic/lengths.csv`); a mapping, a Traffic, or the serving
    simulator's `workbench.serving.Traffic` (same spec strings; per-request keys are ignored here)."""
    if isinstance(spec, Traffic):
        return spec
    if spec is None or spec == "":
        return Traffic()
    if hasattr(spec, "concurrency") and hasattr(spec, "osl") and not isinstance(spec, (str, Mapping)):
        spec = {k: getattr(spec, k) for k in ("concurrency", "rate", "isl", "osl", "dataset") if getattr(spec, k, None)}
    from workbench.options import parse_options

    raw = dict(spec) if isinstance(spec, Mapping) else parse_options(str(spec), "traffic", "concurrency=32,isl=1024,osl=256")
    known = ("concurrency", "isl", "osl", "rate", "dataset")
    bad = sorted(set(raw) - set(known) - set(IGNORED_TRAFFIC))
    if bad:
        raise WorkbenchError(f"traffic: unknown key(s) {', '.join(bad)} (known: {', '.join(known)})")
    if "trace" in raw:
        raise WorkbenchError("traffic.trace: the planner uses mean lengths; give concurrency=/rate= with isl=, osl=")
    out: dict[str, Any] = {}
    ds = raw.get("dataset")
    if ds not in (None, "", "random"):
        from workbench.serving.traffic import profiles

        prof = profiles()
        if ds not in prof:
            raise WorkbenchError(f"traffic.dataset: {ds!r} is not one of random, {', '.join(prof)}")
        out["isl"] = max(1, round(prof[ds]["prompt"]["mean"]))
        out["osl"] = max(1, round(prof[ds]["output"]["mean"]))
    for k, v in raw.items():
        if k not in ("concurrency", "isl", "osl", "rate"):
            continue
        try:
            out[k] = float(v) if k == "rate" else int(float(v))
        except (TypeError, ValueError):
            raise WorkbenchError(f"traffic.{k}: cannot read {v!r} as a number") from None
    if out.get("rate", 0) and "concurrency" not in out:
        out["concurrency"] = 1  # open loop: concurrency follows from the rate (Little's law)
    return Traffic(**out)


def parse_slo(spec: str | Mapping[str, Any] | SLO | None) -> SLO:
    """`ttft=2000,tpot=100` (milliseconds)."""
    if isinstance(spec, SLO):
        return spec
    if not spec:
        return SLO()
    from workbench.options import parse_options

    raw = dict(spec) if isinstance(spec, Mapping) else parse_options(str(spec), "slo", "ttft=2000,tpot=100")
    out: dict[str, float] = {}
    for k, v in raw.items():
        key = {"ttft": "ttft_ms", "tpot": "tpot_ms", "ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms"}.get(k)
        if key is None:
            raise WorkbenchError(f"slo: unknown key {k!r} (known: ttft, tpot, in milliseconds)")
        try:
            out[key] = float(v)
        except (TypeError, ValueError):
            raise WorkbenchError(f"slo.{k}: cannot read {v!r} as milliseconds") from None
        if out[key] <= 0:
            raise WorkbenchError(f"slo.{k}: must be > 0 ms, got {v!r}")
    return SLO(**out)


@cache
def _params() -> dict[str, float]:
    from workbench.data import read_csv

    return {str(r["name"]): float(r["value"]) for r in read_csv("placement.csv").to_dict("records")}


@cache
def _tdp_W(model: str) -> float:
    from workbench.data import read_csv

    df = read_csv("gpus.csv")
    hit = df[df["model"] == model]
    return float(hit.iloc[0]["tdp_W"]) if not hit.empty else 0.0


@cache
def _capacity(memory_GB: float) -> float:
    p = _params()
    return memory_GB * 1e9 * p["gpu_memory_utilization"] - p["workspace_GiB"] * GiB


@dataclass(frozen=True)
class Options:
    """Planner knobs. `precisions`: allowed weight formats in order of preference (the first that
    fits a stage is used; 16-bit falls back to fp16 on GPUs without bf16). `kv_precision`: the KV
    format ("" = bf16, fp16 where bf16 is missing). `offload`: allow weights in host memory/NVMe.
    `host_GB`, `nvme_GB`: per node (0 = the datasets/placement.csv default). `prices`: USD per
    GPU-hour by GPU model for the cost objective (default: the GPU's TDP at the electricity price)."""

    precisions: tuple[str, ...] = ("bf16",)
    kv_precision: str = ""
    offload: bool = True
    host_GB: float = 0.0
    nvme_GB: float = 0.0
    chunk: int = 0
    prices: tuple[tuple[str, float], ...] = ()
    max_replicas: int = 0  # 0 = up to one per TP group

    def __post_init__(self) -> None:
        from workbench.plan.placement import PRECISIONS

        if not self.precisions:
            raise WorkbenchError("precisions: give at least one weight format, e.g. bf16 or fp8,bf16")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise WorkbenchError(f"precisions: {p!r} is not one of {', '.join(PRECISIONS)}")
        if self.kv_precision and self.kv_precision not in ("fp32", "bf16", "fp16", "fp8", "int8"):
            raise WorkbenchError(f"kv_precision: {self.kv_precision!r} is not one of fp32, bf16, fp16, fp8, int8")

    @property
    def chunk_tokens(self) -> int:
        return int(self.chunk or _params()["prefill_chunk"])

    def price(self, gpu: str) -> float:
        p = dict(self.prices)
        if p:
            if gpu not in p:
                raise WorkbenchError(f"prices: no price for {gpu} (give --prices {gpu}=USD_PER_HOUR,...)")
            return float(p[gpu])
        return _tdp_W(gpu) / 1000.0 * _params()["electricity_usd_per_kWh"]


# ------------------------------------------------------------------------------------ context


@dataclass
class _Ctx:
    cluster: Cluster
    model: ModelSpec
    traffic: Traffic
    opts: Options
    kinds: dict[tuple[int, int], GroupKind] = field(default_factory=dict)  # (node, tp) -> kind
    memo: dict[Any, Any] = field(default_factory=dict)  # formats, transfers, replica metrics

    def node(self, device: str) -> int:
        """The node index of a device (a dict built once; the cluster's own lookup walks its graph)."""
        idx = self.memo.get("node-index")
        if idx is None:
            idx = self.memo["node-index"] = {d: self.cluster.node_of(d) for d in self.cluster.gpus}
        return int(idx[device])

    def kind(self, node: int, tp: int) -> GroupKind:
        key = (node, tp)
        k = self.kinds.get(key)
        if k is None:
            n = self.cluster.nodes[node]
            # every node of the same model/intra has the same group shape: use the first such node's devices
            ref = next(i for i, x in enumerate(self.cluster.nodes) if (x.gpu, x.gpus, x.intra) == (n.gpu, n.gpus, n.intra))
            k = GroupKind(n.gpu_spec, tp, tuple(f"n{ref}.g{j}" for j in range(tp)), n.gpus)
            self.kinds[key] = k
        return k

    def capacity(self, kind: GroupKind) -> float:
        return _capacity(kind.spec.memory_GB)

    def offload_room(self, kind: GroupKind) -> tuple[float, float, float, float]:
        """(host bytes, NVMe bytes, host GB/s, NVMe GB/s) per device of this kind."""
        key = ("room", kind.spec.model, kind.gpus_on_node)
        if key not in self.memo:
            self.memo[key] = self._offload_room(kind)
        return self.memo[key]  # type: ignore[no-any-return]

    def _offload_room(self, kind: GroupKind) -> tuple[float, float, float, float]:
        from workbench.topology.catalogue import node_link

        p = _params()
        if not self.opts.offload:
            return 0.0, 0.0, 1.0, 1.0
        g = kind.gpus_on_node
        host = (self.opts.host_GB or p["host_memory_GB"]) * 1e9 * p["host_memory_usable"] / g
        nvme = (self.opts.nvme_GB or p["nvme_GB"]) * 1e9 / g
        pcie = node_link("pcie", kind.spec.pcie_gen)[0] * 1e9 * p["pcie_pinned_efficiency"]
        return host, nvme, pcie, min(pcie, p["nvme_GBps"] * 1e9 / g)

    def transfer(self, a: str, b: str, nbytes: float) -> float:
        from workbench.sim.p2p import transfer_seconds

        key = ("xfer", a, b, int(nbytes))
        v = self.memo.get(key)
        if v is None:
            v = self.memo[key] = transfer_seconds(self.cluster, a, b, int(nbytes))
        return float(v)

    def formats(self, kind: GroupKind) -> list[str]:
        """Allowed weight formats this GPU supports, in preference order."""
        key = ("fmts", kind.spec.model)
        if key in self.memo:
            return list(self.memo[key])
        self.memo[key] = self._formats(kind)
        return list(self.memo[key])

    def _formats(self, kind: GroupKind) -> list[str]:
        ok = supported_precisions(kind.spec.model)
        out: list[str] = []
        for p in self.opts.precisions:
            q = "fp16" if p == "bf16" and "bf16" not in ok else p
            if q in ok and q not in out:
                out.append(q)
        return out

    def kv_format(self, kind: GroupKind) -> str:
        key = ("kv", kind.spec.model)
        if key not in self.memo:
            self.memo[key] = self._kv_format(kind)
        return str(self.memo[key])

    def _kv_format(self, kind: GroupKind) -> str:
        ok = supported_precisions(kind.spec.model)
        q = self.opts.kv_precision or "bf16"
        if q == "bf16" and "bf16" not in ok:
            q = "fp16"
        if q not in ok:
            raise WorkbenchError(f"kv_precision: {kind.spec.model} has no {q} support (supported: {', '.join(ok)})")
        return q

    def costs(self, kind: GroupKind, precision: str, batch: int) -> LayerCosts:
        key = ("costs", kind.spec.model, kind.tp, kind.devices, precision, int(batch))
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = self._costs(kind, precision, batch)
        return hit  # type: ignore[no-any-return]

    def _costs(self, kind: GroupKind, precision: str, batch: int) -> LayerCosts:
        t = self.traffic
        return layer_costs(self.cluster, self.model, kind, precision, self.kv_format(kind), int(batch), t.isl, t.osl,
                           self.opts.chunk_tokens)


def _stage_times(ctx: _Ctx, kind: GroupKind, W: Any, KV: Any, ACT: Any, DEC: Any, PRE: Any,
                 max_layer_w: float) -> tuple[Any, Any, Any, Any, Any]:
    """Apply memory and offload to summed stage figures (scalars or arrays):
    (decode s, prefill s, host bytes, NVMe bytes, feasible)."""
    cap = ctx.capacity(kind)
    host, nvme, host_Bps, nvme_Bps = ctx.offload_room(kind)
    # offloading a fraction f = over / W of the weights needs a buffer for the next layer's share,
    # f * max_layer_w, so over = need - cap + f * max_layer_w  =>  over = (need - cap) / (1 - max_layer_w / W)
    excess = np.maximum(W + KV + ACT - cap, 0.0)
    room = 1.0 - max_layer_w / np.maximum(W, 1.0)
    over = np.where(excess > 0, excess / np.maximum(room, 1e-9), 0.0)
    feasible = (over <= W) & (over <= host + nvme) & (cap > 0) & ((excess == 0) | (room > 0))
    o_host = np.minimum(over, host)
    o_nvme = over - o_host
    stream = o_host / host_Bps + o_nvme / nvme_Bps
    n_chunks = max(ctx.traffic.isl / ctx.opts.chunk_tokens, 1.0)
    return np.maximum(DEC, stream), np.maximum(PRE, n_chunks * stream), o_host, o_nvme, feasible


def _stage_times_scalar(ctx: _Ctx, kind: GroupKind, W: float, KV: float, ACT: float, DEC: float, PRE: float,
                        max_layer_w: float) -> tuple[float, float, float, float, bool]:
    """`_stage_times` for one stage (plain floats; the same arithmetic)."""
    cap = ctx.capacity(kind)
    host, nvme, host_Bps, nvme_Bps = ctx.offload_room(kind)
    excess = max(W + KV + ACT - cap, 0.0)
    room = 1.0 - max_layer_w / max(W, 1.0)
    over = excess / max(room, 1e-9) if excess > 0 else 0.0
    feasible = over <= W and over <= host + nvme and cap > 0 and (excess == 0 or room > 0)
    o_host = min(over, host)
    o_nvme = over - o_host
    stream = o_host / host_Bps + o_nvme / nvme_Bps
    n_chunks = max(ctx.traffic.isl / ctx.opts.chunk_tokens, 1.0)
    return max(DEC, stream), max(PRE, n_chunks * stream), o_host, o_nvme, feasible


# ------------------------------------------------------------------------------------ DP


@dataclass(frozen=True)
class _Group:
    node: int
    devices: tuple[str, ...]


def _matrices(ctx: _Ctx, kind: GroupKind, conc: int, batch: int, latency: bool) -> tuple[np.ndarray, np.ndarray]:
    """T[i, j]: the cost of layers i..j-1 on one group of `kind` (inf where it cannot fit); P: the format index."""
    L = ctx.model.layers
    t = ctx.traffic
    fmts = ctx.formats(kind)
    if not fmts:
        return np.full((L + 1, L + 1), np.inf), np.zeros((L + 1, L + 1), dtype=int)
    ii = np.arange(L + 1)[:, None]
    jj = np.arange(L + 1)[None, :]
    valid = ii < jj
    first = ii == 0
    last = jj == L
    act = activation_bytes(ctx.model, kind.tp, ctx.opts.chunk_tokens, batch, False)
    act_last = activation_bytes(ctx.model, kind.tp, ctx.opts.chunk_tokens, batch, True)
    best_T = np.full((L + 1, L + 1), np.inf)
    best_P = np.zeros((L + 1, L + 1), dtype=int)
    for idx, fmt in enumerate(fmts):
        lc = ctx.costs(kind, fmt, batch)
        pw, pkv, pd_, pp = lc.prefix
        W = pw[None, :] - pw[:, None] + np.where(first, lc.embed_bytes, 0.0) + np.where(last, lc.head_bytes, 0.0)
        KV = conc * (t.isl + t.osl) * (pkv[None, :] - pkv[:, None])
        ACT = np.where(last, act_last, act)
        DEC = pd_[None, :] - pd_[:, None] + np.where(last, lc.head_decode_s, 0.0)
        PRE = pp[None, :] - pp[:, None] + np.where(last, lc.head_prefill_s, 0.0)
        dec, pre, o_host, o_nvme, feas = _stage_times(ctx, kind, W, KV, ACT, DEC, PRE, float(lc.weight_bytes.max()))
        if idx < len(fmts) - 1:  # only the least precise format may offload
            feas = feas & (o_host + o_nvme == 0)
        per_req = pre + (t.osl - 1 if latency else t.osl) * dec / (1 if latency else batch)
        T = np.where(valid & feas, per_req, np.inf)
        take = np.isinf(best_T) & np.isfinite(T)
        best_T = np.where(take, T, best_T)
        best_P = np.where(take, idx, best_P)
    np.fill_diagonal(best_T, 0.0)
    best_T[ii > jj] = np.inf
    return best_T, best_P


def _solve(ctx: _Ctx, groups: list[_Group], tps: list[int], conc: int, latency: bool,
           memo: dict[Any, Any]) -> tuple[float, list[tuple[int, int, int, int]]] | None:
    """Exact DP over stage boundaries on `groups` in order. Returns (objective, [(group, first, end, format)])."""
    L = ctx.model.layers
    used = len(groups)
    batch = max(1, math.ceil(conc / max(1, min(used, conc))))
    kinds = [ctx.kind(g.node, tp) for g, tp in zip(groups, tps)]
    f = np.full(L + 1, np.inf)
    f[0] = 0.0
    args: list[np.ndarray] = []
    comm = 0.0
    t = ctx.traffic
    h = ctx.model.hidden * 2
    for gi, kind in enumerate(kinds):
        key = (kind, conc, batch, latency)
        if key not in memo:
            memo[key] = _matrices(ctx, kind, conc, batch, latency)
        T, _ = memo[key]
        if latency:
            if gi:
                a, b = groups[gi - 1].devices[-1], groups[gi].devices[0]
                comm = ctx.transfer(a, b, t.isl * h) + (t.osl - 1) * ctx.transfer(a, b, h)
            ii, jj = np.arange(L + 1)[:, None], np.arange(L + 1)[None, :]
            M = f[:, None] + T + np.where((ii > 0) & (ii < jj), comm, 0.0)
        else:
            M = np.maximum(f[:, None], T)
        arg = M.argmin(axis=0)
        f = M[arg, np.arange(L + 1)]
        args.append(arg)
    if not np.isfinite(f[L]):
        return None
    out = []
    j = L
    for gi in range(len(kinds) - 1, -1, -1):
        i = int(args[gi][j])
        if i < j:
            _, P = memo[(kinds[gi], conc, batch, latency)]
            out.append((gi, i, j, int(P[i, j])))
        j = i
    out.reverse()
    return float(f[L]), out


# ------------------------------------------------------------------------------------ evaluation


def _stage_figures(ctx: _Ctx, st: Stage, conc: float, batch: int) -> dict[str, Any]:
    """Memory and seconds of one stage at `conc` sequences in flight and decode micro-batch `batch` (memoised:
    the same layers on the same kind of group recur across the planner's candidates)."""
    kind = ctx.kind(ctx.node(st.devices[0]), st.tp)
    key = ("stage", kind.spec.model, kind.tp, kind.devices, st.layers, st.precision, st.layer_precisions,
           st.offload.weights, round(conc, 6), batch)
    hit = ctx.memo.get(key)
    if hit is None:
        hit = ctx.memo[key] = _stage_figures_uncached(ctx, st, kind, conc, batch)
    return hit  # type: ignore[no-any-return]


def _stage_figures_uncached(ctx: _Ctx, st: Stage, kind: GroupKind, conc: float, batch: int) -> dict[str, Any]:
    L = ctx.model.layers
    a, b = st.first, st.last + 1
    W = KV = DEC = PRE = 0.0
    maxw = 0.0
    ends = ctx.costs(kind, st.precision, batch)
    if not st.layer_precisions or len(set(st.layer_precisions)) == 1:
        lc = ends if not st.layer_precisions or st.layer_precisions[0] == st.precision else \
            ctx.costs(kind, st.layer_precisions[0], batch)
        pw, pkv, pd_, pp, maxw = lc.prefix_lists
        W, KV, DEC, PRE = pw[b] - pw[a], pkv[b] - pkv[a], pd_[b] - pd_[a], pp[b] - pp[a]
    else:
        for fmt in sorted(set(st.layer_precisions)):
            lc = ctx.costs(kind, fmt, batch)
            sel = np.array([p == fmt for p in st.layer_precisions])
            W += float(lc.weight_bytes[a:b][sel].sum())
            KV += float(lc.kv_bytes_per_token[a:b][sel].sum())
            DEC += float(lc.decode_s[a:b][sel].sum())
            PRE += float(lc.prefill_s[a:b][sel].sum())
            maxw = max(maxw, float(lc.weight_bytes.max()))
    if a == 0:
        W += ends.embed_bytes
    if b == L:
        W += ends.head_bytes
        DEC += ends.head_decode_s
        PRE += ends.head_prefill_s
    kv = conc * (ctx.traffic.isl + ctx.traffic.osl) * KV
    act = activation_bytes(ctx.model, st.tp, ctx.opts.chunk_tokens, batch, b == L)
    dec, pre, o_host, o_nvme, feas = _stage_times_scalar(ctx, kind, W, kv, act, DEC, PRE, maxw)
    given = st.offload.weights * W  # a hand-written placement may offload more than needed
    if given > float(o_host + o_nvme):
        host, nvme, hb, nb = ctx.offload_room(kind)
        o_host = min(given, host)
        o_nvme = given - o_host
        s = o_host / hb + o_nvme / nb
        dec, pre = max(float(dec), s), max(float(pre), s * max(ctx.traffic.isl / ctx.opts.chunk_tokens, 1.0))
        feas = bool(feas) and given <= host + nvme
    buffer = maxw * (o_host + o_nvme) / W if W else 0.0  # the next layer's offloaded share, fetched ahead
    return {"kind": kind, "weights": W, "kv": kv, "act": act + buffer, "workspace": _params()["workspace_GiB"] * GiB,
            "capacity": kind.spec.memory_GB * 1e9, "usable": ctx.capacity(kind), "host": float(o_host),
            "nvme": float(o_nvme), "decode_s": float(dec), "prefill_s": float(pre), "fits": bool(feas)}


def _replica_metrics(ctx: _Ctx, rep: Replica, conc: float, rate: float) -> dict[str, Any]:
    """Closed-form serving figures of one pipeline at `conc` requests in flight (or `rate` req/s), memoised."""
    fast = ("rep-id", id(rep.stages), round(conc, 6), round(rate, 9))
    hit = ctx.memo.get(fast)
    if hit is not None and hit[0] is rep.stages:
        return hit[1]  # type: ignore[no-any-return]
    out = _replica_metrics_sig(ctx, rep, conc, rate)
    ctx.memo[fast] = (rep.stages, out)  # keeps the stages alive, so the id stays theirs
    return out


def _replica_metrics_sig(ctx: _Ctx, rep: Replica, conc: float, rate: float) -> dict[str, Any]:
    c = ctx.cluster
    # node identity does not matter; the node's kind and whether the next stage shares the node do
    nd = ctx.node
    sig = tuple((c.nodes[nd(st.devices[0])], st.tp, st.layers, st.precision, st.layer_precisions, st.offload.weights,
                 k + 1 < len(rep.stages) and nd(rep.stages[k + 1].devices[0]) == nd(st.devices[-1]))
                for k, st in enumerate(rep.stages))
    key = ("rep", sig, round(conc, 6), round(rate, 9))
    hit = ctx.memo.get(key)
    if hit is None:
        hit = ctx.memo[key] = _replica_metrics_uncached(ctx, rep, conc, rate)
    return hit  # type: ignore[no-any-return]


def _pipeline(ctx: _Ctx, rep: Replica, conc: float) -> dict[str, Any]:
    """Per-stage decode/prefill seconds (sends to the next stage included) with `conc` sequences in flight,
    split into min(stages, conc) micro-batches."""
    t = ctx.traffic
    S = len(rep.stages)
    nb = max(1, min(S, math.ceil(conc)))
    batch = max(1, math.ceil(conc / nb))
    figs = [_stage_figures(ctx, st, max(conc, 1.0), batch) for st in rep.stages]
    h = ctx.model.hidden * 2
    dec, pre = [], []
    for k, (st, fg) in enumerate(zip(rep.stages, figs)):
        send_d = send_p = 0.0
        if k + 1 < S:
            a, b = st.devices[-1], rep.stages[k + 1].devices[0]
            send_d = ctx.transfer(a, b, batch * h)
            send_p = ctx.transfer(a, b, t.isl * h)
        dec.append(fg["decode_s"] + send_d)
        pre.append(fg["prefill_s"] + send_p)
    busy = [p + t.osl * d / batch for p, d in zip(pre, dec)]
    return {"figs": figs, "fits": all(fg["fits"] for fg in figs), "batch": batch, "decode_s": dec, "prefill_s": pre,
            "busy": max(busy), "x_cap": 1.0 / max(busy), "cycle": max(sum(dec), nb * max(dec)), "ttft0": sum(pre)}


def _closed(ctx: _Ctx, rep: Replica, conc: float) -> dict[str, Any]:
    osl = ctx.traffic.osl
    p = _pipeline(ctx, rep, conc)
    e2e0 = p["ttft0"] + (osl - 1) * p["cycle"]
    x = min(p["x_cap"], conc / e2e0) if conc > 0 else 0.0
    stretch = (conc / x) / e2e0 if x > 0 else 1.0
    return {**p, "x": x, "ttft": p["ttft0"] * stretch, "tpot": p["cycle"] * stretch, "in_flight": conc}


def _replica_metrics_uncached(ctx: _Ctx, rep: Replica, conc: float, rate: float) -> dict[str, Any]:
    """Closed loop: throughput = min(capacity, conc / E2E of an unloaded pipeline) (asymptotic bounds);
    the excess latency stretches TTFT and TPOT alike. Open loop at `rate`: the closed loop with the
    fewest sequences in flight whose throughput reaches the rate (Little's law: n = rate × E2E);
    overloaded (infinite latency) when no n that fits in memory reaches it."""
    if rate <= 0:
        return _closed(ctx, rep, conc)
    lo, hi = 0.0, 1.0
    p = _closed(ctx, rep, hi)
    last = p
    while p["x"] < rate:
        if not p["fits"] or hi >= 1 << 16:  # overloaded: the most it can carry, at unbounded latency
            return {**last, "x": last["x"], "ttft": math.inf, "tpot": math.inf}
        last = p
        lo, hi = hi, hi * 2
        p = _closed(ctx, rep, hi)
    for _ in range(10):  # bisection on the sequences in flight
        mid = (lo + hi) / 2
        q = _closed(ctx, rep, mid)
        if q["x"] >= rate and q["fits"]:
            hi, p = mid, q
        else:
            lo = mid
    return {**p, "x": rate}


def evaluate(cluster: Any, model: Any, placement: Placement, traffic: Any = None, options: Options | None = None,
             slo: Any = None) -> dict[str, Any]:
    """Predicted serving figures of any placement (the planner's, a baseline, or a hand-written one):
    `output_throughput` (tokens/s), `mean_ttft_ms`, `mean_tpot_ms`, `mean_e2el_ms`, `request_throughput`,
    cost, `fits`, plus `stages` and `devices` rows with memory per device against capacity."""
    from workbench.models.presets import load_model
    from workbench.topology.presets import load_cluster

    c, m = load_cluster(cluster), load_model(model)
    ctx = _Ctx(c, m, parse_traffic(traffic), options or Options())
    placement.validate(c)
    if placement.num_layers != m.layers:
        raise WorkbenchError(f"placement.num_layers: {placement.num_layers} but model {m.name} has {m.layers} layers")
    return _evaluate(ctx, placement, parse_slo(slo))


def _evaluate(ctx: _Ctx, pl: Placement, slo: SLO, rows: bool = True) -> dict[str, Any]:
    return _evaluate_replicas(ctx, pl.replicas, slo, rows)


def _evaluate_replicas(ctx: _Ctx, replicas: tuple[Replica, ...], slo: SLO, rows: bool = True) -> dict[str, Any]:
    t = ctx.traffic
    tot = sum(r.weight for r in replicas)
    w = [r.weight / tot for r in replicas]
    reps = []
    for rep, share in zip(replicas, w):
        conc = t.concurrency * share
        reps.append(_replica_metrics(ctx, rep, conc, t.rate * share) if share > 0 else None)
    live = [(r, s) for r, s in zip(reps, w) if r is not None]
    x = sum(r["x"] for r, _ in live)
    ttft = sum(r["x"] * r["ttft"] for r, _ in live) / x if x > 0 else math.inf
    tpot = sum(r["x"] * r["tpot"] for r, _ in live) / x if x > 0 else math.inf
    fits = all(r["fits"] for r, _ in live)
    stages: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    used_price = 0.0
    index = 0
    for ri, (rep, r) in enumerate(zip(replicas, reps)):
        for k, st in enumerate(rep.stages):
            index += 1
            if r is None:
                continue
            fg = r["figs"][k]
            used_price += ctx.opts.price(fg["kind"].spec.model) * st.tp
            if rows:
                _rows(stages, devices, index - 1, ri, k, st, r, fg)
    out_tps = x * t.osl
    pred = {"output_throughput": out_tps, "request_throughput": x, "total_token_throughput": x * (t.isl + t.osl),
            "mean_ttft_ms": ttft * 1e3, "mean_tpot_ms": tpot * 1e3, "mean_e2el_ms": (ttft + (t.osl - 1) * tpot) * 1e3,
            "gpus_used": sum(st.tp for rep, r in zip(replicas, reps) if r is not None for st in rep.stages),
            "usd_per_hour": used_price,
            "usd_per_Mtok": used_price / (out_tps * 3600) * 1e6 if out_tps > 0 else math.inf,
            "capacity_output_throughput": sum(r["x_cap"] for r, _ in live) * t.osl,
            "overloaded": t.rate > 0 and not math.isfinite(ttft),
            "fits": fits, "fidelity": FIDELITY,
            "replicas": [{"weight": s, "output_throughput": (r["x"] * t.osl) if r else 0.0,
                          "capacity_output_throughput": (r["x_cap"] * t.osl) if r else 0.0,
                          "decode_batch": r["batch"] if r else 0} for r, s in zip(reps, w)]}
    pred["slo_met"] = slo.met(pred)
    return {"predicted": pred, "stages": stages, "devices": devices}


def _rows(stages: list[dict[str, Any]], devices: list[dict[str, Any]], index: int, ri: int, k: int, st: Stage,
          r: Mapping[str, Any], fg: Mapping[str, Any]) -> None:
    off = (fg["host"] + fg["nvme"]) / fg["weights"] if fg["weights"] else 0.0
    stages.append({"stage": index, "replica": ri, "devices": list(st.devices),
                   "gpu": fg["kind"].spec.model, "layers": [st.first, st.last], "tp": st.tp,
                   "precision": st.precision, "kv_precision": st.kv_precision,
                   "offload_weights": round(off, 4), "decode_step_ms": r["decode_s"][k] * 1e3,
                   "prefill_ms": r["prefill_s"][k] * 1e3, "fits": fg["fits"]})
    for d in st.devices:
        used = fg["weights"] - fg["host"] - fg["nvme"] + fg["kv"] + fg["act"] + fg["workspace"]
        devices.append({"device": d, "gpu": fg["kind"].spec.model, "stage": index,
                        "memory_GiB": used / GiB, "capacity_GiB": fg["capacity"] / GiB,
                        "usable_GiB": fg["usable"] / GiB + fg["workspace"] / GiB,
                        "weights_GiB": (fg["weights"] - fg["host"] - fg["nvme"]) / GiB, "kv_GiB": fg["kv"] / GiB,
                        "activations_GiB": fg["act"] / GiB, "workspace_GiB": fg["workspace"] / GiB,
                        "host_offload_GiB": fg["host"] / GiB, "nvme_offload_GiB": fg["nvme"] / GiB,
                        "fits": fg["fits"]})


# ------------------------------------------------------------------------------------ baselines


def _tp1_groups(c: Cluster) -> list[_Group]:
    return [_Group(i, (f"n{i}.g{j}",)) for i, n in enumerate(c.nodes) for j in range(n.gpus)]


def _split_counts(weights: list[float], total: int) -> list[int]:
    """Largest-remainder split of `total` layers in proportion to `weights`."""
    s = sum(weights)
    raw = [total * w / s for w in weights]
    out = [int(r) for r in raw]
    for k in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[k] += 1
    return out


def _fixed_split(ctx: _Ctx, counts: list[int], note: str) -> Placement:
    groups = _tp1_groups(ctx.cluster)
    stages, a = [], 0
    conc = ctx.traffic.concurrency
    for g, n in zip(groups, counts):
        if n == 0:
            continue
        kind = ctx.kind(g.node, 1)
        fmts = ctx.formats(kind)
        if not fmts:
            raise WorkbenchError(f"precisions: {kind.spec.model} supports none of {', '.join(ctx.opts.precisions)}")
        st = Stage(g.devices, (a, a + n - 1), fmts[0], ctx.kv_format(kind))
        for fmt in fmts:  # the same rule as the planner: the first format that fits, else offload
            st = replace(st, precision=fmt)
            fg = _stage_figures(ctx, st, conc, max(1, math.ceil(conc / len(groups))))
            if fg["host"] + fg["nvme"] == 0:
                break
        stages.append(st)
        a += n
    return Placement(ctx.model.name, ctx.model.layers, (Replica(tuple(stages)),), notes=note)


def baseline_uniform(ctx: _Ctx) -> Placement:
    """Every GPU one stage (tp=1), layers split as evenly as whole layers allow, in cluster order."""
    n = ctx.cluster.num_gpus
    return _fixed_split(ctx, _split_counts([1.0] * n, ctx.model.layers), "baseline: uniform split over every GPU")


def baseline_memory(ctx: _Ctx) -> Placement:
    """Every GPU one stage (tp=1), layers in proportion to each GPU's memory."""
    caps = [ctx.cluster.nodes[g.node].gpu_spec.memory_GB for g in _tp1_groups(ctx.cluster)]
    return _fixed_split(ctx, _split_counts(caps, ctx.model.layers), "baseline: split proportional to GPU memory")


# ------------------------------------------------------------------------------------ the search


@dataclass
class PlaceResult:
    """The planner's answer: the placement, its predicted figures, per-stage and per-device rows,
    the two baselines, and how the search went (candidates, optimality bound, seconds)."""

    placement: Placement
    predicted: dict[str, Any]
    stages: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    baselines: dict[str, dict[str, Any]]
    search: dict[str, Any]
    planner_seconds: float
    objective: str
    traffic: Traffic
    slo: SLO
    simulated: dict[str, Any] | None = None  # the serving simulator's figures (place(..., simulate=True))

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        gains = {}
        for name, b in self.baselines.items():
            bt = b.get("output_throughput") or 0.0
            gains[name] = (self.predicted["output_throughput"] / bt) if bt and b.get("fits") else None
        return clean({"objective": self.objective, "model": self.placement.model, "traffic": self.traffic.to_dict(),
                      "slo": self.slo.to_dict(), "stages": self.stages, "devices": self.devices,
                      "predicted": self.predicted, "baselines": self.baselines, "throughput_gain": gains,
                      "search": self.search, "planner_seconds": self.planner_seconds,
                      **({"simulated": self.simulated} if self.simulated is not None else {}),
                      "placement": self.placement.to_dict()})

    def devices_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.devices)

    def stages_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.stages)

    def comparison(self) -> Any:
        """Planner vs baselines: one row each with the predicted figures (a DataFrame)."""
        import pandas as pd

        keys = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "gpus_used", "usd_per_Mtok", "fits")
        rows = [{"placement": "planner", **{k: self.predicted.get(k) for k in keys}}]
        rows += [{"placement": n, **{k: b.get(k) for k in keys}} for n, b in self.baselines.items()]
        return pd.DataFrame(rows)

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        from workbench.display import repr_mimebundle

        p = self.predicted
        rows = [("objective", self.objective), ("placement", repr(self.placement)),
                ("output throughput", f"{p['output_throughput']:.1f} tok/s"),
                ("mean TTFT / TPOT", f"{p['mean_ttft_ms']:.1f} / {p['mean_tpot_ms']:.2f} ms"),
                *[(f"baseline {n}", f"{b.get('output_throughput', 0) or 0:.1f} tok/s") for n, b in self.baselines.items()],
                ("candidates", self.search["candidates"]), ("gap vs fluid bound", f"{self.search['gap']:.1%}"),
                ("planner seconds", f"{self.planner_seconds:.3f}")]
        return repr_mimebundle("PlaceResult", rows, text=f"PlaceResult({self.objective}: {self.placement!r}, "
                               f"{p['output_throughput']:.1f} tok/s)")


def _tp_choices(ctx: _Ctx, node: int) -> list[int]:
    n = ctx.cluster.nodes[node]
    m = ctx.model
    return [t for t in (1, 2, 4, 8) if t <= n.gpus and n.gpus % t == 0 and m.heads % t == 0]


def _replica_nodes(ctx: _Ctx, nodes: list[int], R: int, order: list[tuple[Any, ...]]) -> list[list[int]]:
    """Nodes dealt round-robin to R replicas, kind by kind in `order`, so replicas are as alike as possible."""
    key = {k: i for i, k in enumerate(order)}

    def kind_of(i: int) -> tuple[Any, ...]:
        n = ctx.cluster.nodes[i]
        return (n.gpu, n.gpus, n.intra)

    ordered = sorted(nodes, key=lambda i: (key[kind_of(i)], i))
    reps: list[list[int]] = [[] for _ in range(R)]
    for k, i in enumerate(ordered):
        reps[k % R].append(i)
    return reps


def _layouts(ctx: _Ctx, nodes: list[int], orders: list[list[Any]], max_r: int,
             kind_of: Mapping[int, Any]) -> list[list[list[int]]]:
    """Ways to cut the nodes into replicas: R mixed replicas (kinds dealt round-robin, for each kind
    order), and segregated ones (each kind split into its own R_k replicas, for every R_k)."""
    out: list[list[list[int]]] = []
    for order in orders:
        for R in range(1, min(max_r, len(nodes)) + 1):
            out.append(_replica_nodes(ctx, nodes, R, order))
    by_kind: dict[Any, list[int]] = {}
    for i in nodes:
        by_kind.setdefault(kind_of[i], []).append(i)
    if len(by_kind) > 1:
        for counts in product(*[range(1, len(v) + 1) for v in by_kind.values()]):
            if sum(counts) > max_r:
                continue
            layout: list[list[int]] = []
            for ids, r in zip(by_kind.values(), counts):
                layout += [ids[k::r] for k in range(r)]
            out.append(layout)
    return out


def _upper_bound(ctx: _Ctx) -> float:
    """Fluid bound on output tokens/s: every GPU serving its own share at tp=1 at the full batch, in its
    fastest allowed format, without memory, offload or network limits."""
    t = ctx.traffic
    total = 0.0
    for i, n in enumerate(ctx.cluster.nodes):
        kind = ctx.kind(i, 1)
        best = math.inf
        for fmt in ctx.formats(kind):
            lc = ctx.costs(kind, fmt, t.concurrency)
            w = float(lc.prefill_s.sum() + lc.head_prefill_s) + t.osl * float(lc.decode_s.sum() + lc.head_decode_s) / t.concurrency
            best = min(best, w)
        if math.isfinite(best):
            total += n.gpus / best
    return total * t.osl


def place(cluster: Any, model: Any, objective: str = "throughput", traffic: Any = None, slo: Any = None,
          options: Options | None = None, simulate: bool = False, **option_fields: Any) -> PlaceResult:
    """Plan a placement of `model` on `cluster` for `objective` (throughput | latency | cost) under `slo`.
    `simulate`: also run the chosen placement and both baselines through the serving simulator
    (`crosscheck`; seconds, not counted in `planner_seconds`)."""
    from workbench.models.presets import load_model
    from workbench.topology.presets import load_cluster
    from workbench.topology.spec import to_dict as cluster_dict

    t0, c0 = time.perf_counter(), time.process_time()
    if objective not in OBJECTIVES:
        raise WorkbenchError(f"objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
    c, m = load_cluster(cluster), load_model(model)
    opts = options or Options()
    if option_fields:
        opts = replace(opts, **option_fields)
    tr, sl = parse_traffic(traffic), parse_slo(slo)
    ctx = _Ctx(c, m, tr, opts)
    latency = objective == "latency"
    kinds: list[tuple[Any, ...]] = []
    for n in c.nodes:
        k = (n.gpu, n.gpus, n.intra)
        if k not in kinds:
            kinds.append(k)
    node_ids = list(range(len(c.nodes)))
    first_node = {k: next(i for i in node_ids if (c.nodes[i].gpu, c.nodes[i].gpus, c.nodes[i].intra) == k) for k in kinds}
    tp_sets = [_tp_choices(ctx, first_node[k]) for k in kinds]
    orders = [sorted(kinds, key=lambda k: -c.nodes[first_node[k]].gpu_spec.memory_GB)]
    if len(kinds) > 1:
        orders.append(list(reversed(orders[0])))
    subsets: list[tuple[Any, ...]] = [tuple(kinds)]
    if objective == "cost" and len(kinds) > 1:
        from itertools import combinations

        subsets += [s for r in range(1, len(kinds)) for s in combinations(kinds, r)]
    max_r = opts.max_replicas or c.num_gpus
    memo: dict[Any, Any] = {}
    solved: dict[Any, Any] = {}
    built: dict[Any, Any] = {}  # (nodes, TP per group, concurrency) -> the replica's stages (or None: cannot fit)
    best: tuple[float, tuple[Replica, ...], dict[str, Any]] | None = None
    candidates = feasible = 0
    kind_of = {i: (c.nodes[i].gpu, c.nodes[i].gpus, c.nodes[i].intra) for i in node_ids}
    mem_of = {i: c.nodes[i].gpus * c.nodes[i].gpu_spec.memory_GB for i in node_ids}
    seen: set[Any] = set()
    for subset in subsets:
        nodes = [i for i in node_ids if kind_of[i] in subset]
        tot_mem = sum(mem_of[i] for i in nodes)
        for tps in product(*[tp_sets[kinds.index(k)] for k in subset]):
            tp_of = dict(zip(subset, tps))
            layouts: list[list[list[tuple[int, int]]]] = [
                [[(i, -1) for i in rn] for rn in lay]
                for lay in _layouts(ctx, nodes, [[k for k in o if k in subset] for o in orders], max_r, kind_of)]
            # every TP group its own replica (replicas inside a node), when a node holds several groups
            per_group = [[(i, s0)] for i in nodes for s0 in range(0, c.nodes[i].gpus, tp_of[kind_of[i]])]
            if len(nodes) < len(per_group) <= max_r:
                layouts.append(per_group)
            for layout in layouts:
                key = tuple(sorted(tuple(rn) for rn in layout)), tps  # replica order does not matter
                if key in seen:
                    continue
                seen.add(key)
                replicas = []
                speeds: list[float] = []
                for rn in layout:
                    groups, gtp = [], []
                    share = 0.0
                    for i, start in rn:  # start -1: every TP group of node i; else the one group at `start`
                        tp = tp_of[kind_of[i]]
                        for s0 in (range(0, c.nodes[i].gpus, tp) if start < 0 else (start,)):
                            groups.append(_Group(i, tuple(f"n{i}.g{j}" for j in range(s0, s0 + tp))))
                            gtp.append(tp)
                            share += mem_of[i] * tp / c.nodes[i].gpus / tot_mem
                    conc = max(1, math.ceil(tr.concurrency * share))
                    candidates += 1
                    rkey = (tuple(rn), tuple(gtp), conc)
                    if rkey not in built:
                        sig = (tuple((kind_of[g.node], tp) for g, tp in zip(groups, gtp)), conc, latency,
                               tuple(g.node != groups[k - 1].node for k, g in enumerate(groups)))
                        if sig not in solved:
                            solved[sig] = _solve(ctx, groups, gtp, conc, latency, memo)
                        res = solved[sig]
                        stages: tuple[Stage, ...] | None = None
                        if res is not None:
                            stages = tuple(Stage(groups[gi].devices, (a, b - 1),
                                                 ctx.formats(ctx.kind(groups[gi].node, gtp[gi]))[fi],
                                                 ctx.kv_format(ctx.kind(groups[gi].node, gtp[gi])))
                                           for gi, a, b, fi in res[1])
                        built[rkey] = (stages, 1.0 / res[0] if res is not None and res[0] > 0 else 0.0)
                    stages, speed = built[rkey]
                    if stages is None:
                        break
                    replicas.append(Replica(stages, share))
                    speeds.append(speed)
                else:
                    # route requests in proportion to each replica's speed as its DP measured it (requests/s of
                    # its bottleneck stage); by memory share if that overflows a replica's memory
                    routed = tuple(Replica(r.stages, sp / sum(speeds)) for r, sp in zip(replicas, speeds)) \
                        if sum(speeds) > 0 else tuple(replicas)
                    ev = _evaluate_replicas(ctx, routed, sl, rows=False)
                    if not ev["predicted"]["fits"]:
                        routed = tuple(replicas)
                        ev = _evaluate_replicas(ctx, routed, sl, rows=False)
                    p = ev["predicted"]
                    if not p["fits"]:
                        continue
                    feasible += 1
                    score = _score(objective, p, sl, tr.rate > 0)
                    if best is None or score < best[0]:
                        best = (score, routed, ev)
    if best is None:
        raise WorkbenchError(_no_fit_message(ctx))
    pl = Placement(m.name, m.layers, best[1])
    ev = _evaluate(ctx, pl, sl)
    pl = _with_offload(ctx, pl, ev)
    pl = replace(pl, cluster=cluster_dict(c), notes=f"workbench plan place --objective {objective}")
    baselines = {}
    for name, fn in (("uniform", baseline_uniform), ("memory_proportional", baseline_memory)):
        try:
            bp = fn(ctx)
            bev = _evaluate(ctx, bp, sl)
            baselines[name] = {k: v for k, v in bev["predicted"].items() if k != "replicas"}
            baselines[name]["stages"] = len(bp.stages)
            baselines[name]["max_memory_fraction"] = max(d["memory_GiB"] / d["capacity_GiB"] for d in bev["devices"])
        except WorkbenchError as exc:
            baselines[name] = {"error": str(exc), "fits": False}
    ub = _upper_bound(ctx)
    got = ev["predicted"]["output_throughput"]
    search = {"method": "exhaustive over TP per node kind x replicas x kind order; exact DP over stage boundaries "
                        f"({'sum' if latency else 'bottleneck'} objective) per candidate",
              "candidates": candidates, "feasible": feasible, "dp_solves": len(solved),
              "upper_bound_output_throughput": ub, "gap": max(0.0, 1.0 - got / ub) if ub > 0 else 0.0}
    secs = time.perf_counter() - t0
    search["planner_cpu_seconds"] = time.process_time() - c0
    simulated = None
    if simulate:
        simulated = {"planner": crosscheck(c, m, pl, tr)}
        for name, fn in (("uniform", baseline_uniform), ("memory_proportional", baseline_memory)):
            try:
                simulated[name] = crosscheck(c, m, fn(ctx), tr)
            except WorkbenchError as exc:
                simulated[name] = {"error": str(exc)}
    return PlaceResult(pl, ev["predicted"], ev["stages"], ev["devices"], baselines, search, secs, objective, tr, sl,
                       simulated)


def _score(objective: str, p: Mapping[str, Any], slo: SLO, open_loop: bool = False) -> float:
    penalty = 0.0 if slo.met(p) else 1e12  # candidates that miss the SLO rank after every one that meets it
    if p.get("overloaded"):
        penalty += 1e12
    if objective == "throughput" and not open_loop:
        return penalty - p["output_throughput"]
    if objective in ("throughput", "latency"):  # open loop: every stable candidate serves the rate; the faster wins
        return penalty + p["mean_e2el_ms"]
    return penalty + p["usd_per_Mtok"]


def _with_offload(ctx: _Ctx, pl: Placement, ev: Mapping[str, Any]) -> Placement:
    """Record in the placement what each stage keeps in host memory or on NVMe."""
    by = {s["stage"]: s for s in ev["stages"]}
    devs = {d["stage"]: d for d in ev["devices"]}
    reps = []
    k = 0
    for rep in pl.replicas:
        sts = []
        for st in rep.stages:
            s = by.get(k)
            if s and s["offload_weights"] > 0:
                d = devs[k]
                tier = "nvme" if d["nvme_offload_GiB"] > 0 else "host"
                st = replace(st, offload=Offload(weights=min(1.0, s["offload_weights"]), tier=tier))
            sts.append(st)
            k += 1
        reps.append(Replica(tuple(sts), rep.weight))
    return replace(pl, replicas=tuple(reps))


def _no_fit_message(ctx: _Ctx) -> str:
    from workbench.models.costs import parameter_count

    c, m = ctx.cluster, ctx.model
    pc = parameter_count(m)
    gpu = sum(n.gpus * n.gpu_spec.memory_GB for n in c.nodes) * _params()["gpu_memory_utilization"]
    host = sum((ctx.opts.host_GB or _params()["host_memory_GB"]) * _params()["host_memory_usable"]
               + (ctx.opts.nvme_GB or _params()["nvme_GB"]) for _ in c.nodes) if ctx.opts.offload else 0.0
    need = pc.total * min(_bytes(p) for p in ctx.opts.precisions) / 1e9
    return (f"model: {m.name} ({pc.total / 1e9:.0f} B parameters, ≥ {need:.0f} GB in {', '.join(ctx.opts.precisions)}) "
            f"does not fit on cluster {c.name} ({gpu:.0f} GB usable GPU memory"
            + (f", {host:.0f} GB host+NVMe for offload" if ctx.opts.offload else ", offload off")
            + f") with KV for {ctx.traffic.concurrency} x {ctx.traffic.isl + ctx.traffic.osl} tokens; "
            "allow a smaller format (--precisions fp8,int8), lower the concurrency, add host memory (--host-gb) "
            "or GPUs")


def _bytes(p: str) -> float:
    from workbench.plan.placement import bytes_per_element

    return bytes_per_element(p)


# ------------------------------------------------------------------------------------ cross-check


def crosscheck(cluster: Any, model: Any, placement: Placement, traffic: Any = None,
               requests_per_client: int = 8) -> dict[str, Any]:
    """The same placement through the request-level serving simulator (`workbench.sim.serve_placement`:
    continuous batching, paged KV, each stage priced on its own GPUs, the replica run at its bottleneck
    stage, sends on the links crossed, requests routed by the placement's weights). Returns the
    `vllm bench serve` figures, or `error` when the simulator cannot take the placement (it does not
    price offload, so a stage that offloads weights is refused there)."""
    from workbench.sim.serve_placement import simulate_placement

    tr = parse_traffic(traffic)
    n = max(64, min(4000, requests_per_client * max(tr.concurrency, 1) if tr.rate <= 0 else int(60 * tr.rate)))
    spec = (f"rate={tr.rate:g}" if tr.rate > 0 else f"concurrency={tr.concurrency}") + \
        f",isl={tr.isl},osl={tr.osl},requests={n}"
    out: dict[str, Any] = {"fidelity": "serving simulator (workbench.sim.serve_placement)", "traffic": spec}
    try:
        res = simulate_placement(cluster, model, placement, spec)
    except WorkbenchError as exc:
        return {**out, "error": str(exc), "output_throughput": None, "mean_ttft_ms": None, "mean_tpot_ms": None}
    for k in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms", "request_throughput",
              "completed", "sim_seconds"):
        if k in res.metrics:
            out[k] = float(res.metrics[k])
    return out
