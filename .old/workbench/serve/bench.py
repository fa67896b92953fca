"""The traffic benchmark: drive any OpenAI-compatible server and report `vllm bench serve` metrics.

Closed loop (a concurrency), open loop (gamma arrivals at a rate) or a trace; every request
streams, so TTFT and ITL are measured on the client. Definitions (as `vllm bench serve`):
TTFT = request sent → first chunk with a choice, its text possibly empty (queueing included); TPOT per request =
(E2EL − TTFT) / (output tokens − 1); ITL = gaps between chunks, over all chunks; E2EL =
request sent → last chunk; throughputs over the benchmark's duration; goodput = completed
requests per second meeting every SLO (`ttft`, `tpot`, `itl`, `e2el` in ms).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.serve.traffic import Traffic

SLO_KEYS = ("ttft", "tpot", "itl", "e2el")


def parse_slo(spec: str | dict[str, float] | None) -> dict[str, float]:
    """`ttft=200,tpot=50` (milliseconds) → {'ttft': 200.0, 'tpot': 50.0}."""
    if spec is None or spec == "":
        return {}
    items: list[tuple[str, Any]]
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in spec.split(","):
            if "=" not in part:
                raise WorkbenchError(f"--slo: {part!r} is not key=ms (e.g. ttft=200,tpot=50)")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out: dict[str, float] = {}
    for k, v in items:
        if k not in SLO_KEYS:
            raise WorkbenchError(f"--slo: unknown {k!r} (use {', '.join(SLO_KEYS)}, values in ms)")
        try:
            out[k] = float(v)
        except ValueError:
            raise WorkbenchError(f"--slo: {k}={v!r} is not a number of milliseconds") from None
        if out[k] <= 0:
            raise WorkbenchError(f"--slo: {k} must be > 0 ms")
    return out


def _corpus() -> list[str]:
    """Words of the project's own docs: prompts that read like text, not noise."""
    root = Path(__file__).resolve().parents[2]
    words: list[str] = []
    for f in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if f.is_file():
            words.extend(w for w in f.read_text(errors="ignore").split() if w.isascii() and len(w) < 20)
    return words or "the workbench serves a small model over a paged cache and moves pages between workers".split()


@dataclass
class BenchResult:
    """Metrics (vllm bench serve names) and one row per request."""

    metrics: dict[str, Any]
    requests: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "metrics": self.metrics}, indent=1, default=float)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([self.metrics])

    def table(self) -> str:
        m = self.metrics
        lines = [f"{'completed':<28}{m['completed']}", f"{'failed':<28}{m['failed']}",
                 f"{'duration (s)':<28}{m['duration']:.2f}",
                 f"{'request_throughput (req/s)':<28}{m['request_throughput']:.2f}",
                 f"{'output_throughput (tok/s)':<28}{m['output_throughput']:.1f}",
                 f"{'total_token_throughput':<28}{m['total_token_throughput']:.1f}"]
        if "request_goodput" in m:
            lines.append(f"{'request_goodput (req/s)':<28}{m['request_goodput']:.2f}")
        for k in ("ttft", "tpot", "itl", "e2el"):
            lines.append(f"{k.upper() + ' (ms)':<28}mean {m[f'mean_{k}_ms']:.1f}  median {m[f'median_{k}_ms']:.1f}  "
                         f"p99 {m[f'p99_{k}_ms']:.1f}")
        if m.get("failures"):
            lines.append(f"{'failures':<28}{m['failures']}")
        return "\n".join(lines)


def run(url: str, traffic: str | Traffic, *, slo: str | dict[str, float] | None = None, model: str | None = None,
        endpoint: str = "/v1/completions", api_key: str | None = None, ignore_eos: bool = True,
        timeout: float = 300.0, progress: bool = True, tokenizer: Any = None, temperature: float = 0.0,
        initial_test: bool = True) -> BenchResult:
    """Run the benchmark to the end (blocking); see `run_async`."""
    return asyncio.run(run_async(url, traffic, slo=slo, model=model, endpoint=endpoint, api_key=api_key,
                                 ignore_eos=ignore_eos, timeout=timeout, progress=progress, tokenizer=tokenizer,
                                 temperature=temperature, initial_test=initial_test))


async def run_async(url: str, traffic: str | Traffic, *, slo: str | dict[str, float] | None = None,
                    model: str | None = None, endpoint: str = "/v1/completions", api_key: str | None = None,
                    ignore_eos: bool = True, timeout: float = 300.0, progress: bool = True, tokenizer: Any = None,
                    temperature: float = 0.0, initial_test: bool = True) -> BenchResult:
    """The benchmark in the running event loop. The HTTP client is aiohttp's, as `vllm bench serve`'s: a client
    that shares a machine with the server it measures should spend as little of it as it can, and httpx's
    streaming cost several times more CPU per request (the front-end fits of `serve-calibration-h200.md`: the
    client's 4.4-5.1 ms per request with httpx, 0.2-0.4 ms with aiohttp).

    `initial_test`: as `vllm bench serve` ("Starting initial single prompt test run..."), the first request is
    sent once on its own before the clock starts, and a failure of it stops the benchmark with its error (a
    wrong model, endpoint or key fails one request, not the whole run's); it is not counted. It also means a
    server that has just started is measured after its first request, as a long-running server is.

    `meta`: `prompts_cpu_s` (this process's CPU building the prompts) and `setup_cpu_s` (its CPU before the clock
    starts: the model list, the prompts, the initial test request, the connections opened); in a client process of
    its own both are the client's alone."""
    import aiohttp

    setup0 = time.process_time()
    t = Traffic.parse(traffic)
    slos = parse_slo(slo)
    if endpoint not in ("/v1/completions", "/v1/chat/completions"):
        raise WorkbenchError(f"--endpoint: {endpoint!r} is not /v1/completions or /v1/chat/completions")
    plan = t.plan()
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0)  # no cap: the traffic's concurrency is the cap
    async with aiohttp.ClientSession(headers=headers, connector=connector, read_bufsize=1 << 20,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as client:
        if model is None:
            try:
                async with client.get(base + "/v1/models") as r:
                    r.raise_for_status()
                    model = (await r.json())["data"][0]["id"]
            except Exception as exc:  # noqa: BLE001
                raise WorkbenchError(f"--url: cannot list models at {url}/v1/models ({exc}); is the server up?") from None
        words = _corpus()
        rnd = random.Random(t.seed)
        c0 = time.process_time()
        prompts = [_prompt(words, rnd, int(p["input_len"]), tokenizer) for p in plan]
        prompts_cpu = time.process_time() - c0
        initial = None
        if initial_test and plan:
            initial = await _request(client, base + endpoint, model, prompts[0], plan[0], ignore_eos, temperature,
                                     time.perf_counter())
            if not initial["success"]:
                raise WorkbenchError(f"the initial test request to {base + endpoint} failed ({initial['error']}): "
                                     "check --url, --model, --endpoint and --api-key (or skip the test: "
                                     "--no-initial-test)")
        bar = _bar(len(plan), progress)
        rows: list[dict[str, Any]] = [{} for _ in plan]
        sem = asyncio.Semaphore(t.concurrency or t.max_concurrency or len(plan))
        await _open_connections(client, base, min(t.concurrency or t.max_concurrency or 0, len(plan), 64))
        setup_cpu = time.process_time() - setup0
        start = time.perf_counter()

        async def one(i: int) -> None:
            p = plan[i]
            if t.mode != "closed":
                delay = p["arrival"] - (time.perf_counter() - start)
                if delay > 0:
                    await asyncio.sleep(delay)
            async with sem:
                rows[i] = await _request(client, base + endpoint, model, prompts[i], p, ignore_eos, temperature,
                                         start)
            bar.update(1)

        await asyncio.gather(*(one(i) for i in range(len(plan))))
        duration = time.perf_counter() - start
        bar.close()
    df = pd.DataFrame(rows)
    metrics = summarize(df, duration, slos)
    meta = {"url": url, "model": model, "traffic": t.spec(), "endpoint": endpoint, "slo": slos,
            "prompts_cpu_s": prompts_cpu, "setup_cpu_s": setup_cpu,
            "initial_test_e2el_s": None if initial is None else initial["e2el"]}
    return BenchResult(metrics, df, meta)


async def _open_connections(client: Any, base: str, n: int, timeout: float = 10.0) -> None:
    """Open `n` kept-alive connections before the clock starts (`GET /health`, all held open at once so that
    each takes its own): a closed loop at concurrency n then measures the steady state, as a long-running
    client would see it, not n TCP connects (measured 5-27 ms each on a loaded 2-core VM against ~1 ms to send
    on a kept-alive connection). Best effort: a server without /health or a connection that fails leaves the
    benchmark as it was."""
    if n <= 1:
        return
    gate, opened = asyncio.Event(), [0]

    async def one() -> None:
        async with client.get(base + "/health") as r:
            opened[0] += 1
            if opened[0] >= n:
                gate.set()
            try:
                await asyncio.wait_for(gate.wait(), timeout)
            finally:
                await r.read()

    await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)


def _bar(n: int, on: bool) -> Any:
    if on:
        from tqdm.auto import tqdm

        return tqdm(total=n, desc="requests", unit="req", leave=False)

    class _Null:
        def update(self, _: int) -> None: ...
        def close(self) -> None: ...

    return _Null()


def _prompt(words: list[str], rnd: random.Random, n: int, tokenizer: Any) -> str:
    at = rnd.randrange(len(words))
    text = " ".join(words[(at + k) % len(words)] for k in range(n))
    if tokenizer is not None:  # cut to exactly n tokens of the server's tokenizer
        ids = tokenizer.encode(text, special=False)[:n] if hasattr(tokenizer, "encode") else []
        text = tokenizer.decode(ids) if ids else text
    return text


async def _request(client: Any, url: str, model: str, prompt: str, p: dict[str, Any], ignore_eos: bool,
                   temperature: float, start: float) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": int(p["output_len"]), "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": temperature}
    if ignore_eos:
        body["ignore_eos"] = True
    if url.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    row: dict[str, Any] = {"start": 0.0, "input_len_planned": p["input_len"], "output_len_planned": p["output_len"],
                           "prompt_tokens": None, "output_tokens": 0, "ttft": np.nan, "e2el": np.nan,
                           "tpot": np.nan, "itl": [], "success": False, "error": None}
    t0 = time.perf_counter()
    row["start"] = t0 - start
    last = None
    chunks = 0
    try:
        async with client.post(url, json=body) as r:
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")
                try:
                    err = json.loads(text)["error"]
                    why = err.get("code") or err.get("type") or ""
                except Exception:  # noqa: BLE001
                    why = text[:60]
                row["error"] = f"HTTP {r.status} {why}".strip()
                return row
            done = False
            async for line in r.content:  # one SSE line at a time
                # read to the end of the body, past `[DONE]` (as `vllm bench serve` does): a response left unread
                # closes its connection, and the next request pays a new one
                if done or not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    row["error"] = f"stream error {obj['error'].get('code') or obj['error'].get('type')}"
                    return row
                if obj.get("usage"):
                    row["prompt_tokens"] = obj["usage"].get("prompt_tokens")
                    row["output_tokens"] = obj["usage"].get("completion_tokens", chunks)
                choices = obj.get("choices") or []
                if not choices:
                    continue
                # every chunk with a choice carries a step's tokens, its text possibly empty (part of a character, a
                # special token): the first is the first token, as `vllm bench serve` counts it
                now = time.perf_counter()
                if last is None:
                    row["ttft"] = now - t0
                else:
                    row["itl"].append(now - last)
                last = now
                chunks += 1
    except Exception as exc:  # noqa: BLE001 - a failure is a row with its reason, not a crash
        row["error"] = type(exc).__name__
        return row
    if last is None:
        row["error"] = "no tokens"
        return row
    row["e2el"] = last - t0
    if not row["output_tokens"]:
        row["output_tokens"] = chunks
    if row["output_tokens"] > 1:
        row["tpot"] = (row["e2el"] - row["ttft"]) / (row["output_tokens"] - 1)
    row["success"] = True
    return row


def summarize(df: pd.DataFrame, duration: float, slos: dict[str, float] | None = None) -> dict[str, Any]:
    """The `vllm bench serve` metrics of per-request rows (seconds) over `duration`."""
    slos = slos or {}
    ok = df[df["success"]] if len(df) else df
    completed = int(len(ok))
    m: dict[str, Any] = {"completed": completed, "failed": int(len(df) - completed), "duration": duration}
    tin = int(ok["prompt_tokens"].fillna(ok["input_len_planned"]).sum()) if completed else 0
    tout = int(ok["output_tokens"].sum()) if completed else 0
    m.update(total_input_tokens=tin, total_output_tokens=tout,
             request_throughput=completed / duration if duration else 0.0,
             output_throughput=tout / duration if duration else 0.0,
             total_token_throughput=(tin + tout) / duration if duration else 0.0)
    series = {"ttft": ok["ttft"].to_numpy(float) if completed else np.array([]),
              "tpot": ok["tpot"].dropna().to_numpy(float) if completed else np.array([]),
              "itl": np.array([x for xs in ok["itl"] for x in xs], float) if completed else np.array([]),
              "e2el": ok["e2el"].to_numpy(float) if completed else np.array([])}
    for k, v in series.items():
        ms = v * 1000.0
        m[f"mean_{k}_ms"] = float(ms.mean()) if ms.size else 0.0
        m[f"median_{k}_ms"] = float(np.median(ms)) if ms.size else 0.0
        m[f"std_{k}_ms"] = float(ms.std()) if ms.size else 0.0
        m[f"p99_{k}_ms"] = float(np.percentile(ms, 99)) if ms.size else 0.0
    if slos and completed:
        good = np.ones(completed, bool)
        for k, lim in slos.items():
            if k == "itl":
                vals = np.array([max(xs) if len(xs) else 0.0 for xs in ok["itl"]])
            else:
                vals = ok[k].fillna(0.0).to_numpy(float)
            good &= vals * 1000.0 <= lim
        m["request_goodput"] = float(good.sum()) / duration if duration else 0.0
    elif slos:
        m["request_goodput"] = 0.0
    fails = df.loc[~df["success"], "error"].value_counts().to_dict() if len(df) else {}
    m["failures"] = {str(k): int(v) for k, v in fails.items()}
    return m
