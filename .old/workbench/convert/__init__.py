"""Checkpoint → model package laid out by a placement (`convert`), and reading packages back
(`read_manifest`, `load_stage`, `verify`). Imports torch/safetensors only when used."""

from __future__ import annotations

from typing import Any

__all__ = ["CONVERTER_VERSION", "convert", "load_package", "load_stage", "read_manifest", "verify"]


def __getattr__(name: str) -> Any:
    if name in ("convert", "CONVERTER_VERSION"):
        from workbench.convert import package

        return getattr(package, name)
    if name in ("load_stage", "load_package", "read_manifest", "verify"):
        from workbench.convert import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'workbench.convert' has no attribute {name!r}")
