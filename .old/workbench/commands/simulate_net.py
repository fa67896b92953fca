"""`workbench simulate p2p|collective` and `workbench calibrate net`."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit


def _p2p_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, help="preset with options (aws-p5en:nodes=2) or a YAML/JSON file")
    p.add_argument("--bytes", default="0", help="write size (4KiB, 32MiB, 1GiB or bytes); 0 with no pages = imm-only")
    p.add_argument("--pages", type=int, default=0, help="paged write: number of pages")
    p.add_argument("--page-size", default="0", help="paged write: bytes per page (e.g. 8KiB)")
    p.add_argument("--peers", type=int, default=1, help="scatter the write to this many peers")
    p.add_argument("--src", default="n0.g0", help="source GPU (default n0.g0)")
    p.add_argument("--dst", default="n1.g0", help="destination GPU (default n1.g0, across nodes)")
    p.add_argument("--steady-state", action="store_true", help="rate of a long stream (no fixed latency)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _p2p(args: argparse.Namespace) -> int:
    from workbench.errors import WorkbenchError
    from workbench.sim.p2p import write
    from workbench.topology import load_cluster
    from workbench.units import parse_size

    c = load_cluster(args.cluster)
    dst = args.dst
    if dst == "n1.g0" and len(c.nodes) < 2:
        dst = "n0.g1" if c.num_gpus > 1 else dst
    if args.pages < 0:
        raise WorkbenchError(f"--pages: must not be negative, got {args.pages}")
    est = write(c, args.src, dst, parse_size(args.bytes, "--bytes"), pages=args.pages,
                page_bytes=parse_size(args.page_size, "--page-size"), peers=args.peers,
                steady_state=args.steady_state)
    out = {**est.as_dict(), "src": args.src, "dst": dst}
    emit(out, args.json)
    return 0


def _coll_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, help="preset with options (aws-p5:nodes=2) or a YAML/JSON file")
    p.add_argument("--op", required=True, help="all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, send_recv")
    p.add_argument("--bytes", required=True, help="nccl-tests' size: 4KiB, 32MiB, 1GiB or bytes")
    p.add_argument("--gpus", type=int, help="use the first N GPUs (default: all)")
    p.add_argument("--algo", help="force an algorithm (ring, tree, nvls, nvls_tree, hier, direct)")
    p.add_argument("--flow", action="store_true", help="flow-level simulation with link contention")
    p.add_argument("--json", action="store_true", help="print JSON")


def _collective(args: argparse.Namespace) -> int:
    from workbench.errors import WorkbenchError
    from workbench.sim.collectives import OPS, collective
    from workbench.topology import load_cluster
    from workbench.units import parse_size

    c = load_cluster(args.cluster)
    if args.op not in OPS:
        raise WorkbenchError(f"--op: unknown collective {args.op!r} (choose from {', '.join(OPS)})")
    group = None
    if args.gpus is not None:
        if not 1 <= args.gpus <= c.num_gpus:
            raise WorkbenchError(f"--gpus: must be between 1 and {c.num_gpus} for this cluster, got {args.gpus}")
        group = c.gpus[:args.gpus]
    nbytes = parse_size(args.bytes, "--bytes")
    if args.flow:
        from workbench.sim.flows import flow_collective

        est, res = flow_collective(c, args.op, nbytes, group, args.algo)
        out = {**est.as_dict(), "flows": res.flows, "classes": len(res.classes),
               "max_link_utilisation": res.max_utilisation()}
    else:
        out = collective(c, args.op, nbytes, group, args.algo).as_dict()
    emit(out, args.json)
    return 0


def _cal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write", action="store_true", help="write the fitted values into datasets/net_params.csv")
    p.add_argument("--json", action="store_true", help="print JSON")


def _calibrate(args: argparse.Namespace) -> int:
    from workbench.calibration.fit import refit_collectives, refit_transfer_engine, save_params

    params, fits = refit_transfer_engine()
    params, coll = refit_collectives(params)
    rows = []
    for system, fit in fits.items():
        for r in fit.rows.to_dict("records"):
            rows.append({"system": system, "op": r["op"], "size_bytes": r["size_bytes"], "peers": r["peers"],
                         "err_Gbps": r["err_Gbps"], "err_Mops": r["err_Mops"], "err_post_us": r["err_post_us"]})
    out = {"fitted": {f.protocol: f.values for f in fits.values()},
           "collectives": coll[["op", "algo", "param", "value", "err"]].to_dict("records"),
           "max_abs_error": max(f.max_abs_error for f in fits.values()), "rows": rows}
    if args.write:
        keys = [(f.protocol, k) for f in fits.values() for k in f.values]
        keys += [(str(p).split(".")[0], str(p).split(".")[1]) for p in coll["param"]]
        out["written"] = save_params(params, keys)
    if args.json:
        emit(out, True)
    else:
        for proto, vals in out["fitted"].items():  # type: ignore[union-attr]
            print(proto, " ".join(f"{k}={v:.4g}" for k, v in vals.items()))
        print(f"max |error| over the TransferEngine table: {out['max_abs_error']:.1%}")
    return 0


COMMANDS = [
    Command("simulate", "p2p", "cost of a point-to-point write (single, paged, imm-only, scatter)", _p2p_args, _p2p),
    Command("simulate", "collective", "cost of a collective (closed form, or --flow with contention)",
            _coll_args, _collective),
    Command("calibrate", "net", "fit network parameters to the microbenchmark tables in datasets/measurements",
            _cal_args, _calibrate),
]
