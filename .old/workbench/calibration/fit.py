"""Fitting network cost parameters from microbenchmark tables.

- `fit_transport(table, system)`: the per-message latency, bandwidth efficiency, op rate and
  overlap exponent of one transport (EFA SRD or verbs RC) from transfer-engine rows
  (single writes: size → Gbps; paged writes: page size → Gbps and op/s), and the per-peer
  posting cost from (peers → µs) rows. The fit calls the very model that predicts
  (`workbench.sim.p2p.write`), so fitted parameters reproduce the table only as well as
  the model can.
- `fit_collective(rows, cluster, op, algo)`: the bandwidth efficiency of the link a
  collective is limited by, from nccl-tests rows (size → time), via `workbench.sim.collective`.

Errors are reported per row as `pred / measured − 1`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.sim.collectives import collective
from workbench.sim.p2p import route, write
from workbench.sim.params import NetParams
from workbench.topology import load_cluster
from workbench.topology.model import Cluster

PAGED_PAGES_PER_LANE = 4096  # paged rows are steady-state rates of a long stream of pages


def nelder_mead(f: Callable[[np.ndarray], float], x0: Sequence[float] | np.ndarray, step: float = 0.5,
                iters: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Minimise `f` from `x0` (plain Nelder–Mead; numpy only)."""
    n = len(x0)
    pts = [np.asarray(x0, dtype=float)]
    for i in range(n):
        x = pts[0].copy()
        x[i] += step
        pts.append(x)
    vals = [f(x) for x in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        c = np.mean(pts[:-1], axis=0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = pts[0] + 0.5 * (pts[i] - pts[0])
                    vals[i] = f(pts[i])
    return pts[int(np.argmin(vals))]


@dataclass(frozen=True)
class TransportFit:
    """Fitted parameters of one protocol and the per-row errors of the model that uses them."""

    protocol: str
    values: dict[str, float]
    rows: pd.DataFrame  # the table with predicted columns and relative errors
    params: NetParams

    @property
    def max_abs_error(self) -> float:
        cols = [c for c in self.rows.columns if c.startswith("err_")]
        return float(np.nanmax(np.abs(self.rows[cols].to_numpy(dtype=float))))


def predict_transport(rows: pd.DataFrame, cluster: Cluster, params: NetParams) -> pd.DataFrame:
    """Model predictions for transfer-engine rows (columns op, size_bytes, peers)."""
    out = rows.copy()
    gbps, mops, post = [], [], []
    lanes = len(route(cluster, "n0.g0", "n1.g0").lanes)
    proto = route(cluster, "n0.g0", "n1.g0").protocol
    for r in rows.to_dict("records"):
        if r["op"] == "single":
            e = write(cluster, "n0.g0", "n1.g0", int(r["size_bytes"]), params=params)
            gbps.append(e.Gbps)
            mops.append(math.nan)
            post.append(math.nan)
        elif r["op"] == "paged":
            e = write(cluster, "n0.g0", "n1.g0", pages=PAGED_PAGES_PER_LANE * lanes, page_bytes=int(r["size_bytes"]),
                      params=params, steady_state=True)
            gbps.append(e.Gbps)
            mops.append(e.ops_per_s / 1e6)
            post.append(math.nan)
        elif r["op"] == "post":
            gbps.append(math.nan)
            mops.append(math.nan)
            post.append(params.protocol(proto).post_us_per_peer * int(r["peers"]))
        else:
            raise WorkbenchError(f"op: unknown transfer-engine row kind {r['op']!r} (single, paged, post)")
    out["pred_Gbps"] = gbps
    out["pred_Mops"] = mops
    out["pred_post_us"] = post
    out["err_Gbps"] = out["pred_Gbps"] / out["Gbps"] - 1
    out["err_Mops"] = out["pred_Mops"] / out["Mops"] - 1
    out["err_post_us"] = out["pred_post_us"] / out["post_us"] - 1
    return out


def fit_transport(table: pd.DataFrame, system: str, params: NetParams | None = None) -> TransportFit:
    """Fit latency_us, bw_efficiency, op_rate_M, overlap_p and post_us_per_peer of `system`'s protocol."""
    params = params or NetParams.default()
    rows = table[table["system"] == system]
    if rows.empty:
        raise WorkbenchError(f"system: no rows for {system!r} (have: {', '.join(sorted(set(table['system'])))})")
    cluster = load_cluster(str(rows["cluster"].iloc[0]))
    r = route(cluster, "n0.g0", "n1.g0")
    proto = r.protocol
    data = rows[rows["op"].isin(["single", "paged"])]

    # posting cost: least squares of the relative error through the origin (no negative fixed cost)
    posts = rows[rows["op"] == "post"]
    post_us = params.protocol(proto).post_us_per_peer
    if not posts.empty:
        q = posts["peers"].to_numpy(float) / posts["post_us"].to_numpy(float)
        post_us = float(q.sum() / (q * q).sum())

    def unpack(x: np.ndarray) -> dict[str, float]:
        return {"latency_us": float(math.exp(x[0])), "bw_efficiency": float(1 / (1 + math.exp(-x[1]))),
                "op_rate_M": float(math.exp(x[2])), "overlap_p": float(1 + math.exp(x[3])),
                "post_us_per_peer": post_us}

    def candidate(x: np.ndarray) -> NetParams:
        return params.replace({(proto, k): v for k, v in unpack(x).items()}, source="fit")

    meas_g = data["Gbps"].to_numpy(float)
    meas_m = data["Mops"].to_numpy(float)

    def loss(x: np.ndarray) -> float:
        pred = predict_transport(data, cluster, candidate(x))
        e = np.log(pred["pred_Gbps"].to_numpy(float) / meas_g)
        em = np.log(pred["pred_Mops"].to_numpy(float) / meas_m)
        em = em[~np.isnan(em)]
        return float((e ** 2).sum() + (em ** 2).sum())

    p0 = params.protocol(proto)
    x0 = np.array([math.log(max(p0.latency_us, 0.1)), math.log(p0.bw_efficiency / (1 - min(p0.bw_efficiency, 0.99))),
                   math.log(p0.op_rate_M), math.log(max(p0.overlap_p - 1, 0.1))])
    x = nelder_mead(loss, x0, iters=600)
    values = unpack(x)
    source = f"fitted by workbench.calibration.fit.fit_transport to datasets/measurements/transferengine_table2.csv ({system})"
    fitted = params.replace({(proto, k): v for k, v in values.items()}, source=source)
    return TransportFit(proto, values, predict_transport(rows, cluster, fitted), fitted)


def _bisect_efficiency(err: Callable[[float], np.ndarray]) -> float:
    """The efficiency in (0.05, 1] where the mean log error of `err` crosses zero (time falls with efficiency)."""
    lo, hi = 0.05, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if err(mid).mean() > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fit_nccl_tests(rows: pd.DataFrame, cluster: Cluster, group: Sequence[str] | None = None, algo: str = "ring",
                   params: NetParams | None = None, min_bytes: int = 64 << 20) -> tuple[NetParams, pd.DataFrame]:
    """Fit the efficiency behind `algo` (COLLECTIVE_TARGETS) to parsed nccl-tests rows of any ops at once.

    `rows` are `parse_nccl_tests` frames (columns op, size, time_us, busbw_GBps; out-of-place figures);
    rows of at least `min_bytes` drive the fit. Returns the fitted parameters and a table per row with
    the measured busbw and the simulated busbw before and after the fit.
    """
    from workbench.sim.collectives import bus_factor

    if algo not in COLLECTIVE_TARGETS:
        raise WorkbenchError(f"algo: cannot fit {algo!r} from nccl-tests (fittable: {', '.join(COLLECTIVE_TARGETS)})")
    scope, param = COLLECTIVE_TARGETS[algo]
    before = params or NetParams.default()
    n = len(group) if group is not None else cluster.num_gpus
    big = rows[rows["size"] >= min_bytes]
    if big.empty:
        raise WorkbenchError(f"rows: no nccl-tests rows of at least {min_bytes} bytes to fit {scope}.{param}")

    def one(p: NetParams, op: str, size: int) -> float:
        try:
            return collective(cluster, op, size, group, algo, p).seconds
        except WorkbenchError:  # `algo` does not apply to this op (all_to_all): NCCL's own choice
            return collective(cluster, op, size, group, None, p).seconds

    def seconds(p: NetParams, frame: pd.DataFrame) -> np.ndarray:
        return np.array([one(p, str(r.op), int(r.size)) for r in frame.itertuples(index=False)])

    measured = big["time_us"].to_numpy(float) * 1e-6
    eff = _bisect_efficiency(lambda e: np.log(seconds(before.replace({(scope, param): e}, source="fit"), big) / measured))
    after = before.replace({(scope, param): eff}, source=(
        f"fitted by workbench.calibration.fit.fit_nccl_tests ({algo}, {n} ranks, {len(big)} nccl-tests rows >= {min_bytes} B)"))
    out = rows[["op", "size", "time_us", "busbw_GBps"]].copy()
    factor = np.array([bus_factor(str(op), n) for op in out["op"]])
    for label, p in (("before", before), ("after", after)):
        t = seconds(p, out)
        out[f"sim_busbw_GBps_{label}"] = out["size"].to_numpy(float) * factor / t / 1e9
        out[f"err_{label}"] = out[f"sim_busbw_GBps_{label}"] / out["busbw_GBps"] - 1
    out.attrs["fitted"] = {"param": f"{scope}.{param}", "before": before.get(scope, param), "after": eff}
    return after, out


def fit_collective(rows: pd.DataFrame, cluster: Cluster, op: str, algo: str, scope: str, param: str,
                   params: NetParams | None = None, group: Sequence[str] | None = None,
                   min_bytes: int = 64 << 20) -> tuple[float, pd.DataFrame]:
    """Fit one efficiency parameter (`scope.param`, in (0, 1]) so that `collective` matches nccl-tests
    rows (columns `size`, `time_us`) of at least `min_bytes` (the bandwidth-bound part)."""
    params = params or NetParams.default()
    big = rows[rows["size"] >= min_bytes]
    if big.empty:
        raise WorkbenchError(f"rows: no nccl-tests rows of at least {min_bytes} bytes to fit {scope}.{param}")

    def err(eff: float) -> np.ndarray:
        p = params.replace({(scope, param): eff}, source="fit")
        t = np.array([collective(cluster, op, int(s), group, algo, p).seconds * 1e6 for s in big["size"]])
        return np.log(t / big["time_us"].to_numpy(float))

    eff = _bisect_efficiency(err)
    p = params.replace({(scope, param): eff}, source="fit")
    out = rows.copy()
    out["pred_us"] = [collective(cluster, op, int(s), group, algo, p).seconds * 1e6 for s in rows["size"]]
    out["err"] = out["pred_us"] / out["time_us"] - 1
    return eff, out


def transferengine_table() -> pd.DataFrame:
    """The TransferEngine table (REFERENCE §1) as shipped in `datasets/measurements/`."""
    from workbench.data import read_csv

    return read_csv("measurements/transferengine_table2.csv").copy()


def refit_transfer_engine(params: NetParams | None = None) -> tuple[NetParams, dict[str, Any]]:
    """Fit EFA (p5en) and ConnectX-7 parameters from the shipped table; RoCE follows ConnectX-7."""
    table = transferengine_table()
    params = params or NetParams.default()
    fits = {}
    for system in ("efa", "cx7"):
        fit = fit_transport(table, system, params)
        params = fit.params
        fits[system] = fit
    return params, fits


def save_params(params: NetParams, changed: Sequence[tuple[str, str]], path: str | None = None) -> str:
    """Rewrite the value and source of the `changed` rows of `datasets/net_params.csv` (comments kept)."""
    import csv
    import io

    from workbench.data import dataset_path

    target = path or str(dataset_path("net_params.csv"))
    lines = open(target).read().splitlines()
    want = set(changed)
    out = []
    for line in lines:
        if line.startswith("#") or line.startswith("scope,") or not line.strip():
            out.append(line)
            continue
        row = next(csv.reader([line]))
        key = (row[0], row[1])
        if key in want:
            row[2] = f"{params.get(*key):.6g}"
            row[4] = params.source(*key)
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(row)
            line = buf.getvalue()
        out.append(line)
    with open(target, "w") as f:
        f.write("\n".join(out) + "\n")
    return target


COLLECTIVE_TARGETS = {"ring": ("nvlink", "bw_efficiency"), "nvls": ("collective", "nvls_efficiency")}


def refit_collectives(params: NetParams | None = None) -> tuple[NetParams, pd.DataFrame]:
    """Fit the NVLink ring and NVLS efficiencies to `datasets/measurements/nccl_tests_h100_busbw.csv`."""
    from workbench.data import read_csv
    from workbench.sim.collectives import bus_factor

    params = params or NetParams.default()
    table = read_csv("measurements/nccl_tests_h100_busbw.csv")
    report = []
    for r in table.to_dict("records"):
        cluster = load_cluster(str(r["cluster"]))
        size = int(r["size"])
        t_us = size * bus_factor(str(r["op"]), cluster.num_gpus) / (float(r["busbw_GBps"]) * 1e9) * 1e6
        scope, param = COLLECTIVE_TARGETS[str(r["algo"])]
        eff, out = fit_collective(pd.DataFrame({"size": [size], "time_us": [t_us]}), cluster, str(r["op"]),
                                  str(r["algo"]), scope, param, params)
        params = params.replace({(scope, param): eff}, source=(
            f"fitted by workbench.calibration.fit.refit_collectives to datasets/measurements/nccl_tests_h100_busbw.csv "
            f"({r['op']} {r['algo']} busbw {r['busbw_GBps']} GB/s)"))
        report.append({**r, "param": f"{scope}.{param}", "value": eff, "err": float(out["err"].iloc[0])})
    return params, pd.DataFrame(report)
