"""Device memory over the tcp backend (`transport.staging`): a paged write's pages gathered into pinned host memory
and scattered from it, with the GPU page-copy kernel and with torch copies (runs of pages, or indices), for a KV
cache's layout (whole pages), scattered pages and offsets inside pages."""

from __future__ import annotations

import numpy as np
import pytest

from transport import staging


def test_runs() -> None:
    offs = np.array([3, 4, 5, 9, 2, 3], dtype=np.uint64) * 4096
    assert staging.runs(offs, 4096, 64 * 4096) == [(3, 3), (9, 1), (2, 2)]
    assert staging.runs(offs + 1, 4096, 64 * 4096) is None          # an offset inside a page
    assert staging.runs(offs, 4096, 64 * 4096 + 1) is None          # a region not of whole pages
    assert staging.runs(np.array([7], dtype=np.uint64) * 512, 512, 4096) == [(7, 1)]


LAYOUTS = {  # (source pages, destination pages, page bytes, extra byte offset)
    "runs": ([3, 4, 5, 6, 10, 11, 40, 41], [100, 101, 102, 50, 51, 52, 53, 7], 4096, 0),
    "scattered": (list(range(0, 60, 3)), list(range(119, 59, -3)), 4096, 0),
    "inside pages": ([1, 5, 2], [9, 0, 4], 3000, 123),
}


@pytest.mark.parametrize("layout", ["runs", "scattered", "inside pages"])
def test_torch_copies_both_ways_on_cpu_tensors(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_copy`'s torch path (no kernel) with CPU tensors standing in for device memory: the pages gathered into the
    buffer in order, and scattered back to other pages, whatever the layout."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(staging, "_KERNELS", {None: None})
    monkeypatch.setattr(staging, "_index_tensor", lambda flat, offs, page, rows: torch.from_numpy(
        np.ascontiguousarray(offs // page, dtype=np.int64) if rows
        else (offs.astype(np.int64)[:, None] + np.arange(page)).reshape(-1)))
    sp, dp, page, extra = LAYOUTS[layout]
    data = np.random.default_rng(2).integers(0, 255, 128 * page + extra, dtype=np.uint8)
    soffs = np.array(sp, dtype=np.uint64) * page + extra
    doffs = np.array(dp, dtype=np.uint64) * page + extra
    buf = torch.zeros(staging._room(len(sp), page), dtype=torch.uint8)
    staging._copy(torch.from_numpy(data.copy()), soffs, page, buf, None, to_host=True)
    want = np.concatenate([data[o:o + page] for o in soffs.tolist()])
    assert np.array_equal(buf[:len(sp) * page].numpy(), want)
    dst = torch.zeros(128 * page + extra, dtype=torch.uint8)
    staging._copy(dst, doffs, page, buf, None, to_host=False)
    expect = np.zeros(len(dst), np.uint8)
    for i, o in enumerate(doffs.tolist()):
        expect[o:o + page] = want[i * page:(i + 1) * page]
    assert np.array_equal(dst.numpy(), expect)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stage_and_land(layout: str, kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if not kernel:
        monkeypatch.setattr(staging, "_KERNELS", {0: None})
    elif staging._kernel(0) is None:
        pytest.skip("no page-copy kernel here (CuPy)")
    sp, dp, page, extra = LAYOUTS[layout]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, 128 * page + extra, dtype=np.uint8)
    src = torch.from_numpy(data).cuda()
    dst = torch.zeros(128 * page + extra, dtype=torch.uint8, device="cuda")
    soffs = np.array(sp, dtype=np.uint64) * page + extra
    doffs = np.array(dp, dtype=np.uint64) * page + extra
    host, event = staging.stage_pages(src, soffs, page)
    event.synchronize()
    want = np.concatenate([data[o:o + page] for o in soffs.tolist()])
    assert np.array_equal(host.numpy(), want)

    def read_into(view: memoryview) -> None:
        view[:] = host.numpy().tobytes()

    staging.land_pages(read_into, dst, doffs, page)
    got = dst.cpu().numpy()
    expect = np.zeros_like(got)
    for i, o in enumerate(doffs.tolist()):
        expect[o:o + page] = want[i * page:(i + 1) * page]
    assert np.array_equal(got, expect)
