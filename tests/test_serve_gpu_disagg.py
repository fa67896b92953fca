"""Disaggregated serving on GPUs with the current engine (CUDA graphs, graphed pieces, merged attention): the KV
pages written layer by layer over cuda_ipc (and staged through host memory over tcp) from the prefill worker's GPU
to the decode worker's (the next GPU where there is one, else the same GPU in another process) give the same greedy
tokens as one colocated worker on the GPU and as the plain forward on the CPU (fp32; `tests/test_serve.py` shows
that one equals transformers' `generate`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parent))

from serve_models import generate_all  # noqa: E402

from workbench.serve.backend import Backend  # noqa: E402
from workbench.serve.checkpoints import random_llama  # noqa: E402
from workbench.serve.sampling import SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu
SPEC = dict(num_pages=256, page_size=8, max_batched_tokens=64, threads=1, dtype="float32")


@pytest.mark.parametrize("transport", ["cuda_ipc", "tcp"])
def test_disaggregated_on_gpus_equals_colocated(tmp_path: Path, transport: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    path = random_llama(tmp_path / "m", hidden=128, layers=3, heads=4, kv_heads=2, intermediate=256,
                        dtype="float32", std=0.2)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 37, 12, 70, 100)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    decode_dev = f"cuda:{min(torch.cuda.device_count() - 1, 1)}"

    got = {}
    with Backend(str(path), "colocated", device="cpu", **SPEC) as b:
        got["cpu"] = generate_all(b, prompts, params)
    with Backend(str(path), "colocated", device="cuda:0", **SPEC) as b:
        got["gpu"] = generate_all(b, prompts, params)
    with Backend(str(path), "disaggregated", transport=transport, prefill={"device": "cuda:0"},
                 decode={"device": decode_dev}, **SPEC) as b:
        got["disaggregated"] = generate_all(b, prompts, params)
        assert b.settle(10.0), "KV transfers were not all logged within 10 s"
        moved = list(b.transfers)
        procs = [p.proc for p in b.procs.values()]
    assert got["disaggregated"] == got["gpu"] == got["cpu"]
    assert all(len(t) == 16 for t in got["cpu"])
    assert len(moved) == len(prompts) and all(t["error"] is None and t["bytes"] > 0 for t in moved)
    assert not any(p.is_alive() for p in procs)
