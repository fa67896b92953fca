"""Packages for setuptools: the three import packages, plus `datasets/` shipped as `workbench._datasets`.

Metadata lives in pyproject.toml; only what pyproject cannot say (a data folder mapped into
the package tree, with its sub-folders, found without __init__.py files) is here.
"""

from pathlib import Path

from setuptools import find_packages, setup

data_dirs = sorted(p for p in Path("datasets").rglob("*") if p.is_dir() and not p.name.startswith((".", "__")))
data_packages = ["workbench._datasets"] + [
    "workbench._datasets." + ".".join(p.relative_to("datasets").parts) for p in data_dirs
]

setup(
    packages=find_packages(include=["workbench*", "transport*", "kernels*"]) + data_packages,
    package_dir={"workbench._datasets": "datasets"},
    package_data={pkg: ["*"] for pkg in data_packages},
)
