"""`workbench bench transport|kernels|serve` write the one benchmark record (workbench.bench.record) with
the one machine block (workbench.bench.machine); their extra fields live in the summary, flattened."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from workbench.bench import record as rec
from workbench.errors import WorkbenchError


def test_flat_puts_nested_fields_into_summary_entries() -> None:
    nested = {"soak": {"writes": 10, "lost": 0}, "copies": {"memcpy": 3}, "lanes": (1, 2), "backend": "tcp"}
    with pytest.raises(WorkbenchError, match="summary.soak"):
        rec.record("x", [], nested, "c", machine="m")
    summary = rec.flat(nested)
    assert summary == {"soak_writes": 10, "soak_lost": 0, "copies_memcpy": 3, "lanes": "1,2", "backend": "tcp"}
    assert rec.record("x", [], summary, "c", machine="m")["summary"] == summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_transport_save_writes_the_one_shape(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from functools import partial

    from transport import bench

    # a real run of the command, with fewer paged and batched shapes than the full sweep (CI time)
    monkeypatch.setattr(bench, "run", partial(bench.run, page_sizes=(16 << 10, 64 << 10), paged_total=2 << 20,
                                              batches=((4 << 10, 16),)))
    code, out, err = cli("bench", "transport", "--quick", "--no-baselines", "--lanes", "1", "--soak", "100",
                         "--save", "test-box", "--out-dir", str(tmp_path))
    assert code == 0, err
    saved = rec.load(tmp_path / "transport-test-box.json")
    assert saved["benchmark"] == "transport" and saved["machine"]["name"] == "test-box"
    assert saved["machine"]["cpus_usable"] >= 1 and isinstance(saved["machine"]["gpus"], list)
    assert saved["command"] == "workbench bench transport --backend tcp --lanes 1 --no-baselines --quick --soak 100"
    s = saved["summary"]
    assert (s["backend"], s["device"], s["target_device"]) == ("tcp", "cpu", "cpu")
    assert (s["soak_writes"], s["soak_lost"], s["soak_corrupted"]) == (100, 0, 0)
    assert s["single_reference_for_paged_bytes"] == 2 << 20 and s["single_reference_for_paged_GBps"] > 0
    assert 0 < s["paged_64KiB_vs_single"] and s["batch_min_us_per_write"] > 0
    assert {r["mode"] for r in saved["rows"]} == {"single", "batch", "paged", "imm"}
    assert all(r["backend"] == "tcp" and r["GBps"] >= 0 for r in saved["rows"])
    md = (tmp_path / "transport-test-box.md").read_text()
    assert saved["command"] in md and "| bytes |" in md


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_kernels_out_writes_the_one_shape(cli, tmp_path: Path) -> None:
    pytest.importorskip("numba")
    out = tmp_path / "kernels.json"
    code, stdout, err = cli("bench", "kernels", "--device", "cpu", "--size", "256KiB", "--out", str(out),
                            "--machine", "test-box")
    assert code == 0, err
    saved = rec.load(out)
    assert saved["benchmark"] == "kernels" and saved["machine"]["name"] == "test-box"
    assert saved["command"] == "workbench bench kernels --device cpu --size 256KiB --gpu-sizes 256MiB,1GiB"
    kernels = {r["kernel"] for r in saved["rows"]}
    assert {"moe_dispatch", "kv_gather", "fp8_quant"} <= kernels and {r["device"] for r in saved["rows"]} == {"cpu"}
    s = saved["summary"]
    assert s["numba"] and s["numba_threads"] >= 1 and s["numpy"]
    assert {f"{k}_cpu_vs_copy" for k in kernels} <= set(s) and all(s[f"{k}_cpu_vs_copy"] > 0 for k in kernels)
    assert "moe_dispatch" in stdout  # the table still prints


def test_bench_serve_refuses_a_bad_out_before_any_traffic(cli) -> None:
    code, _, err = cli("bench", "serve", "--url", "http://127.0.0.1:9", "--traffic", "concurrency=1,isl=4,osl=4,requests=1",
                       "--out", "/nonexistent/dir/serve.json")
    assert code == 2 and "--out" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_serve_out_writes_the_one_shape(cli, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("fastapi")
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_models import make_llama

    from workbench.serve.service import start_service

    llama = make_llama(tmp_path / "llama")
    out = tmp_path / "serve.json"
    with start_service(llama, num_pages=64, page_size=8, threads=1) as svc:
        code, stdout, err = cli("bench", "serve", "--url", svc.url, "--traffic", "concurrency=2,isl=8,osl=4,requests=4",
                                "--slo", "ttft=60000,tpot=60000", "--no-progress", "--out", str(out),
                                "--machine", "test-box")
    assert code == 0, err
    saved: dict[str, Any] = rec.load(out)
    assert saved["benchmark"] == "serve" and saved["machine"]["name"] == "test-box"
    assert saved["command"] == (f"workbench bench serve --url {svc.url} --traffic concurrency=2,isl=8,osl=4,requests=4"
                                " --slo ttft=60000,tpot=60000 --endpoint /v1/completions")
    s = saved["summary"]
    assert s["completed"] == 4 and s["failed"] == 0 and s["total_output_tokens"] == 4 * 4
    assert s["request_goodput"] == pytest.approx(s["request_throughput"]) and s["mean_ttft_ms"] > 0
    assert s["slo_ttft"] == 60000 and s["url"] == svc.url and s["traffic"]
    rows = saved["rows"]
    assert len(rows) == 4 and all(r["success"] and r["output_tokens"] == 4 and len(r["itl"]) <= 3 for r in rows)
