"""Transport backends: `tcp` (embedded default), `cuda_ipc` (GPUs of one host), `nixl` (RDMA extra)."""

BACKENDS = ("tcp", "cuda_ipc", "nixl")
