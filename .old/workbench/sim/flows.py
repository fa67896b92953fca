"""Flow-level network simulation with contention: max-min fair sharing by progressive filling.

Every link of the cluster is full duplex; the simulator works on *directed* links
(`link.index * 2 + direction`, direction 0 = from `link.a` to `link.b`), each with a capacity
of line rate × the protocol's bandwidth efficiency (so no rate can exceed line rate).

Flows are grouped into **classes**: flows of one job with the same size, start and route
signature (inside a node; across nodes under one leaf; across nodes through a spine) form
one class with a multiplicity and a per-link count of member flows. Progressive filling
gives every flow of a class the same rate: the class's rate rises until some link it
crosses saturates (`count_l × rate` summed over classes reaches the link's capacity). When
the members are symmetric (as in a collective on a regular topology) this is exactly the
max-min fair allocation of the individual flows and all members complete together, so a
1024-GPU all-to-all (≈1 M flows) costs a handful of classes instead of a million flows.
When members are not symmetric the class is throttled by its most loaded link, which is
conservative (never above capacity). `aggregate=False` simulates every flow on its own
(exact max-min), which the tests use to check the aggregation.

Between events (a class starts or completes) rates are constant; the result lists each
class's completion and every directed link's rate in each interval, in the shared Result
schema (events and links tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.sim.params import LINK_PROTOCOL, NetParams
from workbench.topology.model import Cluster

SIG_NAMES = ("intra", "leaf", "spine")


# ----------------------------------------------------------------- the numba kernel
def _kernel():  # type: ignore[no-untyped-def]
    from numba import njit

    @njit(cache=True)
    def fill(cap, ptr, links, counts, size, start):  # type: ignore[no-untyped-def]
        C = size.shape[0]
        L = cap.shape[0]
        remaining = size.copy()
        finish = np.full(C, -1.0)
        rate = np.zeros(C)
        active = np.zeros(C, np.bool_)
        done = np.zeros(C, np.bool_)
        t = 0.0
        # sparse record of link rates per interval
        n_out = 0
        out_cap = 1024
        o_t0 = np.empty(out_cap)
        o_t1 = np.empty(out_cap)
        o_l = np.empty(out_cap, np.int64)
        o_v = np.empty(out_cap)
        load = np.zeros(L)
        residual = np.empty(L)
        wsum = np.zeros(L)
        sat = np.zeros(L, np.bool_)
        unfrozen = np.zeros(C, np.bool_)
        n_done = 0
        for c in range(C):
            if size[c] <= 0.0:
                finish[c] = start[c]
                done[c] = True
                n_done += 1
        t = np.inf
        for c in range(C):
            if not done[c] and start[c] < t:
                t = start[c]
        while n_done < C:
            for c in range(C):
                if not done[c] and not active[c] and start[c] <= t * (1 + 1e-12) + 1e-15:
                    active[c] = True
            # ---- progressive filling over the active classes
            for i in range(L):
                residual[i] = cap[i]
                wsum[i] = 0.0
            n_unfrozen = 0
            for c in range(C):
                rate[c] = 0.0
                unfrozen[c] = active[c]
                if active[c]:
                    n_unfrozen += 1
                    for e in range(ptr[c], ptr[c + 1]):
                        wsum[links[e]] += counts[e]
            level = 0.0
            while n_unfrozen > 0:
                delta = np.inf
                for i in range(L):
                    if wsum[i] > 0.0:
                        d = residual[i] / wsum[i]
                        if d < delta:
                            delta = d
                if delta == np.inf:  # classes that cross no link: unconstrained
                    for c in range(C):
                        if unfrozen[c]:
                            rate[c] = np.inf
                            unfrozen[c] = False
                    n_unfrozen = 0
                    break
                level += delta
                for i in range(L):
                    sat[i] = False
                    if wsum[i] > 0.0:
                        residual[i] -= wsum[i] * delta
                        if residual[i] <= cap[i] * 1e-9:
                            sat[i] = True
                for c in range(C):
                    if unfrozen[c]:
                        hit = False
                        for e in range(ptr[c], ptr[c + 1]):
                            if sat[links[e]]:
                                hit = True
                                break
                        if hit:
                            rate[c] = level
                            unfrozen[c] = False
                            n_unfrozen -= 1
                            for e in range(ptr[c], ptr[c + 1]):
                                wsum[links[e]] -= counts[e]
                for i in range(L):
                    if sat[i]:
                        wsum[i] = 0.0
            # ---- next event: a completion or an arrival
            dt = np.inf
            for c in range(C):
                if active[c]:
                    d = remaining[c] / rate[c] if rate[c] > 0 else np.inf
                    if d < dt:
                        dt = d
            for c in range(C):
                if not done[c] and not active[c]:
                    d = start[c] - t
                    if d < dt:
                        dt = d
            if dt == np.inf:
                break  # nothing can progress (a class with zero rate forever)
            # ---- record link rates over [t, t + dt)
            if dt > 0:
                for i in range(L):
                    load[i] = 0.0
                for c in range(C):
                    if active[c] and rate[c] < np.inf:
                        for e in range(ptr[c], ptr[c + 1]):
                            load[links[e]] += counts[e] * rate[c]
                for i in range(L):
                    if load[i] > 0.0:
                        if n_out == out_cap:
                            out_cap *= 2
                            a0 = np.empty(out_cap)
                            a1 = np.empty(out_cap)
                            al = np.empty(out_cap, np.int64)
                            av = np.empty(out_cap)
                            a0[:n_out] = o_t0[:n_out]
                            a1[:n_out] = o_t1[:n_out]
                            al[:n_out] = o_l[:n_out]
                            av[:n_out] = o_v[:n_out]
                            o_t0, o_t1, o_l, o_v = a0, a1, al, av
                        o_t0[n_out] = t
                        o_t1[n_out] = t + dt
                        o_l[n_out] = i
                        o_v[n_out] = load[i]
                        n_out += 1
            t += dt
            for c in range(C):
                if active[c]:
                    if rate[c] == np.inf:
                        remaining[c] = 0.0
                    else:
                        remaining[c] -= rate[c] * dt
                    if remaining[c] <= size[c] * 1e-9:
                        remaining[c] = 0.0
                        finish[c] = t
                        active[c] = False
                        done[c] = True
                        n_done += 1
        return finish, o_t0[:n_out], o_t1[:n_out], o_l[:n_out], o_v[:n_out]

    return fill


_FILL: Any = None


def _fill(*args):  # type: ignore[no-untyped-def]
    global _FILL
    if _FILL is None:
        _FILL = _kernel()
    return _FILL(*args)


# ----------------------------------------------------------------- vectorised routing
@dataclass
class FlowGraph:
    """Arrays for routing many flows at once on a cluster (built once per cluster)."""

    gpus: list[str]
    index: dict[str, int]
    node: np.ndarray
    cap: np.ndarray  # bytes/s per directed link (line rate × efficiency)
    line: np.ndarray  # bytes/s per directed link (line rate)
    names: list[str]
    up_intra: np.ndarray  # gpu -> switch/host
    down_intra: np.ndarray  # switch/host -> gpu
    lanes: np.ndarray  # NICs per gpu
    g2n: np.ndarray  # [gpu, lane] gpu -> nic
    n2l: np.ndarray  # nic -> leaf
    l2n: np.ndarray  # leaf -> nic
    n2g: np.ndarray  # nic -> gpu
    leaf: np.ndarray  # [gpu, lane] leaf index
    l2s: np.ndarray  # [leaf, spine]
    s2l: np.ndarray  # [spine, leaf]
    bridges: dict[tuple[int, int], int] = field(default_factory=dict)


def _dl(lk: Any, a: str) -> int:
    return lk.index * 2 + (0 if lk.a == a else 1)


def flow_graph(cluster: Cluster, params: NetParams | None = None) -> FlowGraph:
    """The routing arrays of `cluster` (cached on its graph per parameter set)."""
    params = params or NetParams.default()
    g = cluster.graph
    cache = g.__dict__.setdefault("_sim_flowgraph", {})
    fg = cache.get(id(params))
    if fg is not None and fg[0] is params:
        return fg[1]
    gpus = cluster.gpus
    idx = {d: i for i, d in enumerate(gpus)}
    n = len(gpus)
    L = len(g.links)
    line = np.empty(2 * L)
    cap = np.empty(2 * L)
    for lk in g.links:
        proto = LINK_PROTOCOL.get(lk.kind, "")
        eff = params.protocol(proto).bw_efficiency if proto else 1.0
        line[2 * lk.index] = line[2 * lk.index + 1] = lk.GBps * 1e9
        cap[2 * lk.index] = cap[2 * lk.index + 1] = lk.GBps * 1e9 * eff
    names = [f"{lk.a}->{lk.b}" if k == 0 else f"{lk.b}->{lk.a}" for lk in g.links for k in (0, 1)]
    node = np.array([g.vertices[d].node for d in gpus], dtype=np.int64)
    up = np.full(n, -1, np.int64)
    down = np.full(n, -1, np.int64)
    bridges: dict[tuple[int, int], int] = {}
    for i, d in enumerate(gpus):
        sw = f"n{node[i]}.nvsw"
        hub = sw if sw in g.vertices else f"n{node[i]}.host"
        lk = g.link(d, hub)
        up[i], down[i] = _dl(lk, d), _dl(lk, hub)
    for lk in g.links:
        if lk.kind == "nvlink-bridge":
            bridges[(idx[lk.a], idx[lk.b])] = _dl(lk, lk.a)
            bridges[(idx[lk.b], idx[lk.a])] = _dl(lk, lk.b)
    nics = [g.nics_of(d) for d in gpus]
    lanes = np.array([len(x) for x in nics], dtype=np.int64)
    q = int(max(lanes.max(), 1))
    leaves = sorted({g._leaf_of[nic] for x in nics for nic in x})
    leaf_ix = {lf: i for i, lf in enumerate(leaves)}
    g2n = np.full((n, q), -1, np.int64)
    n2l = np.full((n, q), -1, np.int64)
    l2n = np.full((n, q), -1, np.int64)
    n2g = np.full((n, q), -1, np.int64)
    leaf = np.full((n, q), -1, np.int64)
    for i, d in enumerate(gpus):
        for k in range(q):
            if not nics[i]:
                continue
            nic = nics[i][k % len(nics[i])]
            lf = g._leaf_of[nic]
            a, b = g.link(d, nic), g.link(nic, lf)
            g2n[i, k], n2g[i, k] = _dl(a, d), _dl(a, nic)
            n2l[i, k], l2n[i, k] = _dl(b, nic), _dl(b, lf)
            leaf[i, k] = leaf_ix[lf]
    spines = g._spines
    l2s = np.full((max(len(leaves), 1), max(len(spines), 1)), -1, np.int64)
    s2l = np.full((max(len(spines), 1), max(len(leaves), 1)), -1, np.int64)
    for li, lf in enumerate(leaves):
        for si, sp in enumerate(spines):
            lk = g.link(lf, sp)
            l2s[li, si], s2l[si, li] = _dl(lk, lf), _dl(lk, sp)
    fg = FlowGraph(gpus, idx, node, cap, line, names, up, down, lanes, g2n, n2l, l2n, n2g, leaf, l2s, s2l, bridges)
    cache[id(params)] = (params, fg)
    return fg


def _mix(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of three integer arrays (splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        h = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (b.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)) \
            ^ (c.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def route_many(fg: FlowGraph, src: np.ndarray, dst: np.ndarray, lane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed link ids (n, 6; -1 = none) and route signature (0 intra, 1 same leaf, 2 via spine).

    Mirrors `Graph.route`: inside a node through the NVSwitch (or host / NVLink bridge); across
    nodes GPU → its NIC `lane % nics` → leaf → [spine] → leaf → the peer's NIC → peer. The spine
    is picked by a hash of (src, dst, lane) (ECMP), not by `Graph.route`'s CRC.
    """
    n = src.shape[0]
    q = fg.g2n.shape[1]
    nsp = fg.s2l.shape[0]
    same = fg.node[src] == fg.node[dst]
    ls = np.maximum(fg.lanes[src], 1)
    ld = np.maximum(fg.lanes[dst], 1)
    if not same.all() and ((fg.lanes[src] == 0) | (fg.lanes[dst] == 0))[~same].any():
        raise WorkbenchError("flows: a GPU without a NIC cannot send to another node")
    fs = src * q + lane % ls
    fd = dst * q + lane % ld
    la = fg.leaf.ravel()[fs]
    lb = fg.leaf.ravel()[fd]
    via = (~same) & (la != lb)
    sp = (_mix(src, dst, lane) % np.uint64(nsp)).astype(np.int64)
    lsi = np.maximum(la, 0) * nsp + sp
    sli = sp * fg.s2l.shape[1] + np.maximum(lb, 0)
    hops = np.empty((n, 6), np.int64)
    hops[:, 0] = np.where(same, fg.up_intra[src], fg.g2n.ravel()[fs])
    hops[:, 1] = np.where(same, fg.down_intra[dst], fg.n2l.ravel()[fs])
    l2n = fg.l2n.ravel()[fd]
    n2g = fg.n2g.ravel()[fd]
    hops[:, 2] = np.where(same, -1, np.where(via, fg.l2s.ravel()[lsi], l2n))
    hops[:, 3] = np.where(same, -1, np.where(via, fg.s2l.ravel()[sli], n2g))
    hops[:, 4] = np.where(via, l2n, -1)
    hops[:, 5] = np.where(via, n2g, -1)
    if fg.bridges:
        for j in np.nonzero(same)[0]:
            br = fg.bridges.get((int(src[j]), int(dst[j])))
            if br is not None:
                hops[j, :2] = (br, -1)
    sig = np.where(same, 0, np.where(via, 2, 1))
    return hops, sig


# ----------------------------------------------------------------- flows, classes, results
@dataclass
class FlowSet:
    """Flows to simulate: GPU indices, bytes, start times, lane (NIC choice) and job id."""

    src: np.ndarray
    dst: np.ndarray
    bytes: np.ndarray
    start: np.ndarray
    lane: np.ndarray
    job: np.ndarray
    jobs: list[str] = field(default_factory=list)  # job names by id

    @classmethod
    def concat(cls, sets: list[FlowSet]) -> FlowSet:
        jobs: list[str] = []
        parts = []
        for s in sets:
            parts.append((s, len(jobs)))
            jobs.extend(s.jobs or [f"job{len(jobs)}"])
        cat = {k: np.concatenate([getattr(s, k) for s, _ in parts]) for k in ("src", "dst", "bytes", "start", "lane")}
        return cls(cat["src"], cat["dst"], cat["bytes"], cat["start"], cat["lane"],
                   np.concatenate([s.job + off for s, off in parts]), jobs)

    def __len__(self) -> int:
        return int(self.src.shape[0])


@dataclass
class FlowResult:
    """Per-class completions and per-link rates over time."""

    classes: Any  # DataFrame: job, signature, bytes, flows, start, end
    links: Any  # DataFrame in the Result links schema (+ `direction`, `line_GBps`)
    makespan: float
    flows: int

    def max_utilisation(self) -> float:
        return float(self.links["utilisation"].max()) if len(self.links) else 0.0


def _codes(x: np.ndarray) -> np.ndarray:
    """Integer codes of the distinct values of `x` (cheap when all are equal)."""
    if x.size == 0 or x.min() == x.max():
        return np.zeros(x.shape[0], np.int64)
    return np.unique(x, return_inverse=True)[1].astype(np.int64)


def simulate(cluster: Cluster, flows: FlowSet, params: NetParams | None = None, aggregate: bool = True) -> FlowResult:
    """Run the flows to completion with max-min fair sharing (see module docstring)."""
    import pandas as pd

    params = params or NetParams.default()
    fg = flow_graph(cluster, params)
    n = len(flows)
    if n == 0:
        raise WorkbenchError("flows: nothing to simulate")
    hops, sig = route_many(fg, flows.src, flows.dst, flows.lane)
    Ld = fg.cap.shape[0]
    if aggregate:
        inv_size = _codes(flows.bytes)
        inv_start = _codes(flows.start)
        key = ((flows.job * (inv_size.max() + 1) + inv_size) * (inv_start.max() + 1) + inv_start) * 3 + sig
        ukeys, cls = np.unique(key, return_inverse=True)
    else:
        cls = np.arange(n)
        ukeys = cls
    C = ukeys.shape[0]
    first = np.zeros(C, np.int64)
    first[cls[::-1]] = np.arange(n)[::-1]  # a representative flow per class
    mult = np.bincount(cls, minlength=C)
    ent = cls[:, None] * Ld + hops
    ent[hops < 0] = C * Ld  # a dummy bin for "no hop"
    if C * Ld < 50_000_000:
        counts_full = np.bincount(ent.ravel(), minlength=C * Ld + 1)[:C * Ld]
        nz = np.nonzero(counts_full)[0]
        cnt = counts_full[nz].astype(np.float64)
    else:
        nz, c2 = np.unique(ent[ent < C * Ld], return_counts=True)
        cnt = c2.astype(np.float64)
    ent_cls = nz // Ld
    ent_link = nz % Ld
    ptr = np.zeros(C + 1, np.int64)
    np.cumsum(np.bincount(ent_cls, minlength=C), out=ptr[1:])
    size = flows.bytes[first].astype(np.float64)
    start = flows.start[first].astype(np.float64)
    finish, t0, t1, lk, v = _fill(fg.cap, ptr, ent_link.astype(np.int64), cnt, size, start)
    if (finish < 0).any():
        raise WorkbenchError("flows: some flows could not complete (a route with no capacity)")
    classes = pd.DataFrame({
        "job": [flows.jobs[j] if j < len(flows.jobs) else f"job{j}" for j in flows.job[first]],
        "signature": [SIG_NAMES[s] for s in sig[first]],
        "src": [fg.gpus[i] for i in flows.src[first]], "dst": [fg.gpus[i] for i in flows.dst[first]],
        "bytes": size, "flows": mult, "start": start, "end": finish,
    })
    line = fg.line[lk]
    links = pd.DataFrame({
        "link": [fg.names[i] for i in lk], "start": t0, "end": t1, "GBps": v / 1e9, "utilisation": v / line,
        "direction": lk % 2, "line_GBps": line / 1e9,
    })
    return FlowResult(classes, links, float(finish.max() - start.min()), n)


# ----------------------------------------------------------------- collectives as flows
def _ix(fg: FlowGraph, group: list[str]) -> np.ndarray:
    try:
        return np.array([fg.index[d] for d in group], dtype=np.int64)
    except KeyError as exc:
        raise WorkbenchError(f"group: unknown device {exc.args[0]!r}") from None


def all_to_all_flows(cluster: Cluster, per_pair_bytes: float, group: list[str] | None = None,
                     start: float = 0.0, job: str = "all_to_all", params: NetParams | None = None) -> FlowSet:
    """Every rank sends `per_pair_bytes` to every other rank; inter-node flows spread over the sender's NICs."""
    fg = flow_graph(cluster, params)
    ix = _ix(fg, group or cluster.gpus)
    n = ix.shape[0]
    s = np.repeat(ix, n)
    d = np.tile(ix, n)
    keep = s != d
    s, d = s[keep], d[keep]
    m = s.shape[0]
    lane = s + d  # spread peers over the sender's and the receiver's NICs
    return FlowSet(s, d, np.full(m, float(per_pair_bytes)), np.full(m, start), lane, np.zeros(m, np.int64), [job])


def ring_flows(cluster: Cluster, op: str, nbytes: int, group: list[str] | None = None, start: float = 0.0,
               job: str | None = None, params: NetParams | None = None) -> FlowSet:
    """A ring collective as concurrent flows, with NCCL-like channels.

    One channel per rank of a node (one ring when the group sits in one node or one rank per
    node); channel c visits each node's ranks rotated by c, so every rank leaves its node in
    exactly one channel. Each ring edge carries size × nccl-tests' factor / channels (2(n−1)/n
    for all-reduce); an edge that leaves a node is split over the sender's NICs.
    """
    from workbench.sim.collectives import bus_factor

    fg = flow_graph(cluster, params)
    members = list(group or cluster.gpus)
    ix = _ix(fg, members)
    n = ix.shape[0]
    if n < 2:
        raise WorkbenchError("group: a ring needs at least 2 ranks")
    by_node: dict[int, list[int]] = {}
    for i in ix:
        by_node.setdefault(int(fg.node[i]), []).append(int(i))
    g = max(len(v) for v in by_node.values())
    channels = g if len(by_node) > 1 and op != "send_recv" else 1
    per_edge = nbytes * bus_factor(op, n) / channels
    srcs, dsts, lanes, sizes = [], [], [], []
    for c in range(channels):
        order: list[int] = []
        for k, mem in enumerate(by_node.values()):
            rot = mem[c % len(mem):] + mem[:c % len(mem)]  # enter at local c, leave at local c-1 ...
            order += rot if k % 2 == 0 else rot[::-1]  # ... the next node: enter at c-1, leave at c (same rail)
        for a, b in zip(order, order[1:] + order[:1]):
            k = int(fg.lanes[a]) if fg.node[a] != fg.node[b] else 1
            for q in range(max(k, 1)):
                srcs.append(a)
                dsts.append(b)
                lanes.append(q)
                sizes.append(per_edge / max(k, 1))
    m = len(srcs)
    return FlowSet(np.array(srcs, np.int64), np.array(dsts, np.int64), np.array(sizes), np.full(m, start),
                   np.array(lanes, np.int64), np.zeros(m, np.int64), [job or op])


def flow_collective(cluster: Cluster, op: str, nbytes: int, group: list[str] | None = None,
                    algo: str | None = None, params: NetParams | None = None):  # type: ignore[no-untyped-def]
    """A collective simulated as flows: (CollectiveEstimate with fidelity 'flow', FlowResult).

    Supported: ring all-reduce / all-gather / reduce-scatter / broadcast, direct all-to-all,
    send/recv. Fixed latency (NCCL's per-step costs) comes from the closed form of the same algorithm.
    """
    from workbench.sim.collectives import CollectiveEstimate, _seconds, bus_factor, collective, group_shape

    params = params or NetParams.default()
    members = list(group or cluster.gpus)
    n = len(members)
    if op == "all_to_all":
        algo = algo or "direct"
        if algo != "direct":
            raise WorkbenchError("algo: flow-level all_to_all supports 'direct' (use closed form for 'hier')")
        fs = all_to_all_flows(cluster, nbytes / n, members, params=params)
    elif op == "send_recv":  # nccl-tests sendrecv: every rank sends `size` to the next, receives from the previous
        algo = "direct"
        fs = ring_flows(cluster, op, nbytes, members, params=params)
    else:
        algo = algo or "ring"
        if algo != "ring":
            raise WorkbenchError(f"algo: flow-level {op} supports 'ring' (use closed form for {algo!r})")
        fs = ring_flows(cluster, op, nbytes, members, params=params)
    res = simulate(cluster, fs, params)
    closed = collective(cluster, op, nbytes, members, algo, params)
    # fixed costs (NCCL's per-step latencies) of the same algorithm and protocol: its zero-byte time
    latency = _seconds(group_shape(cluster, members), op, 0, algo, closed.proto or "simple", params)
    seconds = latency + res.makespan
    algbw = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    est = CollectiveEstimate(op, nbytes, n, algo, seconds, algbw, algbw * bus_factor(op, n), "flow", closed.proto)
    return est, res


def to_result(res: FlowResult, op: str = "flow", kind: str = "transfer") -> Any:
    """The flow result in the shared Result schema: one event per class (with its `flows` count), link table."""
    from workbench.result import Result

    cl = res.classes
    events = [{"rank": -1, "device": f"{r.src}->{r.dst}", "kind": kind, "op": f"{op}:{r.job}:{r.signature}",
               "bytes": int(r.bytes * r.flows), "links": (), "start": float(r.start), "end": float(r.end),
               "flows": int(r.flows)} for r in cl.itertuples(index=False)]
    import pandas as pd

    return Result(events=pd.DataFrame(events), links=res.links, metrics={"makespan_s": res.makespan, "flows": res.flows,
                                                          "classes": len(cl),
                                                          "max_utilisation": res.max_utilisation()},
                  source="sim", fidelity="flow")


def transfer_flows(cluster: Cluster, src: str, dst: str, nbytes: int, start: float = 0.0, job: str = "transfer",
                   params: NetParams | None = None) -> FlowSet:
    """One write from `src` to `dst` as flows: across nodes, one shard per NIC of `src` (as TransferEngine shards)."""
    fg = flow_graph(cluster, params)
    a, b = _ix(fg, [src, dst])
    k = max(int(fg.lanes[a]), 1) if fg.node[a] != fg.node[b] else 1
    return FlowSet(np.full(k, a), np.full(k, b), np.full(k, nbytes / k), np.full(k, start), np.arange(k),
                   np.zeros(k, np.int64), [job])


def simulate_jobs(cluster: Cluster, jobs: dict[str, FlowSet], params: NetParams | None = None) -> tuple[Any, FlowResult]:
    """Run each job alone and all together; per job: seconds alone, seconds shared, slowdown."""
    import pandas as pd

    alone = {name: simulate(cluster, fs, params).makespan for name, fs in jobs.items()}
    named = []
    for name, fs in jobs.items():
        named.append(FlowSet(fs.src, fs.dst, fs.bytes, fs.start, fs.lane, np.zeros(len(fs), np.int64), [name]))
    together = simulate(cluster, FlowSet.concat(named), params)
    end = together.classes.groupby("job")["end"].max()
    start = together.classes.groupby("job")["start"].min()
    table = pd.DataFrame([{"job": n, "alone_s": alone[n], "shared_s": float(end[n] - start[n]),
                           "slowdown": float(end[n] - start[n]) / alone[n] if alone[n] else float("nan")}
                          for n in jobs])
    return table, together
