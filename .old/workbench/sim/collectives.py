"""Closed-form collective costs on a cluster, with algorithm selection as NCCL does it.

A group of ranks is reduced once (cached on the cluster's graph) to a `GroupShape`: how
many nodes, ranks per node, the intra-node path (NVLink/NVSwitch, PCIe or loopback), the
NICs the group owns per node and per rank, and whether NVLink SHARP (NVLS) is available.
Each algorithm × protocol then costs

    seconds = latency(algo, proto, steps) + bytes_on_the_bottleneck / (rate * protocol efficiency)

with NCCL's own latency table (`datasets/nccl_tuning.csv`) and bandwidth efficiencies from
`datasets/net_params.csv`; without `algo` the cheapest candidate wins, as NCCL's tuner
picks. algbw = size / seconds and busbw = algbw × nccl-tests' factor (2(n−1)/n for
all-reduce, (n−1)/n for all-gather, reduce-scatter, all-to-all, 1 otherwise).

CPU-rank clusters (gloo over loopback) use the same ring/direct formulas with the path's
bottleneck and latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from workbench.errors import WorkbenchError
from workbench.sim.params import LINK_PROTOCOL, NetParams
from workbench.topology.model import Cluster

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")
ALGOS = {
    "all_reduce": ("ring", "tree", "nvls", "nvls_tree", "hier"),
    "all_gather": ("ring", "hier"),
    "reduce_scatter": ("ring", "hier"),
    "all_to_all": ("direct", "hier"),
    "broadcast": ("ring",),
    "send_recv": ("direct",),
}
AUTO = {  # what NCCL's tuner chooses among (hier / hier all-to-all only when forced)
    "all_reduce": ("ring", "tree", "nvls", "nvls_tree"),
    "all_gather": ("ring",),
    "reduce_scatter": ("ring",),
    "all_to_all": ("direct",),
    "broadcast": ("ring",),
    "send_recv": ("direct",),
}
PROTOS = ("ll", "ll128", "simple")


@dataclass(frozen=True)
class CollectiveEstimate:
    """One collective's cost; `bytes` is nccl-tests' "size", GB/s are 1e9 bytes per second."""

    op: str
    bytes: int
    ranks: int
    algo: str
    seconds: float
    algbw_GBps: float
    busbw_GBps: float
    fidelity: str
    proto: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"op": self.op, "bytes": self.bytes, "ranks": self.ranks, "algo": self.algo, "proto": self.proto,
                "seconds": self.seconds, "algbw_GBps": self.algbw_GBps, "busbw_GBps": self.busbw_GBps,
                "fidelity": self.fidelity}


def bus_factor(op: str, n: int) -> float:
    """nccl-tests' busbw / algbw factor."""
    if n <= 1:
        return 1.0 if op in ("broadcast", "send_recv") else 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return 1.0


@dataclass(frozen=True)
class GroupShape:
    """What a group of ranks has to work with (GB/s are line rates per direction)."""

    ranks: tuple[str, ...]
    n: int
    nodes: int
    per_node: int
    intra_GBps: float  # per rank, between two group members of one node
    intra_latency_us: float
    intra_protocol: str  # nvlink | pcie | loopback
    nvls: bool
    node_nic_GBps: float  # min over nodes of the line rate of the NICs the group's ranks use there
    rank_nic_GBps: float  # min over ranks of the rank's own share of NIC line rate
    net_protocol: str
    net_latency_us: float
    lanes: int  # NICs per rank
    cpu: bool
    leaf_cap: float  # 1 / oversubscription when the group crosses leaf switches, else 1
    rank_nic_solo_GBps: float = math.inf  # min over ranks of its NICs' line rate when it alone uses them

    @property
    def intra_hw(self) -> str:
        return "nvlink" if self.intra_protocol == "nvlink" else "pci"


def _shape_cache(cluster: Cluster) -> dict:  # type: ignore[type-arg]
    g = cluster.graph
    c = g.__dict__.get("_sim_shapes")
    if c is None:
        c = {}
        g.__dict__["_sim_shapes"] = c
    return c


def group_shape(cluster: Cluster, group: Sequence[str] | None = None) -> GroupShape:
    """The group's structure (cached per cluster and group)."""
    cache = _shape_cache(cluster)
    key = None if group is None else tuple(group)
    s = cache.get(key)
    if s is None:
        s = _build_shape(cluster, tuple(cluster.gpus) if group is None else tuple(group))
        cache[key] = s
    return s


def _build_shape(cluster: Cluster, ranks: tuple[str, ...]) -> GroupShape:
    if not ranks:
        raise WorkbenchError("group: needs at least one rank (GPU ids like n0.g0)")
    if len(set(ranks)) != len(ranks):
        raise WorkbenchError("group: a rank appears twice; list each GPU once")
    g = cluster.graph
    by_node: dict[int, list[str]] = {}
    for r in ranks:
        v = g.vertex(r)
        if v.kind not in ("gpu", "cpu"):
            raise WorkbenchError(f"group: {r!r} is a {v.kind}, not a GPU or CPU rank")
        by_node.setdefault(v.node, []).append(r)  # type: ignore[arg-type]
    per_node = max(len(m) for m in by_node.values())
    cpu = any(cluster.nodes[i].gpu_spec.is_cpu for i in by_node)
    intra_GBps, intra_lat, intra_proto, nvls = math.inf, 0.0, "nvlink", False
    multi = [(i, m) for i, m in by_node.items() if len(m) > 1]
    if multi:
        intra_GBps = math.inf
        for _i, m in multi:
            p = cluster.path(m[0], m[1])
            if p.bottleneck_GBps < intra_GBps:
                intra_GBps, intra_lat = p.bottleneck_GBps, p.latency_us
                intra_proto = LINK_PROTOCOL.get(p.links[0].kind, "pcie")
        nvls = all(
            cluster.nodes[i].intra == "nvswitch" and not cluster.nodes[i].gpu_spec.is_cpu
            and (cluster.nodes[i].gpu_spec.nvlink_gen or 0) >= 4
            for i, _ in multi
        )
    node_nic, rank_nic, solo, lanes = math.inf, math.inf, math.inf, 0
    net_proto, net_lat, leaf_cap = "tcp", 0.0, 1.0
    if len(by_node) > 1:
        leaves: set[str] = set()
        nodes = sorted(by_node)
        for i in nodes:
            members = by_node[i]
            users: dict[str, int] = {}
            for r in members:
                for nic in g.nics_of(r):
                    users[nic] = users.get(nic, 0) + 1
            if not users:
                raise WorkbenchError(f"group: {members[0]} has no NIC, so the group cannot span nodes")
            cap = {nic: _nic_GBps(g, nic) for nic in users}
            node_nic = min(node_nic, sum(cap.values()))
            for r in members:
                mine = g.nics_of(r)
                rank_nic = min(rank_nic, sum(cap[nic] / users[nic] for nic in mine))
                solo = min(solo, sum(cap[nic] for nic in mine))
                lanes = max(lanes, len(mine))
            leaves.update(g._leaf_of[nic] for nic in users)
        a, b = by_node[nodes[0]][0], by_node[nodes[1]][0]
        p = cluster.path(a, b)
        net_lat = p.latency_us
        for lk in p.links:
            if lk.kind in ("efa", "ib", "roce", "ethernet"):
                net_proto = LINK_PROTOCOL[lk.kind]
        if len(leaves) > 1 and cluster.fabric.oversubscription > 1:
            leaf_cap = 1.0 / cluster.fabric.oversubscription
    return GroupShape(ranks, len(ranks), len(by_node), per_node, intra_GBps, intra_lat, intra_proto, nvls,
                      node_nic, rank_nic, net_proto, net_lat, lanes, cpu, leaf_cap, solo)


def _nic_GBps(g, nic: str) -> float:  # type: ignore[no-untyped-def]
    """A NIC's usable line rate: its fabric port, capped by its PCIe attachment."""
    leaf = g._leaf_of[nic]
    host = f"n{g.vertices[nic].node}.host"
    return min(g.link(nic, leaf).GBps, g.link(nic, host).GBps)


def collective(cluster: Cluster, op: str, nbytes: int, group: Sequence[str] | None = None,
               algo: str | None = None, params: NetParams | None = None) -> CollectiveEstimate:
    """Closed-form cost of collective `op` on `group` (default: every GPU) with nccl-tests' `nbytes`."""
    if op not in OPS:
        raise WorkbenchError(f"op: unknown collective {op!r} (known: {', '.join(OPS)})")
    if nbytes < 0:
        raise WorkbenchError(f"bytes: must not be negative, got {nbytes}")
    params = params or NetParams.default()
    shape = group_shape(cluster, group)
    memo = shape.__dict__.setdefault("_memo", {})
    key = (op, int(nbytes), algo, params)  # params hash by identity; the key keeps it alive
    hit = memo.get(key)
    if hit is not None:
        return hit
    est = _estimate(shape, op, int(nbytes), algo, params)
    if len(memo) > 4096:
        memo.clear()
    memo[key] = est
    return est


def candidates(shape: GroupShape, op: str) -> tuple[str, ...]:
    """Algorithms that apply to this group for `op` (forced or automatic)."""
    out = []
    for a in ALGOS[op]:
        if a in ("tree", "nvls_tree", "hier") and (shape.nodes < 2 or shape.cpu):
            continue
        if a == "hier" and op == "all_to_all" and shape.per_node < 2:
            continue
        if a in ("nvls", "nvls_tree") and (not shape.nvls or shape.cpu):
            continue
        if a == "nvls" and shape.nodes > 1:
            continue
        out.append(a)
    return tuple(out)


def _estimate(shape: GroupShape, op: str, nbytes: int, algo: str | None, params: NetParams) -> CollectiveEstimate:
    n = shape.n
    if n == 1 or nbytes == 0:
        return CollectiveEstimate(op, nbytes, n, "none", 0.0, 0.0, 0.0, "closed-form", "")
    allowed = candidates(shape, op)
    if algo is not None:
        if algo not in ALGOS[op]:
            raise WorkbenchError(f"algo: {algo!r} does not implement {op} (choose from {', '.join(ALGOS[op])})")
        if algo not in allowed:
            raise WorkbenchError(
                f"algo: {algo!r} is not possible for this group of {n} ranks on {shape.nodes} node(s) "
                f"(possible: {', '.join(allowed)})")
        choices: tuple[str, ...] = (algo,)
    else:
        choices = tuple(a for a in AUTO[op] if a in allowed) or allowed
    protos = ("gloo",) if shape.cpu else PROTOS
    best: tuple[float, str, str] | None = None
    for a in choices:
        for pr in protos:
            if a in ("nvls", "nvls_tree", "hier", "direct") and pr != "simple" and pr != "gloo":
                continue
            t = _seconds(shape, op, nbytes, a, pr, params)
            if best is None or t < best[0]:
                best = (t, a, pr)
    assert best is not None
    t, a, pr = best
    algbw = nbytes / t / 1e9
    return CollectiveEstimate(op, nbytes, n, a, t, algbw, algbw * bus_factor(op, n), "closed-form", pr)


def _rates(shape: GroupShape, params: NetParams, proto: str) -> tuple[float, float, float, float]:
    """(intra rate, node network rate, rank network rate, protocol efficiency) in bytes/s."""
    ip = params.protocol(shape.intra_protocol)
    intra = shape.intra_GBps * ip.bw_efficiency * 1e9
    node = rank = math.inf
    if shape.nodes > 1:
        npp = params.protocol(shape.net_protocol)
        node = shape.node_nic_GBps * npp.bw_efficiency * shape.leaf_cap * 1e9
        rank = shape.rank_nic_GBps * npp.bw_efficiency * shape.leaf_cap * 1e9
    eff = 1.0 if proto == "gloo" else params.get("collective", f"{proto}_efficiency")
    return intra, node, rank, eff


def _lat(shape: GroupShape, params: NetParams, algo: str, proto: str) -> tuple[float, float, float]:
    """(base, per intra step, per network step) latency in seconds."""
    if proto == "gloo":
        lp = params.protocol(shape.intra_protocol if shape.nodes == 1 else shape.net_protocol)
        step = (lp.latency_us + (shape.intra_latency_us if shape.nodes == 1 else shape.net_latency_us)) * 1e-6
        return 0.0, step, step
    base, nvl, pci, net = params.nccl_latency(algo if algo != "hier" else "ring", proto)
    base += shape.intra_latency_us  # the node path's own per-call latency (catalogue, or calibrated from a sweep)
    return base * 1e-6, (nvl if shape.intra_hw == "nvlink" else pci) * 1e-6, net * 1e-6


def _ring(shape: GroupShape, op: str, nbytes: int, proto: str, params: NetParams,
          n: int, nodes: int, intra: float, net: float) -> float:
    base, li, ln = _lat(shape, params, "ring", proto)
    _, _, _, eff = _rates(shape, params, proto)
    steps = {"all_reduce": 2 * (n - 1), "broadcast": n - 1}.get(op, n - 1)
    inter = 0 if nodes < 2 else (2 * nodes if op == "all_reduce" else nodes)
    inter = min(inter, steps)
    rate = min(intra if n > nodes else math.inf, net if nodes > 1 else math.inf) * eff
    return base + (steps - inter) * li + inter * ln + nbytes * bus_factor(op, n) / rate


def _seconds(shape: GroupShape, op: str, nbytes: int, algo: str, proto: str, params: NetParams) -> float:
    n, m, g = shape.n, shape.nodes, shape.per_node
    intra, node_net, rank_net, eff = _rates(shape, params, proto)
    if op == "send_recv":  # nccl-tests sendrecv: a ring of transfers; one rank per node sends across
        base, li, ln = _lat(shape, params, "ring", proto)
        if m > 1:
            solo = shape.rank_nic_solo_GBps * params.protocol(shape.net_protocol).bw_efficiency * shape.leaf_cap * 1e9
            return base + ln + nbytes / (min(solo, intra) * eff)
        return base + li + nbytes / (intra * eff)
    if algo == "ring":
        return _ring(shape, op, nbytes, proto, params, n, m, intra, node_net)
    if algo == "tree":
        base, li, ln = _lat(shape, params, "tree", proto)
        lat = base + 2 * ((g - 1) * li + math.ceil(math.log2(m)) * ln)
        return lat + max(nbytes / intra if g > 1 else 0.0, nbytes * _tree_cross(m) / node_net) / eff
    if algo == "nvls":
        base, nvl, _, _ = params.nccl_latency("nvls", "simple")
        rate = shape.intra_GBps * params.get("collective", "nvls_efficiency") * 1e9
        return (base + nvl) * 1e-6 + nbytes / rate
    if algo == "nvls_tree":
        base, nvl, _, net = params.nccl_latency("nvls_tree", "simple")
        rate = shape.intra_GBps * params.get("collective", "nvls_efficiency") * 1e9
        lat = (base + nvl + 2 * math.ceil(math.log2(m)) * net) * 1e-6
        return lat + max(nbytes / rate, nbytes * _tree_cross(m) / node_net)
    if algo == "hier":
        if op == "all_to_all":
            return _a2a(shape, nbytes, params, hier=True)
        # reduce-scatter inside the node, all-reduce (or the op) across nodes per local rank, all-gather inside
        t = 0.0
        if g > 1 and op in ("all_reduce", "reduce_scatter"):
            t += _ring(shape, "reduce_scatter", nbytes, proto, params, g, 1, intra, math.inf)
        t += _ring(shape, op, nbytes // g if op == "all_reduce" else nbytes // g, proto, params,
                   m, m, math.inf, rank_net)
        if g > 1 and op in ("all_reduce", "all_gather"):
            t += _ring(shape, "all_gather", nbytes, proto, params, g, 1, intra, math.inf)
        return t
    if algo == "direct":  # all_to_all
        return _a2a(shape, nbytes, params, hier=False)
    raise WorkbenchError(f"algo: {algo!r} is not implemented for {op}")


def _tree_cross(m: int) -> float:
    """Bytes each node sends (and receives) across the network per byte reduced, NCCL's double binary tree:
    at two nodes each is the root of one tree and a leaf of the other (S/2 up, S/2 down: S in all);
    from three nodes on most nodes are interior in one tree (1.5 S) and a leaf in the other (0.5 S)."""
    return 1.0 if m <= 2 else 2.0


def _a2a(shape: GroupShape, nbytes: int, params: NetParams, hier: bool) -> float:
    """All-to-all: every rank sends nbytes/n to every other rank (nccl-tests' alltoall size)."""
    n, m, g = shape.n, shape.nodes, shape.per_node
    intra, node_net, rank_net, _ = _rates(shape, params, "gloo" if shape.cpu else "simple")
    base, li, ln = _lat(shape, params, "ring", "gloo" if shape.cpu else "simple")
    per_peer = nbytes / n
    net_pp = params.protocol(shape.net_protocol if m > 1 else shape.intra_protocol)
    if not hier:
        t_intra = per_peer * (g - 1) / intra if g > 1 else 0.0
        t_net = max(per_peer * (n - g) / rank_net, per_peer * (n - g) * g / node_net) if m > 1 else 0.0
        peers = n - 1
        msgs_per_lane = (n - g) / max(shape.lanes, 1)
        ops = msgs_per_lane / (net_pp.op_rate_M * 1e6) if m > 1 else 0.0
        lat = base + (ln if m > 1 else li) + peers * net_pp.post_us_per_peer * 1e-6
        return lat + max(t_intra, t_net, ops)
    # NVLink forwarding: first gather, inside the node, everything bound for rail peers of local rank j
    # onto local rank j; then each rank exchanges with its m-1 rail peers. Phases pipeline in chunks.
    t_intra = nbytes * (g - 1) / g / intra if g > 1 else 0.0
    t_net = nbytes * (m - 1) / m / rank_net if m > 1 else 0.0
    ops = (m - 1) / max(shape.lanes, 1) / (net_pp.op_rate_M * 1e6) if m > 1 else 0.0
    lat = base + li + ln + ((g - 1) + (m - 1)) * net_pp.post_us_per_peer * 1e-6
    return lat + max(t_intra, t_net, ops)
