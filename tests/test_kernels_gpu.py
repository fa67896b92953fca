"""GPU (CuPy) kernels against the CPU references, on fresh random data. Skipped where no GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_data import routing

from kernels import moe, paged_kv, quant
from kernels.blocks import gather_rows, scatter_rows


def _no_gpu() -> str | None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU"
    except Exception as exc:  # noqa: BLE001 - no CuPy or no driver
        return f"no CUDA GPU usable through CuPy ({type(exc).__name__}: {exc})"
    return None


REASON = _no_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture
def cp():  # type: ignore[no-untyped-def]
    import cupy

    return cupy


@pytest.mark.parametrize("dtype,width,offset", [(np.uint8, 13, 0), (np.uint16, 64, 0), (np.uint16, 7168, 0),
                                                (np.float32, 3, 0), (np.uint8, 32, 1)])
def test_gather_scatter_rows(cp, rng, dtype, width, offset):
    host = rng.integers(0, 100, (300, width)).astype(dtype)
    base = cp.asarray(host.reshape(-1))
    src = base[offset * width :].reshape(-1, width)  # offset 1: rows start off the 16-byte grid
    idx = rng.integers(0, src.shape[0], 500)
    got = gather_rows(src, cp.asarray(idx))
    np.testing.assert_array_equal(cp.asnumpy(got), host[offset:][idx])
    perm = rng.permutation(src.shape[0])[:100]
    dst = cp.zeros_like(src)
    scatter_rows(src[:100], cp.asarray(perm), dst)
    want = np.zeros_like(host[offset:])
    want[perm] = host[offset:][:100]
    np.testing.assert_array_equal(cp.asnumpy(dst), want)


@pytest.mark.parametrize("ranks,experts,k,tokens,hidden,used", [
    (4, 16, 4, [37, 0, 5, 64], 24, None), (2, 8, 2, [33, 17], 7, 3), (8, 64, 8, [50] * 8, 40, None)])
def test_plans_and_loopback_match_cpu(cp, rng, ranks, experts, k, tokens, hidden, used):
    ids = [routing(rng, t, k, experts, used) for t in tokens]
    for a in ids:
        ref = moe.plan_dispatch(a, experts, ranks)
        gpu = moe.plan_dispatch(cp.asarray(a), experts, ranks)
        for name in ("send_src", "send_counts", "send_offsets", "combine_index", "return_counts"):
            np.testing.assert_array_equal(cp.asnumpy(getattr(gpu, name)), getattr(ref, name), err_msg=name)
    xs = [rng.standard_normal((t, hidden)).astype(np.float32) for t in tokens]
    ws = [rng.random((t, k)).astype(np.float32) for t in tokens]
    scale = rng.standard_normal(experts).astype(np.float32)
    outs, _ = moe.loopback([cp.asarray(x) for x in xs], [cp.asarray(a) for a in ids], [cp.asarray(w) for w in ws],
                           experts, lambda e, rows: rows * float(scale[e]) + e)
    for s in range(ranks):
        want = moe.moe_reference(xs[s], ids[s], ws[s], lambda e, rows: rows * float(scale[e]) + e)
        np.testing.assert_allclose(cp.asnumpy(outs[s]), want, rtol=1e-5, atol=1e-5 * k * (1 + np.abs(want).max(initial=0)))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("hidden", [1, 9, 64, 7168])
def test_combine(cp, rng, bf16, hidden):
    t, k, experts, ranks = 90, 8, 64, 8
    ids = routing(rng, t, k, experts)
    ids[rng.random(ids.shape) < 0.15] = -1
    plan = moe.plan_dispatch(ids, experts, ranks)
    n = int(plan.return_offsets[-1])
    vals = rng.standard_normal((n, hidden)).astype(np.float32)
    ret = (vals.view(np.uint32) >> 16).astype(np.uint16) if bf16 else vals
    w = rng.random((t, k)).astype(np.float32)
    gplan = moe.plan_dispatch(cp.asarray(ids), experts, ranks)
    got = moe.combine(cp.asarray(ret), gplan, cp.asarray(w), bf16=bf16)
    np.testing.assert_allclose(cp.asnumpy(got), moe.combine_reference(ret, plan.combine_index, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 64, 16, 128), (3, 17, 5, 7), (1, 1, 1, 1)])
@pytest.mark.parametrize("pages_first", [False, True])
def test_paged_kv(cp, rng, shape, pages_first):
    heads, pages, s, d = shape
    host = rng.integers(0, 60000, (pages, heads, s, d) if pages_first else shape).astype(np.uint16)
    cache_h = host.transpose(1, 0, 2, 3) if pages_first else host
    dev = cp.asarray(host)
    cache = dev.transpose(1, 0, 2, 3) if pages_first else dev
    for n in (0, 1, pages // 2, pages):
        idx = rng.permutation(pages)[:n]
        buf = paged_kv.gather_pages(cache, cp.asarray(idx))
        np.testing.assert_array_equal(cp.asnumpy(buf), paged_kv.gather_pages_reference(cache_h, idx))
        zeros = cp.zeros_like(dev)
        target = zeros.transpose(1, 0, 2, 3) if pages_first else zeros
        paged_kv.scatter_pages(buf, target, cp.asarray(idx))
        want = np.zeros_like(cache_h)
        paged_kv.scatter_pages_reference(cp.asnumpy(buf), want, idx)
        np.testing.assert_array_equal(cp.asnumpy(target), want)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("shape,block", [((256, 256), (128, 128)), ((300, 260), (128, 128)), ((5, 1000), (1, 128))])
def test_quant_matches_torch(cp, rng, fmt, shape, block):
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, shape))).astype(np.float32)
    x[: shape[0] // 2, : shape[1] // 3] = 0
    q, s = quant.quantize(cp.asarray(x), fmt, block)
    qr, sr = quant.quantize_reference(x, fmt, block)
    np.testing.assert_array_equal(cp.asnumpy(s), sr)
    np.testing.assert_array_equal(cp.asnumpy(q), qr)
    d = quant.dequantize(q, s, fmt, block)
    np.testing.assert_array_equal(cp.asnumpy(d), quant.dequantize_reference(qr, sr, fmt, block))
    qt, st = quant.quantize_reference(torch.from_numpy(x).cuda(), fmt, block)  # the torch path on the GPU too
    np.testing.assert_array_equal(qt.cpu().numpy(), qr)


def test_fp8_every_tie_and_code(cp):
    values = quant._lut("fp8")
    finite = np.sort(np.unique(values[np.isfinite(values)]))
    mids = (finite[:-1] + finite[1:]) / 2
    near = np.concatenate([np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]).astype(np.float32)
    x = np.concatenate([finite, mids, near, [448.0, -0.0]]).astype(np.float32)[None, :]
    q, s = quant.quantize(cp.asarray(x), "fp8", (1, x.shape[1]))
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(cp.asnumpy(q), want)
