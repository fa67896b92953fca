"""Errors of the kernels package (it imports nothing from `workbench`, so it can ship on its own).

`KernelInputError` is a `ValueError` whose message names the argument, the bad value and what
is allowed; `ExtraMissing` is an `ImportError` naming the optional package to install.
"""

from __future__ import annotations

import importlib
from typing import Any


class KernelInputError(ValueError):
    """A bad argument to a kernel (shape, dtype, index range); the message names the argument."""


class ExtraMissing(ImportError):
    """An optional package (CuPy, numba) is needed but not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed; install the '{extra}' extra: pip install 'workbench[{extra}]'")


def require(module: str, extra: str) -> Any:
    """Import an optional module, or raise `ExtraMissing` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExtraMissing(module.split(".")[0], extra) from exc
