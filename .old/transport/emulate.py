"""An emulated multi-host fabric on one Linux box: network namespaces joined by shaped veth links.

Each host is a network namespace with one interface (`10.77.0.<i+1>/24`) on a bridge that
lives in a switch namespace; both directions of every host link are shaped with
`tc htb` to the chosen rate (optionally `netem` delay). The transport then runs between
processes started inside the namespaces, over real TCP through the shaped links.
Needs root (CAP_NET_ADMIN) and iproute2 (`ip`, `tc`).

    with EmulatedCluster(hosts=2, rate_mbit=300) as c:
        print(measure(c, src=0, dst=1, nbytes=32 << 20))

Command line (used by the runner processes): `python -m transport.emulate serve|send ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

SUBNET = "10.77.0"


class EmulationUnavailable(RuntimeError):
    """Emulation cannot run here (not root, no iproute2, namespaces refused)."""


def check_available() -> None:
    """Raise `EmulationUnavailable` saying what is missing (root, `ip`, `tc`, namespaces)."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise EmulationUnavailable("emulate needs Linux network namespaces")
    if os.geteuid() != 0:
        raise EmulationUnavailable("emulate needs root (CAP_NET_ADMIN) to create network namespaces: "
                                   "run it with sudo, or as root in a VM/container with NET_ADMIN")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"emulate needs `{tool}` (install iproute2)")
    probe = f"wbprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        raise EmulationUnavailable(f"cannot create a network namespace: {r.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _sh(*argv: str) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        raise EmulationUnavailable(f"`{' '.join(argv)}` failed: {r.stderr.strip()}")


@dataclass
class EmulatedCluster:
    """`hosts` namespaces on a bridge, each link shaped to `rate_mbit` (and `delay_ms`) both ways."""

    hosts: int = 2
    rate_mbit: float = 300.0
    delay_ms: float = 0.0
    mtu: int = 9000  # jumbo frames, as on EFA/InfiniBand fabrics (header overhead ~0.7 %)
    prefix: str = field(default_factory=lambda: f"wb{os.getpid() % 100000}")
    up: bool = False

    def ns(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> EmulatedCluster:
        self.create()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.destroy()

    def _shape(self, ns: str, dev: str) -> None:
        rate = f"{self.rate_mbit:g}mbit"
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        _sh("ip", "netns", "exec", ns, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
            "rate", rate, "ceil", rate)
        if self.delay_ms > 0:
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:",
                "netem", "delay", f"{self.delay_ms:g}ms", "limit", "100000")

    def create(self) -> None:
        check_available()
        if not 2 <= self.hosts <= 64:
            raise ValueError(f"hosts: must be 2..64, got {self.hosts}")
        if self.rate_mbit <= 0:
            raise ValueError(f"rate: must be > 0 Mbit/s, got {self.rate_mbit}")
        self.up = True
        try:
            sw = self.switch
            _sh("ip", "netns", "add", sw)
            _sh("ip", "-n", sw, "link", "add", "br0", "mtu", str(self.mtu), "type", "bridge")
            _sh("ip", "-n", sw, "link", "set", "br0", "up")
            for i in range(self.hosts):
                ns, a, b = self.ns(i), f"{self.prefix}a{i}", f"{self.prefix}b{i}"
                _sh("ip", "netns", "add", ns)
                _sh("ip", "link", "add", a, "mtu", str(self.mtu), "type", "veth", "peer", "name", b, "mtu", str(self.mtu))
                _sh("ip", "link", "set", a, "netns", ns)
                _sh("ip", "link", "set", b, "netns", sw)
                _sh("ip", "-n", ns, "link", "set", a, "name", "eth0")
                _sh("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                _sh("ip", "-n", sw, "link", "set", b, "master", "br0")
                _sh("ip", "-n", sw, "link", "set", b, "up")
                self._shape(ns, "eth0")  # host -> switch
                self._shape(sw, b)  # switch -> host
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        if not self.up:
            return
        for ns in [self.ns(i) for i in range(self.hosts)] + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.up = False

    def popen(self, i: int, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        """Start `argv` inside host `i`'s namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv], text=True, **kw)

    def python(self, i: int, args: list[str], **kw: Any) -> subprocess.Popen[str]:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("WORKBENCH_TRANSPORT_SECRET", os.urandom(16).hex())
        return self.popen(i, [sys.executable, "-m", "transport.emulate", *args], env=env, **kw)


def measure(cluster: EmulatedCluster, src: int = 0, dst: int = 1, nbytes: int = 32 << 20, lanes: int = 2,
            write_bytes: int = 4 << 20, backend: str = "tcp", timeout: float = 120.0) -> dict[str, Any]:
    """Throughput of transport writes from host `src` to host `dst` across the shaped fabric."""
    env_secret = os.environ.setdefault("WORKBENCH_TRANSPORT_SECRET", os.urandom(16).hex())
    del env_secret
    server = cluster.python(dst, ["serve", "--host", cluster.ip(dst), "--bytes", str(write_bytes * 4),
                                  "--backend", backend], stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            raise EmulationUnavailable("the receiver in the destination namespace did not start")
        sender = cluster.python(src, ["send", "--host", cluster.ip(src), "--desc", line.strip(), "--bytes", str(nbytes),
                                      "--write-bytes", str(write_bytes), "--lanes", str(lanes), "--backend", backend],
                                stdout=subprocess.PIPE)
        out, _ = sender.communicate(timeout=timeout)
        if sender.returncode != 0:
            raise RuntimeError(f"sender failed with exit code {sender.returncode}")
        res = dict(json.loads(out.strip().splitlines()[-1]))
    finally:
        if server.stdin is not None:
            try:
                server.stdin.close()
            except OSError:
                pass
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    res.update({"src": cluster.ns(src), "dst": cluster.ns(dst), "rate_mbit": cluster.rate_mbit,
                "delay_ms": cluster.delay_ms, "ratio_to_shaped": res["Mbit_s"] / cluster.rate_mbit})
    return res


# ---------------------------------------------------------------------- processes inside namespaces
def _serve(args: argparse.Namespace) -> None:
    import numpy as np

    from transport.engine import Engine

    with Engine(args.backend, lanes=1, host=args.host) as eng:
        region = eng.register(np.zeros(args.bytes, np.uint8))
        print(region.descriptor.to_bytes().decode(), flush=True)
        sys.stdin.read()  # until the parent closes stdin


def _send(args: argparse.Namespace) -> None:
    import numpy as np

    from transport.descriptors import MemoryDescriptor
    from transport.engine import Engine

    desc = MemoryDescriptor.from_bytes(args.desc)
    wb = min(args.write_bytes, desc.nbytes // 4)
    with Engine(args.backend, lanes=args.lanes, host=args.host) as eng:
        src = eng.register(np.random.default_rng(0).integers(0, 255, wb, dtype=np.uint8))
        eng.write(src, desc, min(wb, 1 << 20)).result(60)  # connect + warm up
        n = max(1, args.bytes // wb)
        t0 = time.perf_counter()
        inflight = []
        for i in range(n):
            inflight.append(eng.write(src, desc, wb, dst_offset=(i % 4) * wb))
            if len(inflight) >= 3:
                inflight.pop(0).result(120)
        for t in inflight:
            t.result(120)
        dt = time.perf_counter() - t0
    moved = n * wb
    print(json.dumps({"bytes": moved, "seconds": dt, "Mbit_s": moved * 8 / dt / 1e6, "lanes": args.lanes}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m transport.emulate")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", required=True)
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--backend", default="tcp")
    c = sub.add_parser("send")
    c.add_argument("--host", required=True)
    c.add_argument("--desc", required=True)
    c.add_argument("--bytes", type=int, required=True)
    c.add_argument("--write-bytes", type=int, default=4 << 20)
    c.add_argument("--lanes", type=int, default=2)
    c.add_argument("--backend", default="tcp")
    args = p.parse_args(argv)
    _serve(args) if args.cmd == "serve" else _send(args)


if __name__ == "__main__":
    main()
