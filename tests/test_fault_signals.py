"""Fault injection on a real `workbench run train` (issue 12): Ctrl-C, SIGTERM or SIGKILL to the
launcher leaves no rank process and no listening port behind; a run past its timeout blames no
innocent rank and names the folder of the rank logs on its own line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")]

WORKBENCH = [sys.executable, "-m", "workbench.cli"]
RUN = ["run", "train", "--plan", "dp=2", "--no-sim", "--overhead", "none",
       "--model", "gpt:layers=2,hidden=32,heads=2,vocab=64,seq=16"]


def tagged(tag: str) -> list[int]:
    """Processes whose environment carries `tag` (the launcher and every rank it started)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if tag.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(int(pid))
            except OSError:
                continue
    return found


def listening(pids: list[int] | None = None) -> set[int]:
    """TCP ports in LISTEN state (of `pids` only, when given)."""
    inodes: set[str] | None = None
    if pids is not None:
        inodes = set()
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
            except OSError:
                continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and (inodes is None or cols[9] in inodes):
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def start(tag: str, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, WORKBENCH_TEST_TAG=tag, PYTHONUNBUFFERED="1")
    return subprocess.Popen([*WORKBENCH, *RUN, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_ranks(proc: subprocess.Popen[bytes], tag: str, n: int = 2, timeout: float = 120) -> list[int]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        ranks = [p for p in tagged(tag) if p != proc.pid]
        if len(ranks) >= n and listening(ranks):  # rendezvous is up: the ranks hold ports
            return ranks
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.3)
    raise AssertionError("the ranks did not start")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_signal_to_the_launcher_leaves_nothing_running(sig: int, code: int) -> None:
    tag = uuid.uuid4().hex
    proc = start(tag, "--steps", "100000")
    try:
        ranks = wait_for_ranks(proc, tag)
        ports = listening([proc.pid, *ranks])
        assert ports, "the run should hold a listening port (telemetry, rendezvous)"
        time.sleep(1.0)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, err.decode()[-2000:]
        if sig != signal.SIGKILL:
            assert "Traceback" not in err.decode(), err.decode()[-2000:]
        deadline = time.time() + 10  # a parent-death signal is immediate; allow for a loaded machine
        while (tagged(tag) or ports & listening()) and time.time() < deadline:
            time.sleep(0.2)
        assert tagged(tag) == [], "rank processes outlived the launcher"
        assert not ports & listening(), f"ports still listening: {ports & listening()}"
    finally:
        for pid in tagged(tag):
            os.kill(pid, signal.SIGKILL)


def test_timeout_blames_no_innocent_rank_and_names_the_logs() -> None:
    tag = uuid.uuid4().hex
    proc = start(tag, "--steps", "100000", "--timeout", "4")
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        for pid in tagged(tag):
            os.kill(pid, signal.SIGKILL)
    text = err.decode()
    assert proc.returncode == 1, text[-2000:]
    lines = text.splitlines()
    failure = next(line for line in lines if line.startswith("error: "))
    assert "timeout of 4 s" in failure
    assert "rank 0 failed" not in failure  # every rank was equally far: the run, not rank 0, was slow
    logs = next(line for line in lines if line.startswith("rank logs: "))
    assert Path(logs.split(": ", 1)[1], "rank0.log").is_file()
    assert tagged(tag) == []


def test_a_slow_but_healthy_rank_is_not_a_hang() -> None:
    """Steps whose telemetry is quiet for longer than the stall timeout, while the ranks compute."""
    import numpy as np

    from workbench.runner.launcher import run_train

    # a model whose steps leave telemetry quiet for several stall timeouts even on a fast core (hidden 512 left
    # gaps of 0.21 s on a 2-vCPU Xeon: too close to a 0.25 s timeout to test anything)
    res = run_train(model="gpt:layers=2,hidden=768,heads=12,vocab=256,seq=128", plan="dp=2,mbs=4,gbs=8", steps=2,
                    stall_timeout=0.15, timeout=300)
    assert res.metrics["steps"] == 2
    ends = np.sort(res.events["end"].to_numpy())
    assert np.max(np.diff(ends)) > 0.15, "the test needs telemetry gaps longer than the stall timeout"


def test_a_killed_rank_is_reported_with_partial_results_and_logs() -> None:
    import threading

    tag = uuid.uuid4().hex
    proc = start(tag, "--steps", "100000")
    got = bytearray()

    def read() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(4096):  # type: ignore[attr-defined]
            got.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ranks = wait_for_ranks(proc, tag)
        t0 = time.time()
        while b"step 3/" not in got and time.time() - t0 < 120:  # some steps finish
            time.sleep(0.2)
        rank1 = next(p for p in ranks if b"\0RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
        os.kill(rank1, signal.SIGKILL)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        err = bytes(got)
    finally:
        for pid in tagged(tag):
            os.kill(pid, signal.SIGKILL)
    lines = err.decode().splitlines()
    assert proc.returncode == 1, err.decode()[-2000:]
    assert any(line.startswith("error: rank 1 failed: killed by signal SIGKILL") for line in lines), lines[-10:]
    partial = next((line for line in lines if line.startswith("partial results: ")), "\n".join(lines[-5:]))
    assert "steps finished by every rank" in partial and "losses: " in partial
    logs = next(line for line in lines if line.startswith("rank logs: "))
    assert Path(logs.split(": ", 1)[1], "rank1.log").is_file()
    assert "Traceback (most recent call last)" not in "\n".join(lines[:2])


def test_ctrl_c_in_a_notebook_stops_the_ranks() -> None:
    """`wb.run(job)` interrupted (Ctrl-C in a script, Interrupt in Jupyter) stops its ranks at once."""
    import _thread
    import threading

    from workbench.runner.launcher import start_train

    h = start_train(model="gpt:layers=2,hidden=32,heads=2,vocab=64,seq=16", plan="dp=2,mbs=2,gbs=8", steps=100_000)
    for u in h.updates(timeout=120):
        if u.step >= 1:
            break
    threading.Timer(0.5, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        h.wait(timeout=60)
    for pid in h.pids.values():  # stopped before the interrupt propagated, not at interpreter exit
        assert not Path(f"/proc/{pid}").exists() or b"Z" in Path(f"/proc/{pid}/stat").read_bytes().split(b") ")[1][:1]
