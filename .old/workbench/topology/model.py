"""The cluster value objects and the graph derived from them.

A `Cluster` is a tuple of `Node`s plus a scale-out `Fabric`; it is immutable and
serialisable. Its `graph` (built once, cached) holds every vertex (GPU or CPU rank,
NVSwitch, host, NIC, leaf and spine switch) and every full-duplex `Link`; bandwidths are
per direction, so traffic in opposite directions does not share capacity.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property

from workbench.errors import WorkbenchError
from workbench.topology import catalogue as cat

INTRA_KINDS = ("nvswitch", "pcie", "nvlink-bridge")
FABRIC_KINDS = ("rail", "fat-tree", "switch")
CPU_MODEL = "CPU"


@dataclass(frozen=True)
class Node:
    """One server: `gpus` compute devices of model `gpu`, joined by `intra`, with `nics` NICs.

    `gpu` may be `CPU` for a machine without GPUs; then `specs` carries the measured
    rates (`fp32_tflops`, `memory_GBps`, `memory_GB`, and for the ranks' loopback link
    `link_GBps`, `link_latency_us`) and each "GPU" is a CPU rank. Calibration from a real run
    returns a new cluster with these specs replaced by fitted values.
    """

    gpu: str
    gpus: int = 8
    intra: str = "nvswitch"
    nic: str = "ETH-10G"
    nics: int = 1
    specs: tuple[tuple[str, float], ...] = ()

    @property
    def gpu_spec(self) -> cat.GPUSpec:
        if self.gpu == CPU_MODEL:
            s = dict(self.specs)
            fp32 = s.get("fp32_tflops", 0.1)
            return cat.GPUSpec(
                model=CPU_MODEL, name="CPU ranks (measured)", memory_GB=s.get("memory_GB", 8.0),
                memory_GBps=s.get("memory_GBps", 10.0),
                peak_tflops=(("fp32", fp32), ("bf16", s.get("bf16_tflops", fp32))),
                nvlink_gen=None, nvlink_GBps=0.0, pcie_gen=3, is_cpu=True,
                source=str(s.get("source", "measured by workbench.topology.discover")),
            )
        spec = cat.gpu(self.gpu)
        s = dict(self.specs)  # a GPU node's calibrated rates (workbench.calibration.run.from_sweeps)
        if not s:
            return spec
        peaks = tuple((p, float(s.get(f"{p}_tflops", v))) for p, v in spec.peak_tflops)
        return dataclasses.replace(spec, peak_tflops=peaks, memory_GBps=float(s.get("memory_GBps", spec.memory_GBps)),
                                   nvlink_GBps=float(s.get("nvlink_GBps", spec.nvlink_GBps)),
                                   source=f"{spec.source}; calibrated: {', '.join(sorted(s))}")

    @property
    def nic_spec(self) -> cat.NICSpec:
        return cat.nic(self.nic)


@dataclass(frozen=True)
class Fabric:
    """Scale-out network: `rail` (NIC k of every node on rail k's leaves), `fat-tree`, or one `switch`.

    `leaf_ports` NIC ports per leaf switch; every leaf connects to each of `spines` spine
    switches with ceil(attached ports / oversubscription / spines) uplink ports of NIC speed.
    """

    kind: str = "rail"
    switch: str = "efa"
    leaf_ports: int = 32
    spines: int = 8
    oversubscription: float = 1.0


@dataclass(frozen=True)
class Vertex:
    id: str
    kind: str  # gpu | cpu | nvswitch | host | nic | leaf | spine | switch
    node: int | None
    model: str = ""


@dataclass(frozen=True)
class Link:
    """A full-duplex link; `GBps` is the capacity of each direction."""

    index: int
    a: str
    b: str
    kind: str  # nvlink | nvlink-bridge | pcie | efa | ib | roce | ethernet | fabric
    GBps: float
    latency_us: float

    @property
    def name(self) -> str:
        return f"{self.a}<->{self.b}"


@dataclass(frozen=True)
class Path:
    """A route between two devices: the links in order and what they allow."""

    src: str
    dst: str
    links: tuple[Link, ...]

    @property
    def bottleneck_GBps(self) -> float:
        return min((lk.GBps for lk in self.links), default=math.inf)

    @property
    def latency_us(self) -> float:
        return sum(lk.latency_us for lk in self.links)

    @property
    def hops(self) -> list[str]:
        out = [self.src]
        for lk in self.links:
            out.append(lk.b if lk.a == out[-1] else lk.a)
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "src": self.src, "dst": self.dst, "hops": self.hops,
            "links": [{"link": lk.name, "kind": lk.kind, "GBps": lk.GBps, "latency_us": lk.latency_us}
                      for lk in self.links],
            "bottleneck_GBps": self.bottleneck_GBps, "latency_us": round(self.latency_us, 4),
        }


_FABRIC_LINK_KIND = {"efa-srd": "efa", "ib-rc": "ib", "roce-rc": "roce", "tcp": "ethernet"}


@dataclass(frozen=True)
class Cluster:
    """An immutable cluster: nodes (which may differ) and the fabric between them."""

    name: str
    nodes: tuple[Node, ...]
    fabric: Fabric = field(default_factory=Fabric)

    # ----- derived views (not part of equality) -----
    @cached_property
    def graph(self) -> Graph:
        return Graph.build(self)

    @property
    def gpus(self) -> list[str]:
        return [f"n{i}.g{j}" for i, n in enumerate(self.nodes) for j in range(n.gpus)]

    @property
    def num_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def gpu_models(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.gpu] = out.get(n.gpu, 0) + n.gpus
        return out

    def node_of(self, device: str) -> int:
        return self.graph.vertex(device).node  # type: ignore[return-value]

    def gpu_spec(self, device: str) -> cat.GPUSpec:
        return self.nodes[self.node_of(device)].gpu_spec

    def nics_of(self, device: str) -> list[str]:
        """NICs that serve a GPU (its PCIe-local NICs; shared when a node has fewer NICs than GPUs)."""
        return self.graph.nics_of(device)

    def path(self, a: str, b: str, lane: int = 0) -> Path:
        """The route from GPU `a` to GPU `b`; across nodes `lane` picks which of `a`'s NICs."""
        return self.graph.route(a, b, lane)

    def scale_out_Gbps_per_node(self, node: int = 0) -> float:
        n = self.nodes[node]
        return n.nics * n.nic_spec.Gbps

    def scale_up_GBps_per_gpu(self, node: int = 0) -> float:
        """Intra-node bandwidth per GPU, both directions together (NVIDIA's convention)."""
        n = self.nodes[node]
        if n.gpus <= 1:
            return 0.0
        lk = self.graph.route(f"n{node}.g0", f"n{node}.g1").links[0]
        return 2 * lk.GBps

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name,
            "nodes": len(self.nodes),
            "gpus": self.num_gpus,
            "gpu_models": self.gpu_models(),
            "nics_per_node": self.nodes[0].nics if len({n.nics for n in self.nodes}) == 1
            else [n.nics for n in self.nodes],
            "nic_models": sorted({n.nic for n in self.nodes}),
            "scale_up_GBps_per_gpu": self.scale_up_GBps_per_gpu(0),
            "scale_out_Gbps_per_node": self.scale_out_Gbps_per_node(0),
            "fabric": self.fabric.kind,
            "links": len(self.graph.links),
        }

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> dict[str, str]:
        from workbench.topology.display import cluster_html, cluster_text

        return {"text/plain": cluster_text(self), "text/html": cluster_html(self)}

    def __repr__(self) -> str:
        s = self.summary()
        return f"Cluster({self.name!r}, nodes={s['nodes']}, gpus={s['gpus']}, models={s['gpu_models']})"


class Graph:
    """Vertices and links of a cluster, with structural routing (deterministic, ECMP by hash)."""

    def __init__(self) -> None:
        self.vertices: dict[str, Vertex] = {}
        self.links: list[Link] = []
        self._between: dict[tuple[str, str], Link] = {}
        self._gpu_nics: dict[str, list[str]] = {}
        self._leaf_of: dict[str, str] = {}
        self._spines: list[str] = []
        self._node_intra: list[str] = []

    # ---- construction ----
    def _v(self, vid: str, kind: str, node: int | None, model: str = "") -> str:
        self.vertices[vid] = Vertex(vid, kind, node, model)
        return vid

    def _l(self, a: str, b: str, kind: str, GBps: float, latency_us: float) -> Link:
        lk = Link(len(self.links), a, b, kind, float(GBps), float(latency_us))
        self.links.append(lk)
        self._between[(a, b)] = lk
        self._between[(b, a)] = lk
        return lk

    @classmethod
    def build(cls, c: Cluster) -> Graph:
        g = cls()
        nic_ports: list[tuple[int, int, str, cat.NICSpec]] = []  # (node, k, nic id, spec)
        for i, node in enumerate(c.nodes):
            spec = node.gpu_spec
            nspec = node.nic_spec
            host = g._v(f"n{i}.host", "host", i)
            pcie_gen = min(spec.pcie_gen, nspec.pcie_gen)
            pcie_bw, pcie_lat = cat.node_link("pcie", spec.pcie_gen)
            gpu_ids = [g._v(f"n{i}.g{j}", "cpu" if spec.is_cpu else "gpu", i, node.gpu) for j in range(node.gpus)]
            g._node_intra.append(node.intra)
            if spec.is_cpu:  # CPU ranks talk through the host (loopback); measured or calibrated rates
                s = dict(node.specs)
                for d in gpu_ids:
                    g._l(d, host, "loopback", s.get("link_GBps", spec.memory_GBps), s.get("link_latency_us", 20.0))
            else:
                for d in gpu_ids:
                    g._l(d, host, "pcie", pcie_bw, pcie_lat)
            if node.intra == "nvswitch" and not spec.is_cpu:
                if spec.nvlink_gen is None:
                    raise WorkbenchError(
                        f"nodes[{i}].intra: {node.gpu} has no NVLink, so 'nvswitch' is impossible (use pcie)"
                    )
                sw = g._v(f"n{i}.nvsw", "nvswitch", i)
                bw, lat = cat.node_link("nvswitch", spec.nvlink_gen)
                bw = spec.nvlink_GBps / 2 or bw
                lat = float(dict(node.specs).get("nvlink_latency_us", lat))
                for d in gpu_ids:
                    g._l(d, sw, "nvlink", bw, lat)
            elif node.intra == "nvlink-bridge" and not spec.is_cpu:
                if spec.nvlink_gen is None:
                    raise WorkbenchError(f"nodes[{i}].intra: {node.gpu} has no NVLink bridge (use pcie)")
                for j in range(0, node.gpus - 1, 2):
                    g._l(gpu_ids[j], gpu_ids[j + 1], "nvlink-bridge", spec.nvlink_GBps / 2, 0.7)
            nic_bw, _ = cat.node_link("pcie", pcie_gen)
            nic_ids = [g._v(f"n{i}.nic{k}", "nic", i, node.nic) for k in range(node.nics)]
            for k, nid in enumerate(nic_ids):
                nic_ports.append((i, k, nid, nspec))
            for j, d in enumerate(gpu_ids):
                if node.nics >= node.gpus:  # NIC k serves GPU k*gpus//nics, so every NIC serves a GPU
                    mine = [nid for k, nid in enumerate(nic_ids) if k * node.gpus // node.nics == j]
                else:
                    mine = [nic_ids[j * node.nics // node.gpus]] if node.nics else []
                g._gpu_nics[d] = mine
                for nid in mine:
                    # GPUDirect RDMA through the PCIe switch; without it the NIC is reached via host memory
                    g._l(d, nid, "pcie", nic_bw if nspec.gpudirect else min(nic_bw, pcie_bw), pcie_lat)
            for nid in nic_ids:
                g._l(nid, host, "pcie", nic_bw, pcie_lat)
        g._build_fabric(c, nic_ports)
        return g

    def _build_fabric(self, c: Cluster, ports: list[tuple[int, int, str, cat.NICSpec]]) -> None:
        f = c.fabric
        sw_lat = cat.switch_latency_us(f.switch)
        groups: dict[str, list[tuple[str, cat.NICSpec]]] = {}
        for node, k, nid, spec in ports:
            if f.kind == "switch":
                leaf = "sw0"
            elif f.kind == "rail":
                leaf = f"rail{k}.leaf{node // f.leaf_ports}"
            else:
                leaf = f"leaf{len(self._leaf_of) // f.leaf_ports}"
            self._leaf_of[nid] = leaf
            groups.setdefault(leaf, []).append((nid, spec))
        for leaf, members in groups.items():
            self._v(leaf, "switch" if f.kind == "switch" else "leaf", None, f.switch)
            for nid, spec in members:
                self._l(nid, leaf, _FABRIC_LINK_KIND[spec.protocol], spec.GBps, spec.latency_us / 2)
        if len(groups) > 1:
            self._spines = [self._v(f"spine{s}", "spine", None, f.switch) for s in range(max(f.spines, 1))]
            for leaf, members in groups.items():
                # each leaf spreads ceil(ports / oversubscription) uplink ports of the NICs' speed over the spines
                port = max(spec.GBps for _, spec in members)
                up = port * math.ceil(len(members) / f.oversubscription / len(self._spines))
                for sp in self._spines:
                    self._l(leaf, sp, "fabric", up, sw_lat)

    # ---- queries ----
    def vertex(self, vid: str) -> Vertex:
        v = self.vertices.get(vid)
        if v is None:
            some = [x for x in self.vertices if x.startswith("n0.g")][:4]
            raise WorkbenchError(f"device: unknown device {vid!r} (devices are named like {', '.join(some)})")
        return v

    def link(self, a: str, b: str) -> Link:
        return self._between[(a, b)]

    def nics_of(self, device: str) -> list[str]:
        v = self.vertex(device)
        if v.kind not in ("gpu", "cpu"):
            raise WorkbenchError(f"device: {device!r} is a {v.kind}, not a GPU or CPU rank")
        return list(self._gpu_nics.get(device, []))

    def route(self, a: str, b: str, lane: int = 0) -> Path:
        va, vb = self.vertex(a), self.vertex(b)
        for v in (va, vb):
            if v.kind not in ("gpu", "cpu"):
                raise WorkbenchError(f"device: {v.id!r} is a {v.kind}; paths run between GPUs (n0.g0, …)")
        if a == b:
            return Path(a, b, ())
        if va.node == vb.node:
            return Path(a, b, tuple(self._intra(a, b, va.node)))  # type: ignore[arg-type]
        na, nb = self._gpu_nics.get(a, []), self._gpu_nics.get(b, [])
        if not na or not nb:
            raise WorkbenchError(f"device: {a if not na else b} has no NIC, so it cannot reach another node")
        nic_a, nic_b = na[lane % len(na)], nb[lane % len(nb)]
        leaf_a, leaf_b = self._leaf_of[nic_a], self._leaf_of[nic_b]
        hops = [self.link(a, nic_a), self.link(nic_a, leaf_a)]
        if leaf_a != leaf_b:
            spine = self._spines[zlib.crc32(f"{a}>{b}:{lane}".encode()) % len(self._spines)]
            hops += [self.link(leaf_a, spine), self.link(spine, leaf_b)]
        hops += [self.link(leaf_b, nic_b), self.link(nic_b, b)]
        return Path(a, b, tuple(hops))

    def _intra(self, a: str, b: str, node: int) -> list[Link]:
        sw = f"n{node}.nvsw"
        if sw in self.vertices:
            return [self.link(a, sw), self.link(sw, b)]
        if (a, b) in self._between:
            return [self._between[(a, b)]]
        host = f"n{node}.host"
        return [self.link(a, host), self.link(host, b)]
