"""Errors of a real run (kept here for old imports; the class lives in `workbench.errors`)."""

from workbench.errors import RunFailed

__all__ = ["RunFailed"]
