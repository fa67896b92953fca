"""The emulated cluster: namespaces on shaped links; the transport measures the shaped bandwidth."""

from __future__ import annotations

import subprocess
import sys

import pytest

from transport.emulate import EmulatedCluster, EmulationUnavailable, check_available, measure


def _why_not() -> str | None:
    try:
        check_available()
    except EmulationUnavailable as exc:
        return str(exc)
    return None


REASON = _why_not()
needs_root = pytest.mark.skipif(REASON is not None, reason=f"emulation unavailable: {REASON}")


@pytest.mark.root
@needs_root
@pytest.mark.timeout(180)
def test_transport_measures_shaped_bandwidth_within_10_percent() -> None:
    with EmulatedCluster(hosts=3, rate_mbit=250) as c:
        for src, dst in ((0, 1), (2, 0)):
            r = measure(c, src, dst, nbytes=16 << 20, lanes=2, timeout=120)
            assert 0.9 <= r["ratio_to_shaped"] <= 1.1, r
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert c.prefix not in out, "namespaces were not removed"


@pytest.mark.timeout(60)
def test_cli_refuses_clearly_without_root_or_bad_rate() -> None:
    cmd = [sys.executable, "-m", "workbench.cli", "emulate", "--rate", "fast"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and "--rate" in r.stderr
    if REASON is not None:
        r = subprocess.run([sys.executable, "-m", "workbench.cli", "emulate"], capture_output=True, text=True)
        assert r.returncode == 2 and "root" in r.stderr or "namespace" in r.stderr


def test_non_root_is_told_clearly(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import argparse

    import transport.emulate as em
    from workbench.commands import emulate as cmd
    from workbench.errors import WorkbenchError

    monkeypatch.setattr(em.os, "geteuid", lambda: 1000)
    with pytest.raises(EmulationUnavailable, match="root"):
        check_available()
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    with pytest.raises(WorkbenchError, match="needs root"):
        cmd.run(p.parse_args([]))
