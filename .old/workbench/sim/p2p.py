"""Point-to-point cost model: one-sided writes as a TransferEngine issues them.

A transfer from GPU `src` to GPU `dst` runs over *lanes*: across nodes, every NIC of the
source GPU (the write is split into `round_up(len/lanes, chunk)` shards sent round-robin,
paged writes split their page list); inside a node, the one NVLink/PCIe/loopback path.
Each lane carries `m` messages and `b` bytes and takes

    t_lane = (( m / op_rate )^p + ( b / (eff * bottleneck) )^p )^(1/p)

(the op-rate and bandwidth limits combined by a p-norm: p → ∞ is perfect overlap). A
transfer costs the host posting (`post_us_per_peer * peers`), the protocol's per-message
latency, the wire latency of the path, and the slowest lane; without GPUDirect a host
staging copy is added. All parameters come from `NetParams` (`datasets/net_params.csv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.sim.params import LINK_PROTOCOL, NetParams
from workbench.topology.model import Cluster

_NIC_KINDS = ("efa", "ib", "roce", "ethernet")


@dataclass(frozen=True)
class Lane:
    """One way bytes can go from `src` to `dst`: capacity (GB/s per direction, line rate) and wire latency."""

    GBps: float
    latency_us: float
    links: tuple[int, ...]


@dataclass(frozen=True)
class Route:
    """The lanes between two devices and the protocol that carries them."""

    src: str
    dst: str
    protocol: str
    lanes: tuple[Lane, ...]
    staged: bool  # no GPUDirect: bytes bounce through host memory

    @property
    def line_GBps(self) -> float:
        return sum(lane.GBps for lane in self.lanes)


@dataclass(frozen=True)
class TransferEstimate:
    """Closed-form cost of one write (or one batch of paged writes, or a scatter)."""

    seconds: float
    bytes: int
    messages: int  # work requests posted (shards of a single write, pages, one per peer for imm-only)
    lanes: int
    protocol: str
    Gbps: float
    ops_per_s: float
    fidelity: str = "closed-form"

    def as_dict(self) -> dict[str, object]:
        return {"seconds": self.seconds, "Gbps": self.Gbps, "ops_per_s": self.ops_per_s, "bytes": self.bytes,
                "messages": self.messages, "lanes": self.lanes, "protocol": self.protocol,
                "fidelity": self.fidelity}


def _cache(cluster: Cluster) -> dict:  # type: ignore[type-arg]
    g = cluster.graph
    c = g.__dict__.get("_sim_routes")
    if c is None:
        c = {}
        g.__dict__["_sim_routes"] = c
    return c


def route(cluster: Cluster, src: str, dst: str) -> Route:
    """Lanes and protocol from `src` to `dst` (cached on the cluster's graph)."""
    cache = _cache(cluster)
    key = (src, dst)
    r = cache.get(key)
    if r is not None:
        return r
    g = cluster.graph
    va, vb = g.vertex(src), g.vertex(dst)
    if src == dst:
        r = Route(src, dst, "loopback", (Lane(math.inf, 0.0, ()),), False)
    elif va.node == vb.node:
        p = cluster.path(src, dst)
        proto = LINK_PROTOCOL.get(p.links[0].kind, "pcie")
        r = Route(src, dst, proto, (Lane(p.bottleneck_GBps, p.latency_us, tuple(lk.index for lk in p.links)),), False)
    else:
        nics = g.nics_of(src)
        if not nics:
            raise WorkbenchError(f"src: {src} has no NIC, so it cannot reach {dst} on another node")
        lanes = []
        proto = "tcp"
        for lane in range(len(nics)):
            p = cluster.path(src, dst, lane=lane)
            lanes.append(Lane(p.bottleneck_GBps, p.latency_us, tuple(lk.index for lk in p.links)))
            for lk in p.links:
                if lk.kind in _NIC_KINDS:
                    proto = LINK_PROTOCOL[lk.kind]
        node = cluster.nodes[va.node]  # type: ignore[index]
        staged = not node.nic_spec.gpudirect and not node.gpu_spec.is_cpu
        r = Route(src, dst, proto, tuple(lanes), staged)
    cache[key] = r
    return r


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def _pnorm(a: float, b: float, p: float) -> float:
    if a <= 0.0:
        return b
    if b <= 0.0:
        return a
    hi = a if a > b else b
    lo = b if a > b else a
    return hi * (1.0 + (lo / hi) ** p) ** (1.0 / p)


def write(cluster: Cluster, src: str, dst: str, nbytes: int = 0, *, pages: int = 0, page_bytes: int = 0,
          peers: int = 1, params: NetParams | None = None, steady_state: bool = False,
          protocol: str | None = None) -> TransferEstimate:
    """Cost of one write from `src` to `dst` as a TransferEngine issues it.

    - `pages == 0` and `nbytes > 0`: a single contiguous write, sharded over the NICs;
    - `pages > 0`: paged writes of `page_bytes` each (the page list split across NICs);
    - `nbytes == 0` and `pages == 0`: an imm-only write (one message, no payload);
    - `peers > 1`: the same write scattered to `peers` peers (each gets the payload; routes
      like `dst`), paying the host posting cost per peer.
    `steady_state` leaves out fixed costs (posting, latency): the rate of a long pipelined stream.
    `protocol` prices the route's lanes with another protocol's parameters than the link's own, e.g.
    `cuda_ipc` (`cuda_ipc-local` within one GPU) for the transport's CUDA IPC backend as measured, `tcp-engine`
    for its tcp backend.
    """
    if nbytes < 0 or pages < 0 or page_bytes < 0:
        raise WorkbenchError("bytes: sizes and page counts must not be negative")
    if pages and page_bytes <= 0:
        raise WorkbenchError("page_size: paged writes need a page size > 0 (e.g. --page-size 8KiB)")
    if peers < 1:
        raise WorkbenchError(f"peers: must be at least 1, got {peers}")
    params = params or NetParams.default()
    r = route(cluster, src, dst)
    proto = protocol or r.protocol
    pp = params.protocol(proto)
    k = len(r.lanes)
    if pages:
        total = pages * page_bytes
        base, extra = divmod(pages, k)
        per_lane = [((base + (1 if i < extra else 0)) * peers, (base + (1 if i < extra else 0)) * page_bytes * peers)
                    for i in range(k)]
        messages = pages * peers
    elif nbytes:
        total = nbytes
        chunk = max(pp.chunk_bytes, 1)
        shard = _round_up(_ceil_div(nbytes, k), chunk)  # TransferEngine: round_up(len / shards, 8 KiB)
        nshards = _ceil_div(nbytes, shard)
        per_lane = []
        left = nbytes
        for i in range(k):
            m = len(range(i, nshards, k))
            b = min(left, m * shard)
            left -= b
            per_lane.append((m * peers, b * peers))
        messages = nshards * peers
    else:
        total = 0
        per_lane = [(peers, 0)] + [(0, 0)] * (k - 1)
        messages = peers
    op_s = 1.0 / (pp.op_rate_M * 1e6)
    eff = pp.bw_efficiency
    worst = 0.0
    wire = 0.0
    for lane, (m, b) in zip(r.lanes, per_lane):
        if m == 0 and b == 0:
            continue
        bw = lane.GBps * eff * 1e9
        if r.staged:
            bw = min(bw, pp.staging_GBps * 1e9)
        t = _pnorm(m * op_s, b / bw if bw > 0 and b else 0.0, pp.overlap_p)
        worst = max(worst, t)
        wire = max(wire, lane.latency_us)
    seconds = worst
    if not steady_state:
        seconds += (pp.latency_us + wire + pp.post_us_per_peer * peers) * 1e-6
        if r.staged and total:
            seconds += min(total, pp.chunk_bytes) / (pp.staging_GBps * 1e9)
    moved = total * peers
    ops = (pages or 1) * peers  # user-level operations: writes, pages, or imm-only writes
    return TransferEstimate(
        seconds=seconds, bytes=moved, messages=messages, lanes=k, protocol=proto,
        Gbps=moved * 8 / seconds / 1e9 if seconds > 0 else 0.0,
        ops_per_s=ops / seconds if seconds > 0 else 0.0,
    )


def transfer_seconds(cluster: Cluster, src: str, dst: str, nbytes: int, params: NetParams | None = None) -> float:
    """Seconds for one GPU→GPU transfer of `nbytes` (e.g. a pipeline-parallel send)."""
    if nbytes <= 0 or src == dst:
        return 0.0
    return write(cluster, src, dst, int(nbytes), params=params).seconds


def post_seconds(protocol: str, peers: int, params: NetParams | None = None) -> float:
    """Host-side cost of posting one write to each of `peers` peers."""
    return (params or NetParams.default()).protocol(protocol).post_us_per_peer * peers * 1e-6
