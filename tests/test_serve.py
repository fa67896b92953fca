"""The real server: HTTP endpoints, errors, stop strings, disconnects, overload, a dying worker,
disaggregated prefill/decode over the tcp transport, and the traffic benchmark."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sys.path.insert(0, str(Path(__file__).parent))

from serve_models import generate_all, hf_greedy, make_llama, make_mixtral  # noqa: E402

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.serve import bench  # noqa: E402
from workbench.serve.traffic import Traffic  # noqa: E402

SPEC = dict(num_pages=128, page_size=8, threads=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def service(llama: Path) -> Any:
    from workbench.serve.service import start_service

    with start_service(llama, api_key="sk-test", max_inflight=8, **SPEC) as svc:
        yield svc


def _client(svc: Any, key: str | None = "sk-test") -> Any:
    return httpx.Client(base_url=svc.url, timeout=60, headers={"Authorization": f"Bearer {key}"} if key else {})


def _gauge(text: str, name: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"workbench:{name}{{"))
    return float(line.rsplit(" ", 1)[1])


# ----- fast unit tests -----
def test_traffic_specs_parse_and_plan() -> None:
    closed = Traffic.parse("concurrency=4,isl=32,osl=8,requests=10")
    assert closed.mode == "closed" and [p["input_len"] for p in closed.plan()] == [32] * 10
    opened = Traffic.parse("rate=4,burstiness=1,dataset=conversation,requests=2000,seed=0")
    plan = opened.plan()
    gaps = np.diff([p["arrival"] for p in plan])
    assert abs(gaps.mean() - 0.25) < 0.02                     # Poisson at 4 req/s
    assert 800 < np.median([p["input_len"] for p in plan]) < 1250   # Azure conversation median 1020
    for bad, field in [("rate=2,bogus=1", "bogus"), ("rate=x", "rate")]:
        with pytest.raises(WorkbenchError, match=field):
            Traffic.parse(bad)


def test_summary_follows_vllm_definitions() -> None:
    rows = pd.DataFrame([
        {"success": True, "ttft": 0.1, "e2el": 0.5, "tpot": (0.5 - 0.1) / 4, "itl": [0.1] * 4, "output_tokens": 5,
         "prompt_tokens": 10, "input_len_planned": 10, "error": None},
        {"success": True, "ttft": 0.3, "e2el": 0.6, "tpot": (0.6 - 0.3) / 3, "itl": [0.1] * 3, "output_tokens": 4,
         "prompt_tokens": 20, "input_len_planned": 20, "error": None},
        {"success": False, "ttft": np.nan, "e2el": np.nan, "tpot": np.nan, "itl": [], "output_tokens": 0,
         "prompt_tokens": None, "input_len_planned": 5, "error": "HTTP 429 overloaded"}])
    m = bench.summarize(rows, 2.0, bench.parse_slo("ttft=200"))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["output_throughput"] == pytest.approx(9 / 2.0)
    assert m["total_token_throughput"] == pytest.approx(39 / 2.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx((100 + 100) / 2)
    assert m["mean_itl_ms"] == pytest.approx(100.0)
    assert m["request_goodput"] == pytest.approx(0.5)           # one request meets TTFT ≤ 200 ms
    assert m["failures"] == {"HTTP 429 overloaded": 1}
    with pytest.raises(WorkbenchError, match="ttft"):
        bench.parse_slo("ttft=fast")


def test_detokenizer_holds_back_stop_strings(llama: Path) -> None:
    from workbench.serve.tokenizer import Detokenizer, TextTokenizer

    tok = TextTokenizer(llama)
    d = Detokenizer(tok, ("STOP",))
    out = "".join(d.add(tok.encode(ch, special=False)) for ch in "abc ST")
    assert out == "abc " and not d.stopped                   # 'ST' may start 'STOP': held back
    out += d.add(tok.encode("OP and more", special=False))
    assert out == "abc " and d.stopped


# ----- the server -----
@pytest.mark.slow
def test_openai_endpoints(service: Any) -> None:
    c = _client(service)
    models = c.get("/v1/models").json()
    assert models["data"][0]["id"] == service.model_name
    r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    body = r.json()
    assert r.status_code == 200 and body["usage"]["completion_tokens"] == 6 and body["choices"][0]["finish_reason"] == "length"
    # the same greedy request twice gives the same text; token-id prompts work too
    assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0,
                                           "ignore_eos": True}).json()["choices"][0]["text"] == body["choices"][0]["text"]
    ids = c.post("/v1/completions", json={"prompt": [104, 101], "max_tokens": 3, "ignore_eos": True}).json()
    assert ids["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    with c.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}) as s:
        lines = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["prompt_tokens"] == len(service.app.tok.encode_chat([{"role": "user", "content": "hi"}]))
    assert c.get("/health").json()["status"] == "ok"
    metrics = c.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_sum", "request_success_total"):
        assert f"workbench:{name}" in metrics
    assert _gauge(metrics, "generation_tokens_total") >= 6 + 6 + 3 + 5


@pytest.mark.slow
def test_bad_requests_get_openai_errors(service: Any) -> None:
    c = _client(service)
    cases = [(b"{not json", 400, None), ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
             ({"prompt": "x", "model": "gpt-9"}, 404, "model"), ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
             ({"prompt": 7}, 400, "prompt"), ({"prompt": "x" * 5000}, 400, "prompt"),
             ({"prompt": "x", "stream": "yes"}, 400, "stream"), ({"messages": "hi"}, 400, "messages")]
    for body, status, param in cases:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert _client(service, key="wrong").post("/v1/completions", json={"prompt": "x"}).status_code == 401
    assert _client(service, key=None).get("/v1/models").status_code == 401


@pytest.mark.slow
def test_stop_string_cuts_the_text(service: Any) -> None:
    c = _client(service)
    full = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 24, "temperature": 0,
                                           "ignore_eos": True}).json()["choices"][0]["text"]
    stop = next((full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]), None)
    if stop is None:
        pytest.skip("the random model wrote no usable stop string")
    cut = c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 24, "temperature": 0, "stop": [stop],
                                          "ignore_eos": True}).json()
    assert cut["choices"][0]["text"] == full[:full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.slow
def test_disconnect_frees_pages_and_overload_answers_429(service: Any) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=60,
                                     headers={"Authorization": "Bearer sk-test"}) as c:
            body = {"prompt": "a long one", "max_tokens": 400, "stream": True, "ignore_eos": True}
            streams = [c.stream("POST", "/v1/completions", json=body) for _ in range(8)]
            opened = [await s.__aenter__() for s in streams]
            assert all(r.status_code == 200 for r in opened)
            extra = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert extra.status_code == 429 and extra.json()["error"]["code"] == "overloaded"
            for r in opened:                    # read a little, then hang up mid-stream
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
            for s in streams:
                await s.__aexit__(None, None, None)
            deadline = time.time() + 20
            while time.time() < deadline:
                m = (await c.get("/metrics")).text
                if _gauge(m, "kv_cache_usage_perc") == 0 and _gauge(m, "num_requests_running") == 0:
                    break
                await asyncio.sleep(0.2)
            assert _gauge(m, "kv_cache_usage_perc") == 0, "pages of disconnected clients were not freed"
            assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
    asyncio.run(main())


@pytest.mark.slow
def test_a_dying_worker_fails_its_requests_with_503(llama: Path) -> None:
    from workbench.serve.service import start_service

    with start_service(llama, **SPEC) as svc:
        c = _client(svc, None)
        pid = svc.backend.procs["worker-0"].proc.pid
        with c.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 400, "stream": True,
                                                        "ignore_eos": True}) as s:
            it = s.iter_lines()
            next(ln for ln in it if ln.startswith("data: "))
            os.kill(pid, signal.SIGKILL)
            rest = [ln for ln in it if ln.startswith("data: ")]
        errors = [json.loads(ln[6:])["error"] for ln in rest if ln.startswith('data: {"error"')]
        assert errors and "worker-0" in errors[0]["message"] and "exit code -9" in errors[0]["message"]
        assert rest[-1] == "data: [DONE]"
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "died" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 503 and c.get("/metrics").status_code == 200   # still up


# ----- disaggregated == colocated == transformers -----
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_disaggregated_equals_colocated_equals_transformers(arch: str, tmp_path: Path) -> None:
    import torch

    from workbench.serve.backend import Backend
    from workbench.serve.sampling import SamplingParams

    path = (make_llama if arch == "llama" else make_mixtral)(tmp_path / arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 37, 12, 70)]
    params = SamplingParams(max_tokens=16, temperature=0)

    got = {}
    for mode in ("colocated", "disaggregated"):
        with Backend(str(path), mode, **SPEC) as b:
            got[mode] = generate_all(b, prompts, params)
            if mode == "disaggregated":
                assert b.settle(10.0), "KV transfers were not all logged within 10 s"
                moved = list(b.transfers)
    ref = [hf_greedy(path, p, 16) for p in prompts]
    assert got["disaggregated"] == got["colocated"] == ref
    assert len(moved) == len(prompts) and all(t["error"] is None and t["bytes"] > 0 for t in moved)



@pytest.mark.slow
def test_disaggregated_over_nixl_equals_transformers(llama: Path) -> None:
    """The KV pages move through the nixl backend (its agent in a child of the prefill and decode
    workers) and the greedy tokens still equal transformers'; every worker is gone afterwards."""
    pytest.importorskip("nixl")
    import torch

    from workbench.serve.backend import Backend
    from workbench.serve.sampling import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 37, 70)]
    params = SamplingParams(max_tokens=12, temperature=0)

    with Backend(str(llama), "disaggregated", transport="nixl", **SPEC) as b:
        got = generate_all(b, prompts, params)
        assert b.settle(10.0), "KV transfers were not all logged within 10 s"
        moved = list(b.transfers)
        procs = [p.proc for p in b.procs.values()]
    assert got == [hf_greedy(llama, p, 12) for p in prompts]
    assert len(moved) == len(prompts) and all(t["error"] is None and t["bytes"] > 0 for t in moved)
    assert not any(p.is_alive() for p in procs)

@pytest.mark.slow
@pytest.mark.parametrize("shard", [{"tp": 2}, {"pp": 3}])
def test_tensor_and_pipeline_parallel_equal_transformers(llama: Path, shard: dict[str, int]) -> None:
    """TP=2 (two processes, gloo all-reduces; NCCL on GPUs) and PP=3 (three processes, activations
    and logits over the tcp transport) give transformers' greedy tokens."""
    import torch

    from workbench.serve.backend import Backend
    from workbench.serve.sampling import SamplingParams

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 41)]

    with Backend(str(llama), "colocated", **shard, **SPEC) as b:
        got = generate_all(b, prompts, SamplingParams(max_tokens=12, temperature=0))
    assert got == [hf_greedy(llama, p, 12) for p in prompts]


@pytest.mark.slow
def test_bench_client_against_the_server(service: Any, tmp_path: Path) -> None:
    res = bench.run(service.url, "concurrency=3,isl=16,osl=8,requests=9", slo="ttft=60000,tpot=60000",
                    api_key="sk-test", progress=False, tokenizer=service.app.tok)
    m = res.metrics
    assert m["completed"] == 9 and m["failed"] == 0
    assert m["total_output_tokens"] == 9 * 8 and m["total_input_tokens"] == 9 * 16
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    ok = res.requests
    assert np.allclose(ok["tpot"], (ok["e2el"] - ok["ttft"]) / (ok["output_tokens"] - 1))
    assert set(res.frame().columns) >= {"request_throughput", "output_throughput", "mean_ttft_ms", "p99_itl_ms"}


def test_bench_initial_test_request(service: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """As `vllm bench serve`: the first request once on its own before the clock (not counted); when it fails (an
    unknown model here) the benchmark stops at once with its error, and the CLI exits 2 naming the fix."""
    r0 = len(service.app.records)
    res = bench.run(service.url, "concurrency=2,isl=8,osl=3,requests=4", api_key="sk-test", progress=False,
                    tokenizer=service.app.tok)
    assert res.metrics["completed"] == 4 and res.meta["initial_test_e2el_s"] > 0
    assert len(service.app.records) - r0 == 5
    with pytest.raises(WorkbenchError, match="initial test request .* failed .*HTTP 404"):
        bench.run(service.url, "concurrency=2,isl=8,osl=3,requests=400", model="nope", api_key="sk-test",
                  progress=False)
    assert len(service.app.records) - r0 == 5                 # nothing of the 400 was sent
    skipped = bench.run(service.url, "concurrency=1,isl=8,osl=2,requests=2", api_key="sk-test", progress=False,
                        initial_test=False)
    assert skipped.meta["initial_test_e2el_s"] is None and len(service.app.records) - r0 == 7
    from workbench.cli import main

    code = main(["bench", "serve", "--url", service.url, "--traffic", "concurrency=1,isl=8,osl=2,requests=3",
                 "--model", "nope", "--api-key", "sk-test", "--no-progress"])
    assert code == 2 and "--no-initial-test" in capsys.readouterr().err


@pytest.mark.slow
def test_live_serving_run_through_the_job_core(llama: Path) -> None:
    """wb.start on a serving job streams Updates in the Result schema and ends in a measured Result,
    which calibrates the simulator (engine steps only)."""
    import workbench as wb
    from workbench.serve.calibrate import calibrate_job
    from workbench.serve.compare import compare_serving
    from workbench.serving import Serving

    job = wb.Job.create("local", str(llama / "config.json"), plan="tp=1,replicas=1",
                        workload=Serving(traffic="concurrency=2,isl=12,osl=5,requests=4"))
    handle = wb.start(job, checkpoint=str(llama), **SPEC)
    updates = list(handle.updates(timeout=300))
    result = handle.wait(timeout=60)
    assert updates and result.source == "run" and result.job is job
    assert result.metrics["completed"] == 4 and len(result.requests) == 4
    ev = result.events
    assert set(ev["op"]) >= {"prefill", "decode", "request"}
    assert (ev.loc[ev["op"] == "request", "ttft"] > 0).all()
    assert (result.memory["category"] == "kv_cache").all() and result.memory["bytes"].max() > 0
    calibrated, fitted = calibrate_job(job, result)
    assert fitted["steps"] > 0 and calibrated.plan.scheduler_us == pytest.approx(fitted["scheduler_us"])
    table = compare_serving(wb.simulate(calibrated), result)
    assert set(table.index) >= {"mean_ttft_ms", "mean_tpot_ms", "output_throughput"}
