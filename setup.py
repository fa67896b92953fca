"""Packages for setuptools: the three import packages, plus `datasets/` shipped as `workbench._datasets`.

Metadata lives in pyproject.toml; only what pyproject cannot say (a data folder mapped into
the package tree, found without an __init__.py) is here.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["workbench*", "transport*", "kernels*"]) + ["workbench._datasets"],
    package_dir={"workbench._datasets": "datasets"},
    package_data={"workbench._datasets": ["**/*"]},
)
