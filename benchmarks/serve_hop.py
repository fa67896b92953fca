"""Where the HTTP hop goes: per-request timestamps from the client's send to its first chunk, at a few concurrencies.

    python benchmarks/serve_hop.py [CHECKPOINT] [--levels 1,2,6] [--device cuda:0]

Serves CHECKPOINT (default: the calibration benchmark's tiny random Llama, made on first use) colocated, runs the
traffic benchmark's client in this process (as the calibration does), and stamps every request, in ms since the
client called `_request`: `c_head` (the client writes the request's headers), `c_body` (its body), `s_recv` (the
server's event loop reads the body), `h_entry` / `h_parsed` / `h_submitted` (the handler starts, has parsed and
tokenised, has handed the request to the worker pipe), `w_read` (the worker loop read it), `step_t0` / `step_t1`
(its first step), `r_token` (the front end's pipe reader got the first token), `s_chunk` (the handler yields the
first chunk), `c_first` (the client counts its first token). `new_conn` says whether the request opened a TCP
connection. Also each event loop's lag (a 1 ms sleep's overshoot). It wraps private functions of the server,
httpcore and uvicorn's h11 protocol: a diagnostic, not an API. Prints the means per level, writes the rows to
--csv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("key", default=None)
T: dict[str, dict[str, float]] = {}
LAG: dict[str, list[float]] = {"client": [], "server": []}
_MON: dict[str, Any] = {}


def mark(key: str | None, name: str, t: float | None = None) -> None:
    if key is not None:
        T.setdefault(key, {}).setdefault(name, time.time() if t is None else t)


async def _monitor(side: str) -> None:
    while True:
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        LAG[side].append(time.perf_counter() - t - 0.001)


def _start_monitor(side: str) -> None:
    loop = asyncio.get_running_loop()
    task = _MON.get(side)
    if task is None or task.get_loop() is not loop:
        _MON[side] = loop.create_task(_monitor(side))


def instrument() -> None:
    """Wrap the functions each stamp comes from (keyed by the prompt text, unique per request)."""
    import httpcore
    import httpcore._async.connection as hconn
    import httpcore._backends.anyio as hab
    import uvicorn.protocols.http.h11_impl as h11i

    from workbench.serve import bench
    from workbench.serve import server as srv

    o_json, o_parse, o_submit, o_stream = srv.App._json, srv.App._parse, srv.App._submit, srv.App._stream

    async def _json(self: Any, request: Any) -> Any:
        t = time.time()
        _start_monitor("server")
        body = await o_json(self, request)
        key = body.get("prompt") if isinstance(body.get("prompt"), str) else None
        KEY.set(key)
        mark(key, "h_entry", t)
        return body

    def _parse(self: Any, body: Any, chat: bool) -> Any:
        p = o_parse(self, body, chat)
        mark(KEY.get(), "h_parsed")
        return p

    def _submit(self: Any, parsed: Any) -> Any:
        g = o_submit(self, parsed)
        mark(KEY.get(), "h_submitted")
        return g

    async def _stream(self: Any, parsed: Any, gen: Any, chat: bool) -> Any:
        key = KEY.get()
        async for c in o_stream(self, parsed, gen, chat):
            mark(key, "s_chunk")
            yield c

    srv.App._json, srv.App._parse, srv.App._submit, srv.App._stream = _json, _parse, _submit, _stream  # type: ignore[method-assign]

    cur: contextvars.ContextVar[str | None] = contextvars.ContextVar("cur", default=None)
    o_req = bench._request

    async def _request(client: Any, endpoint: str, model: str, prompt: str, p: Any, *a: Any) -> Any:
        _start_monitor("client")
        t0 = time.time()
        cur.set(prompt)
        mark(prompt, "c_send", t0)
        row = await o_req(client, endpoint, model, prompt, p, *a)
        mark(prompt, "c_first", t0 + row["ttft"])
        return row

    bench._request = _request  # type: ignore[assignment]

    o_conn = hconn.AsyncHTTPConnection.handle_async_request

    async def conn(self: Any, request: Any) -> Any:
        T.setdefault(cur.get() or "", {}).setdefault("new_conn", float(self._connection is None))
        return await o_conn(self, request)

    hconn.AsyncHTTPConnection.handle_async_request = conn  # type: ignore[method-assign]
    o_write = hab.AnyIOStream.write

    async def write(self: Any, buffer: bytes, timeout: float | None = None) -> None:
        mark(cur.get(), "c_head" if buffer.startswith(b"POST") else "c_body")
        await o_write(self, buffer, timeout)

    hab.AnyIOStream.write = write  # type: ignore[method-assign]
    o_dr = h11i.H11Protocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        if b'"prompt"' in data:
            try:
                mark(json.loads(data.split(b"\r\n\r\n", 1)[-1]).get("prompt"), "s_recv")
            except ValueError:
                pass
        o_dr(self, data)

    h11i.H11Protocol.data_received = data_received  # type: ignore[method-assign]
    del httpcore


def run(model: str, levels: list[int], spec: dict[str, Any], lengths: str) -> pd.DataFrame:
    from workbench.serve import bench
    from workbench.serve.service import start_service

    frames = []
    with start_service(model, "colocated", **spec) as svc:
        b = svc.backend
        asyncio.run(bench.run_async(svc.url, "concurrency=1,isl=8,osl=4,requests=2", progress=False,
                                    tokenizer=svc.app.tok))  # warm-up
        for c in levels:
            T.clear()
            LAG["client"].clear()
            LAG["server"].clear()
            q0 = len(b.request_log)
            res = asyncio.run(bench.run_async(svc.url, f"concurrency={c},{lengths}", progress=False,
                                              tokenizer=svc.app.tok))
            log = pd.DataFrame(list(b.request_log)[q0:]).sort_values("t_submit").reset_index(drop=True)
            keys = sorted((k for k in T if k and "h_submitted" in T[k]), key=lambda k: T[k]["h_submitted"])
            rows = []
            for k, (_, lg) in zip(keys, log.iterrows()):
                d, t0 = T[k], T[k]["c_send"]
                r: dict[str, Any] = {"concurrency": c, "new_conn": d.get("new_conn", np.nan)}
                for name in ("c_head", "c_body", "s_recv", "h_entry", "h_parsed", "h_submitted"):
                    r[name] = (d[name] - t0) * 1e3 if name in d else np.nan
                for name, f in (("w_read", "t_engine"), ("step_t0", "step_t0"), ("step_t1", "step_t1"),
                                ("r_token", "t_first")):
                    r[name] = (lg[f] + b.t_start - t0) * 1e3
                for name in ("s_chunk", "c_first"):
                    r[name] = (d[name] - t0) * 1e3 if name in d else np.nan
                rows.append(r)
            df = pd.DataFrame(rows)
            lag = {s: np.array(v) * 1e3 for s, v in LAG.items()}
            print(f"\nconcurrency {c}: mean ms since the client's send (client TTFT {res.metrics['mean_ttft_ms']:.1f}, "
                  f"TPOT {res.metrics['mean_tpot_ms']:.1f}; new connections {int(df['new_conn'].sum())} of {len(df)})")
            print(df.drop(columns=["concurrency", "new_conn"]).mean().round(2).to_string())
            for s, v in lag.items():
                if v.size:
                    print(f"{s} loop lag ms: mean {v.mean():.2f}, p90 {np.percentile(v, 90):.2f}, max {v.max():.2f}")
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default="/tmp/wb-serve-calib")
    ap.add_argument("--levels", default="1,2,6")
    ap.add_argument("--lengths", default="isl=48,osl=16,requests=24")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", default="")
    args = ap.parse_args()
    model = Path(args.checkpoint)
    if not (model / "model.safetensors").is_file():
        from workbench.serve.checkpoints import random_llama

        random_llama(model, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, dtype="float32")
    spec: dict[str, Any] = {"page_size": 16, "max_batched_tokens": 256, "max_seqs": 64, "threads": 1}
    if args.device != "cpu":
        spec.update(device=args.device, dtype="bfloat16")
    instrument()
    df = run(str(model), [int(x) for x in args.levels.split(",")], spec, args.lengths)
    if args.csv:
        df.to_csv(args.csv, index=False, float_format="%.3f")


if __name__ == "__main__":
    main()
