"""Traffic specs for the real server: the serving workload's `Traffic` (`workbench.serving.traffic`),
so the simulator and the benchmark client draw the same requests from the same spec and seed.

  `concurrency=16,isl=1024,osl=1024,requests=320`                  closed loop at a concurrency
  `rate=4,burstiness=1,dataset=conversation,requests=1000,seed=0`   open loop, gamma arrivals
  `trace=FILE`                                                       a trace (timestamp, input_length, output_length)
"""

from __future__ import annotations

from workbench.serving.traffic import Traffic

__all__ = ["Traffic"]
