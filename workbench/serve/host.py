"""Device results read to the host through pinned memory and an event wait.

A blocking copy from a GPU to pageable memory (`.tolist()`, `.cpu()`, `.item()`) waits in the CUDA driver for
everything queued before it, and meanwhile other threads of the process that launch kernels wait too: beside a
serving engine, a transport's receiver landing KV pages waited ~half a decode step per launch
(`benchmarks/results/serve-h200.md`). An asynchronous copy into pinned memory and a wait on an event after it
leave the driver free for them.
"""

from __future__ import annotations

import torch


class HostReader:
    """Called with a device tensor, returns it on the host, in a pinned buffer of this reader's (one per dtype, grown
    by doubling): valid until the next call with the same dtype. CPU tensors pass through as they are."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t
        n = t.numel()
        buf = self._bufs.get(t.dtype)
        if buf is None or buf.numel() < n:
            size = max(n, 1024, 2 * (buf.numel() if buf is not None else 0))
            buf = self._bufs[t.dtype] = torch.empty(size, dtype=t.dtype, pin_memory=True)
        out = buf[:n].view(t.shape)
        out.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(t.device))
        done.synchronize()
        return out
