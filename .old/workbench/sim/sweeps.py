"""Cost-model sweeps over message size: the tables the fabric figures draw (`workbench.viz.fabrics`).

The computation lives here, in the simulator; the figure builders only draw the DataFrames:

    curves = p2p_curves()                      # single-write Gbit/s per fabric and size
    p2p_figure(curves, published=transferengine_table())
    collective_figure(collective_curves({"8x H100": "dgx-h100:nodes=1"}, "all_reduce"),
                      published=published_busbw("all_reduce"))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from workbench.sim.collectives import collective
from workbench.sim.p2p import write
from workbench.topology import load_cluster

DEFAULT_SIZES = tuple(2 ** k for k in range(12, 31))  # 4 KiB … 1 GiB
# name -> (cluster spec, destination GPU of a write from n0.g0, system of the published TransferEngine rows)
P2P_FABRICS: dict[str, tuple[str, str, str | None]] = {
    "EFA (p5en, 2×200G per GPU)": ("aws-p5en:nodes=2", "n1.g0", "efa"),
    "InfiniBand (CX-7, 1×400G per GPU)": ("dgx-h100:nodes=2", "n1.g0", "cx7"),
    "NVLink (H100, same node)": ("dgx-h100:nodes=1", "n0.g1", None),
}


def p2p_curves(fabrics: Mapping[str, tuple[str, str, str | None]] = P2P_FABRICS,
               sizes: Sequence[int] = DEFAULT_SIZES) -> pd.DataFrame:
    """Single writes (submit, wait, repeat) from n0.g0, per fabric and size: one row each with the
    model's seconds and Gbit/s (`fabric`, `cluster`, `dst`, `system`, `bytes`, `seconds`, `Gbps`, `protocol`)."""
    rows = []
    for name, (spec, dst, system) in fabrics.items():
        c = load_cluster(spec)
        for s in sizes:
            est = write(c, "n0.g0", dst, int(s))
            rows.append({"fabric": name, "cluster": spec, "dst": dst, "system": system, "bytes": int(s),
                         "seconds": est.seconds, "Gbps": est.Gbps, "protocol": est.protocol})
    return pd.DataFrame(rows)


def collective_curves(specs: Mapping[str, str], op: str = "all_reduce",
                      sizes: Sequence[int] = DEFAULT_SIZES) -> pd.DataFrame:
    """One collective over every GPU of each cluster, per size (nccl-tests conventions): `fabric`, `cluster`,
    `op`, `bytes`, `seconds`, `algbw_GBps`, `busbw_GBps`, and the `algo`/`proto` NCCL would pick."""
    rows = []
    for name, spec in specs.items():
        c = load_cluster(spec)
        for s in sizes:
            e = collective(c, op, int(s))
            rows.append({"fabric": name, "cluster": spec, "op": op, "bytes": int(s), "ranks": e.ranks,
                         "seconds": e.seconds, "algbw_GBps": e.algbw_GBps, "busbw_GBps": e.busbw_GBps,
                         "algo": e.algo, "proto": e.proto})
    return pd.DataFrame(rows)


def published_busbw(op: str | None = None) -> pd.DataFrame:
    """Published nccl-tests bus bandwidths (`datasets/measurements/nccl_tests_h100_busbw.csv`), of `op` if given."""
    from workbench.data import read_csv

    pts = read_csv("measurements/nccl_tests_h100_busbw.csv")
    return (pts[pts["op"] == op] if op else pts).reset_index(drop=True)
