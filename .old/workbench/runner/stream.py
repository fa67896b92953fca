"""The live stream of a run (moved to `workbench.core.stream`; kept for old imports)."""

from workbench.core.stream import RunHandle, Update

__all__ = ["RunHandle", "Update"]
