"""Fixtures shared by the test files: a seeded rng, the in-process CLI, the browser, the CUDA check.

- `rng`: a numpy Generator on a fresh seed (printed, so a failure can be replayed);
- `cli`: run `workbench …` in this process: `code, out, err = cli("simulate", "train", …)`
  (also `.returncode`, `.stdout`, `.stderr`); a real subprocess is only needed where the test is
  about the process itself (exit without traceback, signals);
- `chromium`: the keyword arguments of Playwright's `chromium.launch` for Debian's chromium
  (skips when chromium or Playwright is missing);
- `cuda_available()`, and tests marked `gpu` skip by themselves where no CUDA GPU exists
  (torch is imported only when a `gpu` test was collected).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def rng() -> np.random.Generator:
    """A generator on a fresh random seed each run (printed, so a failure can be replayed)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return np.random.default_rng(seed)


class CliRun(NamedTuple):
    """What one in-process `workbench …` call did: exit code, standard output, standard error."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliRun:
    """`workbench *args` in this process (argparse errors included: they exit 2 as in a shell)."""
    from workbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help, unknown options
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return CliRun(int(code), out.getvalue(), err.getvalue())


@pytest.fixture
def cli() -> Callable[..., CliRun]:
    """`cli("topology", "show", "aws-p5") -> (code, stdout, stderr)`, run in this process."""
    return run_cli


@pytest.fixture(scope="session")
def chromium() -> dict[str, Any]:
    """Keyword arguments for `playwright.sync_api...chromium.launch(**chromium)` (Debian's chromium)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must install chromium (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is missing: pip install playwright")
    return {"executable_path": CHROMIUM, "args": list(CHROMIUM_FLAGS), "headless": True, "timeout": 60_000}


@cache
def cuda_available() -> bool:
    """True when torch sees a CUDA GPU (False without torch)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip where no CUDA GPU exists (one check, only if such a test was collected)."""
    gpu_items = [it for it in items if it.get_closest_marker("gpu") is not None]
    if gpu_items and not cuda_available():
        skip = pytest.mark.skip(reason="no CUDA GPU")
        for it in gpu_items:
            it.add_marker(skip)
