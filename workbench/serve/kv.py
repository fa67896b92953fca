"""The paged KV cache of one worker and its page allocator.

One tensor `[layers, pages, 2, kv_heads, page_size, head_dim]`: a page of one layer holds
K and V of every KV head for `page_size` tokens in one contiguous block of `page_bytes`.
That makes the disaggregated hand-off one paged write per layer (source pages → destination
pages, stride `page_bytes`, offset `layer * layer_bytes`) — the layout TransferEngine moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.serve.model import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int = 16, layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 kv_heads: int | None = None) -> None:
        if num_pages < 1 or page_size < 1:
            raise WorkbenchError(f"kv cache: num_pages and page_size must be ≥ 1, got {num_pages}, {page_size}")
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = layers if layers is not None else cfg.num_layers
        heads = kv_heads or cfg.num_kv_heads   # this tensor-parallel rank's KV heads
        self.data = torch.zeros((self.num_layers, num_pages, 2, heads, page_size, cfg.head_dim),
                                dtype=dtype, device=device)
        #: bytes of one page (its K and V) and of one layer's pages (read per KV write: plain attributes)
        self.page_bytes = 2 * heads * page_size * cfg.head_dim * self.data.element_size()
        self.layer_bytes = num_pages * self.page_bytes

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def write(self, layer: int, pages: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V of new tokens [T, kv_heads, head_dim] into their (page, slot)."""
        d = self.data[layer]
        d[pages, 0, :, offsets] = k
        d[pages, 1, :, offsets] = v

    def read(self, layer: int, pages: Sequence[int] | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [kv_heads, length, head_dim] of the first `length` tokens held in `pages`."""
        n = -(-length // self.page_size)
        idx = pages[:n] if isinstance(pages, torch.Tensor) else torch.as_tensor(
            list(pages[:n]), dtype=torch.long, device=self.data.device)
        blk = self.data[layer, idx]                       # [n, 2, H, S, D]
        h, s, dd = blk.shape[2], blk.shape[3], blk.shape[4]
        k = blk[:, 0].permute(1, 0, 2, 3).reshape(h, n * s, dd)[:, :length]
        v = blk[:, 1].permute(1, 0, 2, 3).reshape(h, n * s, dd)[:, :length]
        return k, v

    def gather(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [kv_heads, B, P * page_size, head_dim] of the pages of each row of `table` [B, P], in one
        indexing op (indexing the pages' dimension of a [2, H, pages, S, D] view gives [2, H, B, P, S, D])."""
        kv = self.data[layer].permute(1, 2, 0, 3, 4)[:, :, table]
        _, h, b, p, s, d = kv.shape
        kv = kv.reshape(2, h, b, p * s, d)
        return kv[0], kv[1]


class PageAllocator:
    """Free pages of one cache; `allocate(n)` returns page ids or None when too few are free."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_pages - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(list(pages)))
