"""Paged KV cache: gather pages into a contiguous buffer and scatter them back.

The cache is a 4-D array `(heads, pages, page_size, head_dim)` — heads before pages, so one
page of one head is a contiguous block and the heads of a page lie a head-stride apart. Any
non-negative head and page strides work (a pages-first cache passes `cache.transpose(1, 0, 2,
3)`); the last two axes must be contiguous. Fold layers and K/V into the head axis.
The packed buffer is `(n, heads, page_size, head_dim)`: page-major, ready for one write.
"""

from __future__ import annotations

from typing import Any

from kernels._arrays import check_index, xp_of
from kernels.blocks import flat_span, gather_blocks, scatter_blocks
from kernels.errors import KernelInputError


def _layout(cache: Any) -> tuple[int, int, int, int, int]:
    if cache.ndim != 4:
        raise KernelInputError(
            f"cache: must be 4-D (heads, pages, page_size, head_dim), got shape {tuple(cache.shape)}"
        )
    h, p, s, d = (int(v) for v in cache.shape)
    item = cache.itemsize
    if cache.strides[3] != item or (s > 1 and cache.strides[2] != d * item):
        raise KernelInputError("cache: each page (page_size, head_dim) must be contiguous; only heads/pages may be strided")
    return h, p, s * d, cache.strides[0] // item, cache.strides[1] // item


def _pages(cache: Any, pages: Any, check: bool) -> Any:
    xp = xp_of(cache)
    if check:
        return xp.asarray(check_index("pages", pages, int(cache.shape[1])))
    pages = xp.asarray(pages)
    return pages if pages.dtype == xp.int64 else pages.astype(xp.int64)


def gather_pages(cache: Any, pages: Any, out: Any | None = None, check: bool = True) -> Any:
    """out[i, h] = cache[h, pages[i]]; returns `out` of shape (n, heads, page_size, head_dim).

    `check=False` skips the range check of `pages` (on a GPU it costs a device sync).
    """
    h, _, block, sh, sp = _layout(cache)
    xp = xp_of(cache)
    idx = _pages(cache, pages, check)
    n = int(idx.shape[0])
    if out is None:
        out = xp.empty((n, h, *cache.shape[2:]), dtype=cache.dtype)
    if tuple(out.shape) != (n, h, *cache.shape[2:]):
        raise KernelInputError(f"out: shape must be {(n, h, *cache.shape[2:])}, got {tuple(out.shape)}")
    return gather_blocks(flat_span(cache), idx, block, out, stride=sp, heads=h, head_stride=sh)


def scatter_pages(buf: Any, cache: Any, pages: Any, check: bool = True) -> Any:
    """cache[h, pages[i]] = buf[i, h]; returns `cache`.

    Pages must be distinct (two writes to one page would race); `check=False` skips that
    check and the range check.
    """
    h, _, block, sh, sp = _layout(cache)
    xp = xp_of(cache)
    idx = _pages(cache, pages, check)
    n = int(idx.shape[0])
    if tuple(buf.shape) != (n, h, *cache.shape[2:]):
        raise KernelInputError(f"buf: shape must be {(n, h, *cache.shape[2:])}, got {tuple(buf.shape)}")
    if check and n and int(xp.unique(idx).shape[0]) != n:
        raise KernelInputError("pages: must be distinct for a scatter (two writes to one page would race)")
    scatter_blocks(buf, idx, block, flat_span(cache), stride=sp, heads=h, head_stride=sh)
    return cache


def gather_pages_reference(cache: Any, pages: Any) -> Any:
    """Reference (numpy or torch): cache[:, pages] moved page-major."""
    return cache[:, pages].transpose(1, 0, 2, 3).copy() if hasattr(cache, "transpose") and not hasattr(
        cache, "permute"
    ) else cache[:, pages].permute(1, 0, 2, 3).contiguous()


def scatter_pages_reference(buf: Any, cache: Any, pages: Any) -> Any:
    """Reference: cache[:, pages] = buf moved head-major."""
    if hasattr(buf, "permute"):
        cache[:, pages] = buf.permute(1, 0, 2, 3)
    else:
        cache[:, pages] = buf.transpose(1, 0, 2, 3)
    return cache
