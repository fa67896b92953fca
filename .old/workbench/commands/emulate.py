"""`workbench emulate`: network namespaces as hosts on shaped links, the transport measured across them."""

from __future__ import annotations

import argparse

from workbench.commands import Command, emit
from workbench.errors import WorkbenchError


def _rate_mbit(text: str) -> float:
    t = text.strip().lower().replace("/s", "").replace("bps", "bit")
    for unit, scale in (("gbit", 1000.0), ("mbit", 1.0), ("kbit", 0.001), ("g", 1000.0), ("m", 1.0)):
        if t.endswith(unit):
            t, mul = t[: -len(unit)], scale
            break
    else:
        mul = 1.0
    from workbench.validate import number, show

    try:
        v = number(t, "--rate", 0.0, 1e7) * mul
    except WorkbenchError:
        raise WorkbenchError(f"--rate: cannot read {show(text)} (use e.g. 300mbit, 1gbit or a number of Mbit/s > 0)") from None
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=2, help="emulated hosts (network namespaces), 2..64")
    p.add_argument("--rate", default="300mbit", help="bandwidth of every host link, each direction (e.g. 300mbit, 1gbit)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added to every host link (netem)")
    p.add_argument("--bytes", default="32MiB", help="bytes moved per measured pair")
    p.add_argument("--lanes", type=int, default=2, help="transport lanes (sockets) per peer")
    p.add_argument("--mtu", type=int, default=9000, help="MTU of the emulated links")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from transport.emulate import EmulatedCluster, EmulationUnavailable, check_available, measure
    from workbench.units import parse_size

    if not 2 <= args.hosts <= 64:
        raise WorkbenchError(f"--hosts: must be 2..64, got {args.hosts}")
    if not 1 <= args.lanes <= 64:
        raise WorkbenchError(f"--lanes: must be 1..64, got {args.lanes}")
    rate = _rate_mbit(args.rate)
    nbytes = parse_size(args.bytes, field="--bytes")
    try:
        check_available()
    except EmulationUnavailable as exc:
        raise WorkbenchError(f"emulate: {exc}") from None
    rows = []
    with EmulatedCluster(hosts=args.hosts, rate_mbit=rate, delay_ms=args.delay_ms, mtu=args.mtu) as c:
        for dst in range(1, args.hosts):
            rows.append(measure(c, 0, dst, nbytes=nbytes, lanes=args.lanes))
    if args.json:
        emit(rows, True)
    else:
        print(f"{args.hosts} hosts (network namespaces) on a bridge, links shaped to {rate:g} Mbit/s"
              + (f", +{args.delay_ms:g} ms" if args.delay_ms else ""))
        for r in rows:
            print(f"  {r['src']} -> {r['dst']}: {r['Mbit_s']:.1f} Mbit/s measured "
                  f"({100 * r['ratio_to_shaped']:.1f} % of shaped), {r['bytes']} B in {r['seconds']:.2f} s")
    return 0


COMMANDS = [Command("emulate", None, "emulate a multi-host cluster with network namespaces and shaped links "
                    "(needs root) and measure the transport across it", add_arguments, run)]
