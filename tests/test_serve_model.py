"""The serving runtime against Hugging Face `transformers` (CPU, fp32, greedy)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from serve_models import hf_greedy, make_llama, make_mixtral  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.serve.engine import EngineConfig, generate  # noqa: E402
from workbench.serve.model import Model, load_config  # noqa: E402
from workbench.serve.sampling import SamplingParams, sample  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    return (make_llama if request.param == "llama" else make_mixtral)(path)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 60, (n,), generator=g).tolist()
    return [torch.randint(0, 256, (ln,), generator=g).tolist() for ln in lengths]


def test_continuous_batching_equals_transformers_generate(checkpoint: Path) -> None:
    """Chunked prefill, mixed prefill/decode batches and preemption (a small cache) keep greedy tokens exact."""
    model = Model.load(checkpoint)
    prompts = _prompts(5)
    cfg = EngineConfig(num_pages=24, page_size=4, max_batched_tokens=16, max_seqs=4)
    ours = generate(model, prompts, SamplingParams(max_tokens=24, temperature=0), cfg)
    for p, o in zip(prompts, ours):
        assert o == hf_greedy(checkpoint, p, 24)


def test_sampling_seeded_and_bounded() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.8, top_k=5, seed=7)
    draws = [sample(logits, p, i) for i in range(50)]
    assert draws == [sample(logits, p, i) for i in range(50)]   # same seed, same tokens
    assert set(draws) <= set(torch.topk(logits, 5).indices.tolist())
    nucleus = SamplingParams(temperature=1.0, top_p=0.05, seed=3)
    assert {sample(logits, nucleus, i) for i in range(20)} == {int(torch.argmax(logits))}
    with pytest.raises(WorkbenchError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_bad_checkpoint_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match="config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(WorkbenchError, match="not served"):
        load_config(tmp_path)


def test_a_converter_package_serves_the_same_tokens(tmp_path: Path) -> None:
    """A checkpoint converted into a two-stage package (fp32) loads through the converter's loader."""
    pytest.importorskip("workbench.convert.package")
    from workbench.convert.package import convert
    from workbench.plan.placement import Placement, Replica, Stage

    ckpt = make_llama(tmp_path / "ckpt")
    pl = Placement("t", 3, (Replica((Stage(("n0.g0",), (0, 1), "fp32", "bf16"), Stage(("n0.g1",), (2, 2), "fp32", "bf16"))),))
    convert(ckpt, pl, tmp_path / "pkg", progress=False)
    prompts = _prompts(2, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0)
    assert generate(Model.load(tmp_path / "pkg"), prompts, params) == generate(Model.load(ckpt), prompts, params)
