"""Data-movement kernels: MoE dispatch/combine, paged KV, blockwise FP8/INT8 (numba CPU, CuPy GPU)."""
