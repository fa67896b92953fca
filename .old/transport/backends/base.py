"""The backend protocol: what a data path (`cuda_ipc`, `nixl`, …) implements to plug into `Engine`.

The engine owns registration ids, descriptors, the authenticated TCP mesh (control messages,
acks, imm notices), timeouts and the `Transfer` objects. A data path only moves bytes:

- `describe(region)` adds backend data to a new region's descriptor (an IPC handle, NIXL
  metadata) and `forget(region)` undoes it; `forget_remote(peer, region)` drops whatever was
  opened for a peer's region that the peer deregistered;
- `handles(src, dst)` says whether this path can move bytes from `src` to `dst` (else the
  engine falls back to its TCP lanes);
- `submit(t, src, dst, pieces, done, imm)` starts moving `pieces` and calls `done(None)` once
  every byte is in the destination (or `done(exc)`), from any thread; it must not block on
  the transfer and must not raise for a transfer failure (call `done(exc)`). A path whose
  `delivers_imm` is True is given the immediate and delivers it to the peer itself (a NIXL
  notification); otherwise the engine sends it as a notice over its control socket. A path
  whose `confirms_delivery` is True calls `done(None)` only once the bytes are in the peer's
  memory, so the engine needs no acknowledgement round trip;
- `alloc(nbytes, shm_name)` returns memory the path moves without copies, or None;
- `close()` releases everything (pending `done` callbacks may then never fire).

`Pieces` lists what to copy as three int64 arrays (source offset, destination offset,
length), so a paged write of a whole layer or a batch of many writes is one submission.
A new backend subclasses `DataPath` and adds its name to `BACKENDS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

    from transport.completion import Transfer
    from transport.descriptors import EngineAddress, MemoryDescriptor
    from transport.memory import Region


class EngineView(Protocol):
    """What a data path may use of its engine."""

    name: str
    lanes: int
    address: EngineAddress

    def _log(self, text: str) -> None: ...


@dataclass(frozen=True)
class Pieces:
    """Byte ranges to copy: `src[i]` → `dst[i]`, `length[i]` bytes each (int64 arrays of one length).

    `page` is the common length when every piece has the same one (paged writes), else 0.
    """

    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray
    page: int = 0

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @property
    def nbytes(self) -> int:
        return self.page * int(self.src.shape[0]) if self.page else int(self.length.sum())

    @classmethod
    def one(cls, src: int, dst: int, length: int) -> Pieces:
        import numpy as np

        return cls(np.array([src], np.int64), np.array([dst], np.int64), np.array([length], np.int64), length)

    def tuples(self) -> list[tuple[int, int, int]]:
        return list(zip(self.src.tolist(), self.dst.tolist(), self.length.tolist()))


Done = Callable[[BaseException | None], None]


class DataPath(ABC):
    """A backend's data path (see the module docstring)."""

    name = ""

    def __init__(self, engine: EngineView) -> None:
        self.engine = engine
        self.lanes = engine.lanes

    @abstractmethod
    def describe(self, region: Region) -> dict[str, Any]:
        """Backend data for a new region's descriptor (JSON-safe), or {} if this path cannot move it."""

    def forget(self, region: Region) -> None:
        """The region was deregistered here."""
        return None

    def forget_remote(self, peer: str, region: int) -> None:
        """The peer deregistered its region: drop anything opened for it."""
        return None

    @abstractmethod
    def handles(self, src: Region, dst: MemoryDescriptor) -> bool:
        """True when this path moves bytes from `src` into `dst`."""

    @abstractmethod
    def submit(self, t: Transfer, src: Region, dst: MemoryDescriptor, pieces: Pieces, done: Done,
               imm: int | None = None) -> None:
        """Start copying `pieces`; call `done(None)` when every byte landed, `done(exc)` on failure.
        `imm` is given only to a path that `delivers_imm`."""

    def alloc(self, nbytes: int, shm_name: str | None = None) -> Any:
        """Memory this path moves without copies, or None for plain host memory."""
        return None

    @property
    def confirms_delivery(self) -> bool:
        """True when `done(None)` means the bytes are in the peer's memory (no ack round trip needed)."""
        return False

    @property
    def delivers_imm(self) -> bool:
        """True when the path delivers the immediate with the data (the engine sends no notice)."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Release everything."""
