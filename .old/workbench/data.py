"""Where the `datasets/` folder is, installed or in a checkout, and cached table loading."""

from __future__ import annotations

from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml


@lru_cache(maxsize=1)
def datasets_dir() -> Path:
    """The datasets folder: `workbench/_datasets` in a wheel, `<repo>/datasets` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_datasets", here.parent / "datasets"):
        if (candidate / "gpus.csv").is_file():
            return candidate
    try:  # editable installs map workbench._datasets onto the checkout's datasets/
        import workbench._datasets as pkg  # type: ignore[import-not-found]

        return Path(next(iter(pkg.__path__)))
    except (ImportError, StopIteration) as exc:  # pragma: no cover - broken install
        raise FileNotFoundError("workbench datasets not found; reinstall workbench") from exc


def dataset_path(name: str) -> Path:
    return datasets_dir() / name


@cache
def read_csv(name: str) -> pd.DataFrame:
    """A catalogue table from `datasets/` (comment lines start with '#'). Do not mutate it."""
    return pd.read_csv(dataset_path(name), comment="#", skipinitialspace=True)


@cache
def read_yaml(name: str) -> Any:
    with open(dataset_path(name)) as f:
        return yaml.safe_load(f)
