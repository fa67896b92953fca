"""Packages for setuptools: the three import packages, plus `datasets/` shipped as `workbench._datasets`,
and the tcp transport's optional C lane loop.

Metadata lives in pyproject.toml; only what pyproject cannot say (a data folder mapped into
the package tree, with its sub-folders, found without __init__.py files; an extension module) is here.
The extension is optional: where it does not build (no compiler, no Python headers) the install goes on
and `transport.backends.tcp` runs its Python lane loop.
"""

from pathlib import Path

from setuptools import Extension, find_packages, setup

data_dirs = sorted(p for p in Path("datasets").rglob("*") if p.is_dir() and not p.name.startswith((".", "__")))
data_packages = ["workbench._datasets"] + [
    "workbench._datasets." + ".".join(p.relative_to("datasets").parts) for p in data_dirs
]

setup(
    packages=find_packages(include=["workbench*", "transport*", "kernels*"]) + data_packages,
    package_dir={"workbench._datasets": "datasets"},
    package_data={pkg: ["*"] for pkg in data_packages},
    ext_modules=[Extension("transport.backends._tcp_native", ["transport/backends/_tcp_native.c"], optional=True,
                           extra_compile_args=["-O2"])],
)
