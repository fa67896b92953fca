"""Serialisable addresses of engines and remote descriptors of registered memory.

Both are frozen value objects that round-trip through `to_bytes()` / `from_bytes()` (JSON),
so they can travel over any channel (a pipe, a file, torch.distributed, the transport's own
send/recv). A descriptor carries its engine's address, so a write to it connects on demand.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from transport.errors import UnknownDescriptor


@dataclass(frozen=True)
class EngineAddress:
    """Where an engine listens: its unique `name`, `host`, TCP `port`, backend and lane count."""

    name: str
    host: str
    port: int
    backend: str = "tcp"
    lanes: int = 1
    hostid: str = ""  # identifies the machine (for same-host backends such as cuda_ipc)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineAddress:
        try:
            return cls(**d)
        except TypeError as exc:
            raise UnknownDescriptor(f"not an engine address: {d!r} ({exc})") from exc

    @classmethod
    def from_bytes(cls, b: bytes | str) -> EngineAddress:
        return cls.from_dict(json.loads(b))


@dataclass(frozen=True)
class MemoryDescriptor:
    """A remote handle of a registered region: owner address, region id, size and device.

    `extra` holds backend data (a CUDA IPC handle, NIXL metadata) as JSON-safe values.
    """

    address: EngineAddress
    region: int
    nbytes: int
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def engine(self) -> str:
        return self.address.name

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address.to_dict(), "region": self.region, "nbytes": self.nbytes,
                "device": self.device, "extra": self.extra}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryDescriptor:
        try:
            return cls(address=EngineAddress.from_dict(d["address"]), region=int(d["region"]),
                       nbytes=int(d["nbytes"]), device=str(d.get("device", "cpu")),
                       extra=dict(d.get("extra", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise UnknownDescriptor(f"not a memory descriptor: {exc}") from exc

    @classmethod
    def from_bytes(cls, b: bytes | str) -> MemoryDescriptor:
        return cls.from_dict(json.loads(b))

    def __repr__(self) -> str:
        return (f"MemoryDescriptor(engine={self.address.name!r}, region={self.region}, "
                f"nbytes={self.nbytes}, device={self.device!r})")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())
