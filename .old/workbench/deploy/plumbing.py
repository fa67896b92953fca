"""What a pod on one node of a cluster needs for its GPUs and its fabric (EFA, InfiniBand or plain TCP).

Derived from the Job's cluster: the preset's instance row in `datasets/deploy/instances.csv`
and the NIC catalogue's protocol. EFA pods ask for one `vpc.amazonaws.com/efa` per interface the
instance has, huge pages, IPC_LOCK and a memory-backed /dev/shm, and carry the libfabric/NCCL
environment that makes NCCL use EFA through the aws-ofi-nccl plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench.errors import WorkbenchError

OFI_NCCL_LIB = "/opt/amazon/ofi-nccl/lib"
EFA_LIBS = "/opt/amazon/efa/lib"


@dataclass(frozen=True)
class NodePlumbing:
    """Resources, environment and security settings of one pod that owns one whole node."""

    fabric: str  # efa | ib | tcp
    gpus: int
    instance_type: str
    efa: int = 0
    hugepages_mib: int = 0
    rdma_resource: str = ""
    nics: int = 1
    shm_gib: int = 64

    def limits(self) -> dict[str, str]:
        out = {"nvidia.com/gpu": str(self.gpus)} if self.gpus else {}
        if self.fabric == "efa":
            out["vpc.amazonaws.com/efa"] = str(self.efa)
            if self.hugepages_mib:
                out["hugepages-2Mi"] = f"{self.hugepages_mib}Mi"
                out["memory"] = f"{max(32, self.gpus * 16)}Gi"  # huge pages need a memory limit beside them
        elif self.fabric == "ib" and self.rdma_resource:
            out[self.rdma_resource] = "1"
        return out

    def env(self) -> list[dict[str, str]]:
        common = [{"name": "NCCL_DEBUG", "value": "WARN"}]
        if self.fabric == "efa":
            return common + [
                {"name": "FI_PROVIDER", "value": "efa"},
                {"name": "FI_EFA_USE_DEVICE_RDMA", "value": "1"},
                {"name": "FI_EFA_FORK_SAFE", "value": "1"},
                {"name": "NCCL_NET_PLUGIN", "value": "ofi"},
                {"name": "NCCL_TUNER_PLUGIN", "value": "ofi"},
                {"name": "LD_LIBRARY_PATH", "value": f"{OFI_NCCL_LIB}:{EFA_LIBS}:/usr/local/nvidia/lib64"},
            ]
        if self.fabric == "ib":
            return common + [{"name": "NCCL_IB_HCA", "value": "mlx5"}, {"name": "NCCL_NET_GDR_LEVEL", "value": "PHB"}]
        return common + [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}]

    @property
    def capabilities(self) -> list[str]:
        return ["IPC_LOCK"] if self.fabric in ("efa", "ib") else []


def plumbing(cluster: Any, preset: str | None = None) -> NodePlumbing:
    """The plumbing of one node of `cluster` (its first node; mixed clusters use `role_nodes`)."""
    from workbench.data import read_csv
    from workbench.topology.catalogue import nic_models

    node = cluster.nodes[0]
    if node.gpu_spec.is_cpu:
        raise WorkbenchError("cluster: CPU-rank clusters (this machine) cannot be deployed; give a GPU cluster preset")
    nic = nic_models().get(node.nic)
    protocol = nic.protocol if nic else "tcp"
    name = preset or str(cluster.name).split(":")[0]
    rows = {str(r["preset"]): r for r in read_csv("deploy/instances.csv").to_dict("records")}
    row = rows.get(name)
    fabric = "efa" if protocol == "efa-srd" else ("ib" if protocol in ("ib-rc", "roce-rc") else "tcp")
    if fabric == "efa":
        efa = int(row["efa"]) if row is not None else int(node.nics)
        return NodePlumbing("efa", node.gpus, str(row["instance_type"]) if row is not None else "", efa=efa,
                            hugepages_mib=int(row["hugepages_2Mi_MiB"]) if row is not None else 5120, nics=node.nics)
    rdma = str(row["rdma_resource"]) if row is not None and str(row["rdma_resource"]) != "nan" else "rdma/rdma_shared_device_a"
    return NodePlumbing(fabric, node.gpus, "", rdma_resource=rdma if fabric == "ib" else "", nics=node.nics)
