"""Network cost-model parameters, loaded from `datasets/net_params.csv` and `datasets/nccl_tuning.csv`.

`NetParams` is a frozen value object: `NetParams.default()` reads the datasets once;
calibration returns a new one with `replace(...)`. Lookups are plain dict reads so the
closed-form models stay in the microsecond range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from workbench.errors import WorkbenchError

# scopes of `datasets/net_params.csv` that become `ProtocolParams`: the fabrics, the links inside a node, and
# the transport's own CUDA IPC backend as measured (`cuda_ipc` between two GPUs of a host, `cuda_ipc-local`
# within one GPU) and its tcp backend (`tcp-engine`, two processes of one host over loopback), so a KV transfer
# can be priced as the real server moves it (`p2p.write(..., protocol=)`)
PROTOCOLS = ("efa-srd", "ib-rc", "roce-rc", "tcp", "nvlink", "pcie", "loopback", "cuda_ipc", "cuda_ipc-local",
             "tcp-engine")
PROTOCOL_PARAMS = (
    "latency_us", "bw_efficiency", "op_rate_M", "overlap_p", "post_us_per_peer", "chunk_bytes", "staging_GBps",
)
# link kind of the topology -> the protocol whose parameters apply to it
LINK_PROTOCOL = {
    "efa": "efa-srd", "ib": "ib-rc", "roce": "roce-rc", "ethernet": "tcp",
    "nvlink": "nvlink", "nvlink-bridge": "nvlink", "pcie": "pcie", "loopback": "loopback", "fabric": "",
}


@dataclass(frozen=True)
class ProtocolParams:
    """Cost parameters of one transport protocol (see `datasets/net_params.csv` for meanings)."""

    protocol: str
    latency_us: float
    bw_efficiency: float
    op_rate_M: float
    overlap_p: float
    post_us_per_peer: float
    chunk_bytes: int
    staging_GBps: float


@dataclass(frozen=True)
class NetParams:
    """All network parameters: `values[(scope, param)]`, with `sources` saying where each came from."""

    values: tuple[tuple[tuple[str, str], float], ...]
    sources: tuple[tuple[tuple[str, str], str], ...] = ()
    nccl: tuple[tuple[tuple[str, str], tuple[float, float, float, float]], ...] = ()
    label: str = "default"
    _v: dict[tuple[str, str], float] = field(default_factory=dict, compare=False, hash=False, repr=False)
    _p: dict[str, ProtocolParams] = field(default_factory=dict, compare=False, hash=False, repr=False)
    _n: dict[tuple[str, str], tuple[float, float, float, float]] = field(
        default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        self._v.update(dict(self.values))
        self._n.update(dict(self.nccl))
        for proto in PROTOCOLS:
            if any((proto, k) not in self._v for k in PROTOCOL_PARAMS):
                continue
            v = {k: self._v[(proto, k)] for k in PROTOCOL_PARAMS}
            if not 0 < v["bw_efficiency"] <= 1:
                raise WorkbenchError(f"net_params.{proto}.bw_efficiency: must be in (0, 1], got {v['bw_efficiency']}")
            if v["op_rate_M"] <= 0 or v["overlap_p"] < 1:
                raise WorkbenchError(f"net_params.{proto}: op_rate_M must be > 0 and overlap_p >= 1")
            self._p[proto] = ProtocolParams(
                proto, v["latency_us"], v["bw_efficiency"], v["op_rate_M"], v["overlap_p"], v["post_us_per_peer"],
                int(v["chunk_bytes"]), v["staging_GBps"])

    @classmethod
    def default(cls) -> NetParams:
        """The parameters in `datasets/` (cached)."""
        return _default()

    def get(self, scope: str, param: str) -> float:
        try:
            return self._v[(scope, param)]
        except KeyError:
            raise WorkbenchError(f"net_params: no parameter {scope}.{param} (add it to datasets/net_params.csv)") from None

    def protocol(self, name: str) -> ProtocolParams:
        p = self._p.get(name)
        if p is None:
            raise WorkbenchError(f"protocol: no parameters for {name!r} (known: {', '.join(self._p)})")
        return p

    def nccl_latency(self, algo: str, proto: str) -> tuple[float, float, float, float]:
        """(base, per NVLink step, per PCIe step, per network step) in µs, NCCL's tuning table."""
        return self._n.get((algo, proto), (0.0, 0.0, 0.0, 0.0))

    def source(self, scope: str, param: str) -> str:
        return dict(self.sources).get((scope, param), "")

    def replace(self, changes: dict[tuple[str, str], float], source: str = "calibrated",
                label: str | None = None) -> NetParams:
        """A copy with `changes[(scope, param)] = value`; each change's source becomes `source`."""
        vals = dict(self.values)
        srcs = dict(self.sources)
        for key, value in changes.items():
            vals[key] = float(value)
            srcs[key] = source
        return NetParams(tuple(vals.items()), tuple(srcs.items()), self.nccl, label or f"{self.label}+{source}")

    def table(self):  # type: ignore[no-untyped-def]
        """The parameters as a DataFrame (scope, param, value, source)."""
        import pandas as pd

        src = dict(self.sources)
        return pd.DataFrame([{"scope": s, "param": p, "value": v, "source": src.get((s, p), "")}
                             for (s, p), v in self.values])

    def __hash__(self) -> int:
        return id(self)


@cache
def _default() -> NetParams:
    from workbench.data import read_csv

    rows: list[dict[Any, Any]] = read_csv("net_params.csv").to_dict("records")
    values = tuple(((str(r["scope"]), str(r["param"])), float(r["value"])) for r in rows)
    sources = tuple(((str(r["scope"]), str(r["param"])), str(r["source"])) for r in rows)
    nt: list[dict[Any, Any]] = read_csv("nccl_tuning.csv").to_dict("records")
    nccl = tuple(((str(r["algo"]), str(r["proto"])), (float(r["base_us"]), float(r["nvlink_us"]),
                                                      float(r["pci_us"]), float(r["net_us"]))) for r in nt)
    return NetParams(values, sources, nccl, "default")
