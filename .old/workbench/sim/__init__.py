"""Simulation: network cost models (point-to-point, collectives), the flow-level simulator.

Training/inference simulators live beside these modules (`train*.py`, `compute.py`).
"""

from workbench.sim.collectives import CollectiveEstimate, bus_factor, collective, group_shape
from workbench.sim.p2p import TransferEstimate, transfer_seconds, write
from workbench.sim.params import NetParams

__all__ = [
    "CollectiveEstimate", "NetParams", "TransferEstimate", "bus_factor", "collective", "group_shape",
    "transfer_seconds", "write",
]
