"""CPU tests of the data-movement kernels against plain references, on fresh random data.

Each test draws a new seed and prints it, so a failure names the data that broke it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_data import routing

from kernels import moe, paged_kv, quant
from kernels.blocks import gather_rows, scatter_rows
from kernels.errors import KernelInputError

# ---- MoE ----

MOE_SHAPES = [
    # ranks, experts, k, tokens per rank, hidden, experts in use
    (4, 16, 4, [37, 0, 5, 64], 24, None),  # a rank with no tokens
    (2, 8, 2, [33, 17], 7, 3),  # odd hidden, most experts empty
    (8, 64, 8, [50] * 8, 40, None),  # k = 8: tokens routed twice to one rank
    (1, 4, 3, [19], 13, None),  # a single rank
]


@pytest.mark.parametrize("ranks,experts,k,tokens,hidden,used", MOE_SHAPES)
def test_plan_dispatch_matches_loop_reference(rng, ranks, experts, k, tokens, hidden, used):
    ids = routing(rng, tokens[0], k, experts, used)
    if ids.size:
        ids[rng.random(ids.shape) < 0.1] = -1  # unused slots
    plan = moe.plan_dispatch(ids, experts, ranks)
    ref = moe.plan_dispatch_reference(ids, experts, ranks)
    for name, want in ref.items():
        np.testing.assert_array_equal(getattr(plan, name), want, err_msg=name)
    assert int(plan.send_offsets[-1]) == plan.send_src.shape[0]


def test_token_routed_twice_to_one_rank_is_sent_once(rng):
    ids = np.array([[0, 1], [2, 5], [4, 6]])  # 2 ranks of 4 experts; token 0 twice to rank 0
    plan = moe.plan_dispatch(ids, 8, 2)
    np.testing.assert_array_equal(plan.send_src, [0, 1, 1, 2])
    np.testing.assert_array_equal(plan.send_counts, [2, 2])
    np.testing.assert_array_equal(plan.return_counts, [3, 3])


@pytest.mark.parametrize("ranks,experts,k,tokens,hidden,used", MOE_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.uint8])
def test_pack_unpack_are_exact_permutations(rng, ranks, experts, k, tokens, hidden, used, dtype):
    for t in tokens:
        ids = routing(rng, t, k, experts, used)
        x = rng.integers(0, 250, (t, hidden)).astype(dtype)
        plan = moe.plan_dispatch(ids, experts, ranks)
        send = moe.dispatch_pack(x, plan)
        np.testing.assert_array_equal(send, x[plan.send_src])
        for r in range(ranks):
            rows = plan.send_src[plan.send_offsets[r] : plan.send_offsets[r + 1]]
            assert np.all(np.diff(rows) > 0)  # each token at most once per rank, in order
            assert set(rows.tolist()) == {i for i in range(t) if any(ids[i] // (experts // ranks) == r)}
        eplan = moe.plan_experts(ids[plan.send_src], [send.shape[0]], 0, experts, 1) if ranks == 1 else None
        if eplan is not None:
            ex = moe.unpack(send, eplan)
            np.testing.assert_array_equal(ex, send[eplan.expert_src])


@pytest.mark.parametrize("ranks,experts,k,tokens,hidden,used", MOE_SHAPES)
def test_loopback_moe_layer_matches_dense_reference(rng, ranks, experts, k, tokens, hidden, used):
    tokens = (tokens * ranks)[:ranks]
    xs = [rng.standard_normal((t, hidden)).astype(np.float32) for t in tokens]
    ids = [routing(rng, t, k, experts, used) for t in tokens]
    ws = [rng.random((t, k)).astype(np.float32) for t in tokens]
    scale = rng.standard_normal(experts).astype(np.float32)

    def expert(e: int, rows: np.ndarray) -> np.ndarray:
        return rows * scale[e] + e

    outs, eplans = moe.loopback(xs, ids, ws, experts, expert)
    for ep in eplans:
        assert ep.expert_counts.sum() == ep.expert_src.shape[0]
        assert int(ep.return_offsets[-1]) == ep.return_src.shape[0]
        np.testing.assert_array_equal(np.sort(ep.return_src), np.arange(ep.return_src.shape[0]))
    for s in range(ranks):
        want = moe.moe_reference(xs[s], ids[s], ws[s], expert)
        np.testing.assert_allclose(outs[s], want, rtol=1e-5, atol=1e-5 * k * (1 + np.abs(want).max(initial=0)))


def test_unpack_groups_rows_by_expert(rng):
    experts, ranks, k, t, h = 16, 2, 4, 80, 8
    ids = routing(rng, t, k, experts, used=11)
    recv_ids = ids[rng.permutation(t)]
    recv = rng.standard_normal((t, h)).astype(np.float32)
    ep = moe.plan_experts(recv_ids, [30, 50], 1, experts, ranks)
    ex = moe.unpack(recv, ep)
    for j in range(ep.experts_per_rank):
        rows = ep.expert_src[ep.expert_offsets[j] : ep.expert_offsets[j + 1]]
        want = [i for i in range(t) if (8 + j) in recv_ids[i]]
        np.testing.assert_array_equal(rows, want)  # every pair, in received order; empty experts empty
        np.testing.assert_array_equal(ex[ep.expert_offsets[j] : ep.expert_offsets[j + 1]], recv[want])
    np.testing.assert_array_equal(ep.return_counts, [(recv_ids[a:b] >= 8).sum() for a, b in [(0, 30), (30, 80)]])


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("hidden", [1, 9, 64])
def test_combine_fp32_accumulation(rng, bf16, hidden):
    t, k, experts, ranks = 70, 6, 32, 4
    ids = routing(rng, t, k, experts)
    ids[rng.random(ids.shape) < 0.15] = -1
    plan = moe.plan_dispatch(ids, experts, ranks)
    n = int(plan.return_offsets[-1])
    vals = rng.standard_normal((n, hidden)).astype(np.float32)
    ret = (vals.view(np.uint32) >> 16).astype(np.uint16) if bf16 else vals
    w = rng.random((t, k)).astype(np.float32)
    got = moe.combine(ret, plan, w, bf16=bf16)
    want = moe.combine_reference(ret, plan.combine_index, w)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_moe_bad_input_names_the_field():
    with pytest.raises(KernelInputError, match="num_experts"):
        moe.plan_dispatch(np.zeros((2, 2), np.int64), 7, 2)
    with pytest.raises(KernelInputError, match="topk_ids"):
        moe.plan_dispatch(np.full((2, 2), 9), 8, 2)
    plan = moe.plan_dispatch(np.zeros((2, 1), np.int64), 8, 2)
    with pytest.raises(KernelInputError, match="x:"):
        moe.dispatch_pack(np.zeros((3, 4), np.float32), plan)
    with pytest.raises(KernelInputError, match="recv_counts"):
        moe.plan_experts(np.zeros((3, 1), np.int64), [1, 1], 0, 8, 2)


# ---- rows and paged KV ----


@pytest.mark.parametrize("dtype,width", [(np.uint8, 1), (np.uint8, 13), (np.float16, 6), (np.float64, 5)])
def test_gather_scatter_rows_exact(rng, dtype, width):
    src = rng.integers(0, 100, (257, width)).astype(dtype)
    idx = rng.integers(0, 257, 300)
    np.testing.assert_array_equal(gather_rows(src, idx), src[idx])
    perm = rng.permutation(257)[:100]
    dst = np.zeros_like(src)
    scatter_rows(src[:100], perm, dst)
    want = np.zeros_like(src)
    want[perm] = src[:100]
    np.testing.assert_array_equal(dst, want)


KV_SHAPES = [(8, 64, 16, 128), (3, 17, 5, 7), (1, 1, 1, 1), (2, 40, 16, 64)]


@pytest.mark.parametrize("shape", KV_SHAPES)
@pytest.mark.parametrize("pages_first", [False, True])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
def test_paged_kv_gather_scatter_exact(rng, shape, pages_first, dtype):
    heads, pages, s, d = shape
    if pages_first:  # (pages, heads, ...) memory, seen as heads-before-pages with strides
        cache = rng.integers(0, 200, (pages, heads, s, d)).astype(dtype).transpose(1, 0, 2, 3)
    else:
        cache = rng.integers(0, 200, shape).astype(dtype)
    for n in (0, 1, pages // 2, pages):
        idx = rng.permutation(pages)[:n]
        buf = paged_kv.gather_pages(cache, idx)
        np.testing.assert_array_equal(buf, paged_kv.gather_pages_reference(cache, idx))
        target = np.zeros_like(cache) if not pages_first else np.zeros((pages, heads, s, d), dtype).transpose(1, 0, 2, 3)
        want = target.copy()
        paged_kv.scatter_pages(buf, target, idx)
        paged_kv.scatter_pages_reference(buf, want, idx)
        np.testing.assert_array_equal(target, want)


def test_paged_kv_torch_reference_agrees(rng):
    cache = rng.standard_normal((4, 10, 8, 16)).astype(np.float32)
    idx = rng.permutation(10)[:6]
    ref = paged_kv.gather_pages_reference(torch.from_numpy(cache), torch.from_numpy(idx)).numpy()
    np.testing.assert_array_equal(paged_kv.gather_pages(cache, idx), ref)


def test_paged_kv_bad_input_names_the_field():
    cache = np.zeros((2, 4, 3, 5), np.float32)
    with pytest.raises(KernelInputError, match="pages"):
        paged_kv.gather_pages(cache, np.array([4]))
    with pytest.raises(KernelInputError, match="distinct"):
        paged_kv.scatter_pages(np.zeros((2, 2, 3, 5), np.float32), cache, np.array([1, 1]))
    with pytest.raises(KernelInputError, match="cache"):
        paged_kv.gather_pages(cache.transpose(0, 1, 3, 2), np.array([0]))


# ---- blockwise FP8 / INT8 ----

QUANT_SHAPES = [((256, 256), (128, 128)), ((300, 260), (128, 128)), ((5, 1000), (1, 128)), ((1, 1), (128, 128))]


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("shape,block", QUANT_SHAPES)
def test_quantize_matches_torch_rounding(rng, fmt, shape, block):
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, shape))).astype(np.float32)
    x[: shape[0] // 2, : shape[1] // 3] = 0  # whole zero blocks where the shape allows
    q, s = quant.quantize(x, fmt, block)
    qr, sr = quant.quantize_reference(x, fmt, block)
    np.testing.assert_array_equal(s, sr)
    np.testing.assert_array_equal(q, qr)
    d = quant.dequantize(q, s, fmt, block)
    np.testing.assert_array_equal(d, quant.dequantize_reference(qr, sr, fmt, block))
    # within half a step of the format at each value, times the block's scale
    big = np.repeat(np.repeat(s, block[0], 0), block[1], 1)[: shape[0], : shape[1]]
    rel = 2.0**-4 if fmt == "fp8" else 0.0
    bound = np.maximum(np.abs(x) * rel, (2.0**-10 if fmt == "fp8" else 0.5) * big) * 1.0001
    assert np.all(np.abs(d - x) <= bound)


def test_fp8_rounding_every_tie_and_code():
    values = quant._lut("fp8")
    finite = np.sort(np.unique(values[np.isfinite(values)]))
    mids = (finite[:-1] + finite[1:]) / 2  # exact ties: must round to the even code
    near = np.concatenate([np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)]).astype(np.float32)
    x = np.concatenate([finite, mids, near, [448.0]]).astype(np.float32)[None, :]  # amax 448: scale 1
    q, s = quant.quantize(x, "fp8", (1, x.shape[1]))
    assert s[0, 0] == 1.0
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(q, want)


def test_int8_rounds_half_to_even():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0, 3.49]], np.float32)
    q, s = quant.quantize(x, "int8", (1, 16))
    assert s[0, 0] == 1.0
    np.testing.assert_array_equal(q[0], [127, 0, 2, 2, 0, -2, 126, -127, 3])


def test_quant_bad_input_names_the_field():
    with pytest.raises(KernelInputError, match="fmt"):
        quant.quantize(np.zeros((2, 2), np.float32), "fp4")
    with pytest.raises(KernelInputError, match="x:"):
        quant.quantize(np.zeros((2, 2), np.float64))
    with pytest.raises(KernelInputError, match="scales"):
        quant.dequantize(np.zeros((2, 2), np.uint8), np.zeros((2, 2), np.float32))
