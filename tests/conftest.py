"""Fixtures shared by the test files: a seeded rng, the in-process CLI, the browser, the CUDA check.

- `rng`: a numpy Generator on a fresh seed (printed, so a failure can be replayed);
- `cli`: run `workbench …` in this process: `code, out, err = cli("simulate", "train", …)`
  (also `.returncode`, `.stdout`, `.stderr`); a real subprocess is only needed where the test is
  about the process itself (exit without traceback, signals);
- `chromium`: the keyword arguments of Playwright's `chromium.launch` for Debian's chromium
  (skips when chromium or Playwright is missing);
- `jupyter_lab(*notebooks)`: a JupyterLab server on 127.0.0.1 serving copies of notebooks,
  stopped with its kernels at teardown;
- `tiny_server`: the real OpenAI-compatible server (one CPU worker) on a random 2-layer Llama, for the module;
- `cuda_available()`, and tests marked `gpu` skip by themselves where no CUDA GPU exists
  (torch is imported only when a `gpu` test was collected).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from workbench.serve.checkpoints import random_llama
    from workbench.serve.service import start_service

    path = random_llama(tmp_path_factory.mktemp("tiny"), hidden=64, layers=2, heads=4, kv_heads=2,
                        intermediate=128, dtype="float32")
    with start_service(path, page_size=16, max_batched_tokens=256, max_seqs=16, threads=1) as svc:
        yield svc


@pytest.fixture(scope="session")
def chromium() -> dict[str, Any]:
    """Keyword arguments for `playwright.sync_api...chromium.launch(**chromium)` (Debian's chromium)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: CI must install chromium (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is missing: pip install playwright")
    return {"executable_path": CHROMIUM, "args": list(CHROMIUM_FLAGS), "headless": True, "timeout": 60_000}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab(NamedTuple):
    """A running JupyterLab: its base URL, token, and the folder holding the notebook copies."""

    base: str
    token: str
    dir: Path

    def url(self, notebook: str) -> str:
        return f"{self.base}/lab/tree/{notebook}?reset&token={self.token}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: it and its kernels
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def jupyter_lab(tmp_path: Path, chromium: dict[str, Any]) -> Iterator[Callable[..., Lab]]:
    """`jupyter_lab(*notebooks) -> Lab`: JupyterLab on a free port of 127.0.0.1 with a random token, serving
    copies of `notebooks`, every cell drawn (no virtual scrolling), no news pop-up, `window.jupyterapp`
    exposed for the page's scripts. Stopped with its kernels at teardown. Asks for `chromium` first, so it
    skips before starting a server where no browser can run."""
    started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(*notebooks: Path) -> Lab:
        root = tmp_path / f"lab{len(started)}"
        work = root / "nb"
        work.mkdir(parents=True)
        for nb in notebooks:
            shutil.copy(nb, work / Path(nb).name)
        settings = root / "settings"
        for ext, body in (("@jupyterlab/notebook-extension/tracker", {"windowingMode": "none"}),
                          ("@jupyterlab/apputils-extension/notification", {"fetchNews": "false",
                                                                             "checkForUpdates": False})):
            f = settings / f"{ext}.jupyterlab-settings"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(body))
        port, token = free_port(), secrets.token_hex(16)
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "config"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
               "PYTHONUNBUFFERED": "1"}
        exe = Path(sys.executable).with_name("jupyter")
        log = open(root / "lab.log", "w")  # noqa: SIM115 - closed at teardown
        proc = subprocess.Popen(
            [str(exe) if exe.exists() else "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
             f"--IdentityProvider.token={token}", f"--notebook-dir={work}", "--LabApp.expose_app_in_browser=True",
             f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={root / 'workspaces'}",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        started.append((proc, log))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        return Lab(base, token, work)
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"jupyter lab did not start within 90 s:\n{(root / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)

    try:
        yield start
    finally:
        for proc, log in started:
            _stop(proc)
            log.close()


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
