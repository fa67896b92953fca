"""The nccl-tests-format sweep (benchmarks/nccl_sweep.py) runs over real gloo ranks and feeds the parser."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.calibration.nccl_tests import check_busbw, parse_nccl_tests

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "nccl_sweep.py"


@pytest.mark.slow
@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_sweep_output_parses_and_validates(op: str, tmp_path: Path) -> None:
    port = str(29600 + ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"].index(op))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
         str(SCRIPT), "--backend", "gloo", "--op", op, "-b", "1K", "-e", "256K", "-f", "16", "-w", "1", "-n", "2"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    df = parse_nccl_tests(out.stdout, op=op)
    assert df["size"].tolist() == [1024, 16384, 262144]
    assert (df["wrong"] == 0).all() and (df["wrong_inplace"] == 0).all()
    assert (df["time_us"] > 0).all()
    # busbw printed with nccl-tests' factor for 2 ranks (2 decimals in the text)
    assert ((check_busbw(df, 2) - df["busbw_GBps"]).abs() <= 0.011).all()
    assert "# Out of bounds values : 0 OK" in out.stdout
