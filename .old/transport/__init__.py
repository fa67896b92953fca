"""One-sided point-to-point transfer engine with TransferEngine semantics (see docs/transport.md).

    from transport import Engine
    eng = Engine("tcp", lanes=2)          # or "cuda_ipc", "nixl"
    region = eng.register(array)          # -> Region; region.descriptor goes to peers
    eng.write(region, remote_descriptor, nbytes, imm=7).result(timeout=10)
    eng.expect(7, n=4).result(timeout=10) # completion by counting immediates
"""

from transport.completion import ImmCounter, Transfer
from transport.descriptors import EngineAddress, MemoryDescriptor
from transport.engine import Engine, Message, PeerGroup, Target, wait_all
from transport.errors import (
    AuthError,
    BackendUnavailable,
    Cancelled,
    InvalidArgument,
    OutOfRange,
    PeerGone,
    ProtocolError,
    TransferTimeout,
    TransportError,
    UnknownDescriptor,
)
from transport.memory import Region

__all__ = [
    "AuthError", "BackendUnavailable", "Cancelled", "Engine", "EngineAddress", "ImmCounter", "InvalidArgument", "MemoryDescriptor",
    "Message", "OutOfRange", "PeerGone", "PeerGroup", "ProtocolError", "Region", "Target", "Transfer", "TransferTimeout",
    "TransportError", "UnknownDescriptor", "wait_all",
]
