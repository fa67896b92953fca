"""`workbench run train --json`: the keys the issue asks for, from a real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_train_json_has_the_promised_fields(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "t.json"
    p = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "train", "--plan", "dp=2,mbs=2,gbs=8",
                        "--model", "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32", "--steps", "8",
                        "--trace", str(trace), "--json"], capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    for key in ("losses", "step_seconds", "events", "updates_per_s", "telemetry_overhead_pct", "sim_step_seconds",
                "sim_error_pct_before", "sim_error_pct_after", "ranks"):
        assert key in d, key
    assert d["ranks"] == 2 and len(d["losses"]) == 8 and d["losses"][-1] < d["losses"][0]
    assert d["updates_per_s"] >= 10 and d["events"] > 0 and d["telemetry_overhead_pct"] is not None
    assert d["losses_match_without_telemetry"] is True
    assert json.loads(trace.read_text())["traceEvents"]


@pytest.mark.slow
def test_bad_plan_is_a_clean_error() -> None:
    p = subprocess.run([sys.executable, "-m", "workbench.cli", "run", "train", "--plan", "tp=3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "plan.tp" in p.stderr


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_same_worker_under_plain_torchrun_and_load_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import shutil

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    from workbench.runner import load_run
    from workbench.runner.launcher import _free_port
    from workbench.topology import discover

    out = tmp_path / "job"
    subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "workbench.runner.worker",
                    "--model", "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32", "--plan", "tp=2,mbs=2,gbs=4",
                    "--steps", "3", "--out", str(out), "--engine", "megatron"], check=True, capture_output=True, timeout=180)
    r = load_run(out, cluster=discover(cpu_ranks=2, measure=False))
    assert r.metrics["steps"] == 3 and r.metrics["ranks"] == 2
    assert set(r.events[r.events["kind"] == "collective"]["group"]) == {"tp"}
    assert set(r.links["link"]) == {"n0.g0<->n0.host", "n0.g1<->n0.host"}
