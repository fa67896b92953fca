"""Calibration: fitting the simulator's cost parameters from measurements (microbenchmark level)."""

from workbench.calibration.fit import fit_collective, fit_transport, refit_transfer_engine
from workbench.calibration.nccl_tests import parse_nccl_tests
from workbench.calibration.run import from_run

__all__ = ["fit_collective", "fit_transport", "from_run", "parse_nccl_tests", "refit_transfer_engine"]
