"""Registered memory: adapt numpy arrays, torch CPU/CUDA tensors and bytearrays to byte regions.

A `Region` is the local handle of a registration. Host regions expose a flat writable
`memoryview` (sockets `recv_into` it directly: zero copy). CUDA regions expose a flat
`uint8` tensor; the TCP backend stages them through pinned host memory, the CUDA IPC
backend copies device to device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, cast

from transport.descriptors import MemoryDescriptor
from transport.errors import OutOfRange


def _torch() -> Any:
    return sys.modules.get("torch")


def is_cuda_tensor(obj: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor) and obj.is_cuda


@dataclass(eq=False)
class Region:
    """A registered buffer: its id, size, device and (host) view or (CUDA) flat byte tensor."""

    id: int
    nbytes: int
    device: str
    obj: Any  # the user's object, kept alive while registered
    view: memoryview | None = None  # host memory: flat, writable bytes
    flat: Any = None  # CUDA memory: flat uint8 torch tensor
    desc: MemoryDescriptor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def descriptor(self) -> MemoryDescriptor:
        """The serialisable remote descriptor to hand to peers (set by `Engine.register`)."""
        if self.desc is None:
            raise ValueError(f"region {self.id} is not registered with an engine")
        return self.desc

    @property
    def is_cuda(self) -> bool:
        return self.flat is not None

    def check(self, offset: int, length: int, what: str) -> None:
        """Raise `OutOfRange` unless [offset, offset+length) lies inside the region."""
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise OutOfRange(
                f"{what}: range [{offset}, {offset + length}) is outside the registered region "
                f"of {self.nbytes} bytes (region {self.id})")

    def __repr__(self) -> str:
        return f"Region(id={self.id}, nbytes={self.nbytes}, device={self.device!r})"


def adapt(obj: Any, region_id: int) -> Region:
    """A `Region` over `obj` without copying. Raises TypeError/ValueError naming what is wrong."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.is_contiguous():
            raise ValueError("register: the tensor must be contiguous (call .contiguous() first)")
        flat = obj.reshape(-1).view(torch.uint8)
        if obj.is_cuda:
            return Region(region_id, flat.numel(), f"cuda:{obj.device.index}", obj, flat=flat)
        return Region(region_id, flat.numel(), "cpu", obj, view=memoryview(cast(Any, flat.numpy())))
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    if np is not None and isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError("register: the array must be C-contiguous (np.ascontiguousarray)")
        if not obj.flags.writeable:
            raise ValueError("register: the array must be writeable")
        mv = memoryview(cast(Any, obj.reshape(-1).view(np.uint8)))
        return Region(region_id, mv.nbytes, "cpu", obj, view=mv)
    if isinstance(obj, (bytearray, memoryview)):
        mv = memoryview(obj)
        if mv.readonly:
            raise ValueError("register: the buffer must be writeable")
        if not mv.c_contiguous:
            raise ValueError("register: the buffer must be contiguous")
        mv = mv.cast("B")
        return Region(region_id, mv.nbytes, "cpu", obj, view=mv)
    raise TypeError(f"register: cannot register {type(obj).__name__}; "
                    "use a numpy array, a torch tensor (CPU or CUDA), a bytearray or a writable memoryview")
