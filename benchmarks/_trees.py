"""A folder of an earlier commit of this repository, for the benchmarks that measure before and after in one run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def archive(ref: str, folder: str, dest: Path) -> Path:
    """`folder` of commit `ref` (`git archive`) extracted under `dest`, which is returned; a clear exit (status 2) when
    git cannot give it."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", ref, folder], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"--before: git archive {ref} {folder}: {e} (run from a git checkout of this repository)", file=sys.stderr)
        raise SystemExit(2) from None
    if arch.returncode:
        print(f"--before: git archive {ref} {folder} failed: {arch.stderr.decode().strip()} "
              "(give a commit of this repository)", file=sys.stderr)
        raise SystemExit(2)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True, timeout=120)
    return dest
