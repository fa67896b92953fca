"""The traffic benchmark in a process of its own (`workbench.serve.client.ClientProcess`): it measures the real
server, reports its own CPU, fails with a clear error when the server is not there or the client dies, and leaves
no process behind."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("aiohttp")

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.serve.client import ClientProcess  # noqa: E402


@pytest.fixture(scope="module")
def service(tiny_server: Any) -> Any:
    return tiny_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_client_process_measures_the_server(service: Any) -> None:
    with ClientProcess() as client:
        pid = client.proc.pid
        assert pid != os.getpid()
        r0 = len(service.app.records)
        res = client.run(service.url, "concurrency=3,isl=8,osl=4,requests=9", tokenizer=service.path)
        again = client.run(service.url, "concurrency=2,isl=8,osl=3,requests=4", tokenizer=service.path)
    assert res.metrics["completed"] == 9 and res.metrics["failed"] == 0
    assert again.metrics["completed"] == 4          # one process, any number of benchmarks
    assert len(service.app.records) - r0 == 13 + 2   # the server saw them all, and each run's initial test request
    assert (res.requests["output_tokens"] == 4).all()
    assert res.meta["client_cpu_s"] > res.meta["setup_cpu_s"] >= res.meta["prompts_cpu_s"] >= 0
    assert not _alive(pid)   # stopped and reaped


def test_no_server_is_a_clear_error_soon() -> None:
    t0 = time.monotonic()
    with ClientProcess() as client, pytest.raises(WorkbenchError, match="cannot list models"):
        client.run("http://127.0.0.1:9", "concurrency=1,isl=4,osl=2,requests=1", limit=60)
    assert time.monotonic() - t0 < 60


def test_a_client_that_dies_fails_the_call(service: Any) -> None:
    client = ClientProcess().start()
    try:
        # kill it while it runs a long benchmark: the call fails naming the cause, within a bounded time
        threading.Timer(1.5, lambda: os.kill(client.proc.pid, 9)).start()
        t0 = time.monotonic()
        with pytest.raises(WorkbenchError, match="traffic client process died"):
            client.run(service.url, "concurrency=1,isl=8,osl=64,requests=500", tokenizer=service.path, limit=120)
        assert time.monotonic() - t0 < 60
    finally:
        client.stop()
    assert client.proc is None


def test_a_cancelled_serving_run_fails_soon_and_stops_everything(service: Any) -> None:
    """`RunHandle.cancel()` of a serving run ends its traffic now; `wait` raises `RunFailed` saying so."""
    from workbench.errors import RunFailed
    from workbench.serve.runner import start

    h = start(str(service.path), "concurrency=1,isl=8,osl=64,requests=400", threads=1, page_size=16,
              max_batched_tokens=256, max_seqs=16)
    for _ in h.updates():   # the traffic is running once the first requests finished
        if h.updates_seen >= 2:
            break
    t0 = time.monotonic()
    h.cancel()
    with pytest.raises(RunFailed, match="cancelled"):
        h.wait(timeout=60)
    assert time.monotonic() - t0 < 30
