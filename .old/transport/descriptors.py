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

MAX_DESCRIPTOR_BYTES = 1 << 20  # a descriptor is a few hundred bytes (a NIXL one a few KiB)
REGION_LIMIT = 1 << 32  # region ids travel as u32
NBYTES_LIMIT = 1 << 62


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise UnknownDescriptor(f"not a memory descriptor: {key} must be an integer in [{lo}, {hi}), "
                                f"got {str(v)[:40]!r}")
    return v


def _json(b: bytes | str, what: str) -> dict[str, Any]:
    if len(b) > MAX_DESCRIPTOR_BYTES:
        raise UnknownDescriptor(f"not {what}: {len(b)} bytes (a descriptor is at most {MAX_DESCRIPTOR_BYTES})")
    try:
        d = json.loads(b)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UnknownDescriptor(f"not {what}: not JSON ({str(exc)[:80]})") from None
    if not isinstance(d, dict):
        raise UnknownDescriptor(f"not {what}: expected a JSON object, got {type(d).__name__}")
    return d


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
        if not isinstance(d, dict):
            raise UnknownDescriptor(f"not an engine address: expected an object, got {type(d).__name__}")
        for key in ("name", "host"):
            if not isinstance(d.get(key), str):
                raise UnknownDescriptor(f"not an engine address: {key} must be a string")
        port = _int(d, "port", 0, 65536)
        lanes = _int(d, "lanes", 1, 65) if "lanes" in d else 1
        backend, hostid = d.get("backend", "tcp"), d.get("hostid", "")
        if not isinstance(backend, str) or not isinstance(hostid, str):
            raise UnknownDescriptor("not an engine address: backend and hostid must be strings")
        unknown = set(d) - {"name", "host", "port", "backend", "lanes", "hostid"}
        if unknown:
            raise UnknownDescriptor(f"not an engine address: unknown fields {sorted(unknown)[:5]}")
        return cls(d["name"], d["host"], port, backend, lanes, hostid)

    @classmethod
    def from_bytes(cls, b: bytes | str) -> EngineAddress:
        return cls.from_dict(_json(b, "an engine address"))


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
        if not isinstance(d, dict):
            raise UnknownDescriptor(f"not a memory descriptor: expected an object, got {type(d).__name__}")
        if "address" not in d:
            raise UnknownDescriptor("not a memory descriptor: address is missing")
        device, extra = d.get("device", "cpu"), d.get("extra", {})
        if not isinstance(device, str) or not isinstance(extra, dict):
            raise UnknownDescriptor("not a memory descriptor: device must be a string and extra an object")
        return cls(address=EngineAddress.from_dict(d["address"]), region=_int(d, "region", 0, REGION_LIMIT),
                   nbytes=_int(d, "nbytes", 0, NBYTES_LIMIT), device=device, extra=dict(extra))

    @classmethod
    def from_bytes(cls, b: bytes | str) -> MemoryDescriptor:
        return cls.from_dict(_json(b, "a memory descriptor"))

    def __repr__(self) -> str:
        return (f"MemoryDescriptor(engine={self.address.name!r}, region={self.region}, "
                f"nbytes={self.nbytes}, device={self.device!r})")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())
