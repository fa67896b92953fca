"""One vocabulary of ops: their names, kinds and the collective algebra (bus and wire factors).

Every engine labels its events with these names, so `compare` needs no alias table beyond
`normalise_op` for names typed by hand or read from other tools' traces. Sizes follow
nccl-tests: `nbytes` is the per-rank buffer of the op (all-reduce: the whole tensor;
all-gather: the gathered output; reduce-scatter: the input before scattering).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
POINT_TO_POINT = ("send_recv", "recv_wait", "kv_transfer", "offload")
COMPUTE = ("forward", "backward", "recompute", "optimizer", "embedding", "head", "prefill", "decode",
           "attention", "gemm")


@dataclass(frozen=True)
class Op:
    """One op: the event kind it is recorded under and its ring algebra on `n` ranks."""

    name: str
    kind: str  # compute | collective | transfer

    def bus_factor(self, n: int) -> float:
        """nccl-tests' busbw / algbw factor."""
        if n <= 1:
            return 1.0 if self.name in ("broadcast", "send_recv") else 0.0
        if self.name == "all_reduce":
            return 2.0 * (n - 1) / n
        if self.name in ("all_gather", "reduce_scatter", "all_to_all"):
            return (n - 1) / n
        return 1.0

    def wire_factor(self, n: int) -> float:
        """Bytes each rank puts on the wire per byte of `nbytes` (ring algorithms; p2p: the message)."""
        if self.kind != "collective":
            return 1.0
        return self.bus_factor(n) if n > 1 else 0.0

    def ring_steps(self, n: int) -> int:
        """Latency-bound steps of the ring algorithm (1 for point-to-point)."""
        if self.name == "all_reduce":
            return max(2 * (n - 1), 1)
        if self.name in ("all_gather", "reduce_scatter", "all_to_all", "broadcast"):
            return max(n - 1, 1)
        return 1


OPS: dict[str, Op] = {
    **{n: Op(n, "collective") for n in COLLECTIVES},
    **{n: Op(n, "transfer") for n in POINT_TO_POINT},
    **{n: Op(n, "compute") for n in COMPUTE},
}

_ALIASES = {
    "fwd": "forward", "forward_compute": "forward", "bwd": "backward", "backward_compute": "backward",
    "allreduce": "all_reduce", "all-reduce": "all_reduce", "allgather": "all_gather", "all-gather": "all_gather",
    "reducescatter": "reduce_scatter", "reduce-scatter": "reduce_scatter", "alltoall": "all_to_all",
    "optim": "optimizer", "optimizer_step": "optimizer", "adam": "optimizer", "p2p": "send_recv",
    "sendrecv": "send_recv", "send": "send_recv", "send_activation": "send_recv", "send_gradient": "send_recv",
    "recv_activation": "recv_wait", "recv_gradient": "recv_wait", "recv": "recv_wait",
}


def normalise_op(op: object) -> str:
    """A canonical op name (`fwd` → `forward`, `AllReduce` → `all_reduce`, `send_activation` → `send_recv`)."""
    s = re.sub(r"\s+", "_", str(op).strip().lower())
    return _ALIASES.get(s, _ALIASES.get(s.replace("_", ""), s))


def op(name: str) -> Op:
    """The `Op` of a (possibly aliased) name; unknown names are treated as compute spans."""
    n = normalise_op(name)
    return OPS.get(n, Op(n, "compute"))


def bus_factor(name: str, n: int) -> float:
    return op(name).bus_factor(n)


def wire_bytes(name: str, nbytes: float, n: int) -> float:
    """Bytes each rank sends for op `name` of nccl-tests size `nbytes` on `n` ranks."""
    return nbytes * op(name).wire_factor(n) if op(name).kind == "collective" else float(nbytes)
