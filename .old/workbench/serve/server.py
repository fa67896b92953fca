"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of a `Backend`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (streaming as server-sent events
ending `data: [DONE]`, `stream_options.include_usage`), `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text, vLLM's names under `workbench:`). Errors carry OpenAI's body
`{"error": {"message", "type", "param", "code"}}`: 400 for bad fields, 401 without the API key,
404 for an unknown model, 429 when the in-flight bound is reached, 503 when a worker died.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request  # resolved by FastAPI from this module's globals (annotations are strings)

from workbench.errors import WorkbenchError
from workbench.serve.backend import Backend, Overloaded, WorkerDied
from workbench.serve.metrics import Metrics
from workbench.serve.sampling import SamplingParams
from workbench.serve.tokenizer import Detokenizer, TextTokenizer


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


def _num(body: dict[str, Any], key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(key, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise _bad(key, f"must be ≥ {lo:g}, got {v}" if hi >= 1 << 20 else f"must be between {lo:g} and {hi:g}, got {v}")
    return v


@dataclass
class _Parsed:
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


class App:
    """Holds the backend, tokenizer and metrics; `app` is the FastAPI application."""

    def __init__(self, backend: Backend, tokenizer: TextTokenizer | None, model_name: str,
                 api_key: str | None = None, default_max_tokens: int = 64) -> None:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

        self.backend, self.tok, self.model_name, self.api_key = backend, tokenizer, model_name, api_key
        self.default_max_tokens = default_max_tokens
        self.metrics = Metrics(model_name)
        self.records: list[dict[str, Any]] = []     # one row per finished or failed request
        self.t0 = time.time()
        app = FastAPI(title="workbench serve", docs_url=None, redoc_url=None)
        self.app = app

        @app.exception_handler(ApiError)
        async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.get("/health")
        async def health() -> JSONResponse:
            ok, why = self.backend.health()
            return JSONResponse({"status": "ok" if ok else "unhealthy", "detail": why}, status_code=200 if ok else 503)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self.metrics.render(self.backend.stats()),
                                     media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            self._auth(request)
            return JSONResponse({"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": int(self.t0), "owned_by": "workbench",
                "max_model_len": self.backend.context_length}]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            self._auth(request)
            body = await self._json(request)
            parsed = self._parse(body, chat=False)
            gen = self._submit(parsed)
            if parsed.stream:
                return StreamingResponse(self._stream(parsed, gen, chat=False), media_type="text/event-stream")
            return JSONResponse(await self._complete(parsed, gen, chat=False))

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            self._auth(request)
            body = await self._json(request)
            parsed = self._parse(body, chat=True)
            gen = self._submit(parsed)
            if parsed.stream:
                return StreamingResponse(self._stream(parsed, gen, chat=True), media_type="text/event-stream")
            return JSONResponse(await self._complete(parsed, gen, chat=True))

    # ----- parsing -----
    def _auth(self, request: Any) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    async def _json(self, request: Any) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"body: not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body: must be a JSON object")
        return body

    def _parse(self, body: dict[str, Any], chat: bool) -> _Parsed:
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise ApiError(404, f"model: {model!r} does not exist (served: {self.model_name!r})",
                           param="model", code="model_not_found")
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                raise _bad("messages", "must be a non-empty list of {role, content} objects")
            for m in msgs:
                c = m.get("content")
                if isinstance(c, list):  # OpenAI content parts: keep the text parts
                    m["content"] = "".join(p.get("text", "") for p in c if isinstance(p, dict))
                elif not isinstance(c, str):
                    raise _bad("messages", "each content must be a string")
            if self.tok is None:
                raise _bad("messages", "this model has no tokenizer; use /v1/completions with token ids")
            try:
                prompt = self.tok.encode_chat(msgs)
            except WorkbenchError as exc:
                raise _bad("messages", str(exc)) from None
            param = "messages"
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
                p = p[0]
            if isinstance(p, str):
                if self.tok is None:
                    raise _bad("prompt", "this model has no tokenizer; send token ids (a list of integers)")
                prompt = self.tok.encode(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                prompt = list(p)
            else:
                raise _bad("prompt", "must be a string or a non-empty list of token ids (one prompt per request)")
            param = "prompt"
        if not prompt:
            raise _bad(param, "is empty after tokenisation")
        ctx = self.backend.context_length
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _num(body, key, min(self.default_max_tokens, max(1, ctx - len(prompt))), 1, 1 << 30, True)
        if len(prompt) + max_tokens > ctx:
            if len(prompt) >= ctx:
                raise _bad(param, f"is {len(prompt)} tokens; this model's context is {ctx} tokens")
            raise _bad(key, f"prompt ({len(prompt)} tokens) + {key} ({max_tokens}) exceeds the context of {ctx} tokens")
        if _num(body, "n", 1, 1, 1, True) != 1:
            raise _bad("n", "only n=1 is served")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
            raise _bad("stop", "must be a string or a list of up to 8 non-empty strings")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream", f"must be true or false, got {json.dumps(stream)}")
        so = body.get("stream_options") or {}
        if not isinstance(so, dict):
            raise _bad("stream_options", "must be an object such as {\"include_usage\": true}")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbits(31)
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", f"must be an integer, got {json.dumps(seed)}")
        ids = body.get("stop_token_ids") or []
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise _bad("stop_token_ids", "must be a list of integers")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad("ignore_eos", "must be true or false")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=float(_num(body, "temperature", 1.0, 0.0, 2.0)),
            top_p=float(_num(body, "top_p", 1.0, 1e-9, 1.0)), top_k=int(_num(body, "top_k", 0, -1, 1 << 20, True)),
            seed=int(seed) & 0x7FFF_FFFF, stop=tuple(stop), stop_token_ids=tuple(ids), ignore_eos=ignore_eos)
        return _Parsed(prompt, params, stream, bool(so.get("include_usage", False)))

    # ----- generation -----
    def _submit(self, parsed: _Parsed) -> tuple[AsyncIterator[Any], float]:
        """Admit the request before any response byte: 429 when over the bound, 503 when a worker is dead."""
        t_arr = time.time()
        try:
            return self.backend.generate(parsed.prompt, parsed.params), t_arr
        except Overloaded as exc:
            self.metrics.failure("overloaded")
            self.records.append({"t_arrival": t_arr - self.t0, "prompt_tokens": len(parsed.prompt),
                                 "output_tokens": 0, "ttft": None, "e2el": None, "status": "rejected",
                                 "error": str(exc)})
            raise ApiError(429, f"server overloaded: {exc}; retry later", "rate_limit_error",
                           code="overloaded") from None
        except WorkerDied as exc:
            self.metrics.failure("worker_died")
            raise ApiError(503, f"the server cannot take requests: {exc}", "server_error", code="worker_died") from None

    async def _events(self, parsed: _Parsed, gen: Any, t_arr: float) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text delta, finish reason or None, tokens so far); records latencies and metrics."""
        detok = Detokenizer(self.tok, parsed.params.stop)
        rec: dict[str, Any] = {"t_arrival": t_arr - self.t0, "prompt_tokens": len(parsed.prompt), "output_tokens": 0,
                               "ttft": None, "e2el": None, "status": "running", "error": None}
        last = None
        n = 0
        try:
            try:
                async for ev in gen:
                    if ev.error is not None:
                        raise WorkerDied(ev.error)
                    now = time.time()
                    if ev.tokens:
                        if last is None:
                            rec["ttft"] = now - t_arr
                            self.metrics.observe("time_to_first_token_seconds", now - t_arr)
                        else:
                            self.metrics.observe("inter_token_latency_seconds", now - last)
                        last = now
                        n += len(ev.tokens)
                    text = detok.add(ev.tokens, final=ev.finish is not None) if self.tok else ""
                    finish = ev.finish
                    if detok.stopped:
                        finish = "stop"
                    if finish is not None:
                        finish = "stop" if finish == "stop" else "length"
                        rec.update(status="ok", output_tokens=n, e2el=time.time() - t_arr, finish=finish)
                        self.metrics.observe("e2e_request_latency_seconds", time.time() - t_arr)
                        self.metrics.finished(finish)
                        yield text, finish, n
                        await gen.aclose()   # a stop string ends the request early: frees its pages
                        return
                    yield text, None, n
            except WorkerDied as exc:
                rec.update(status="failed", error=str(exc))
                self.metrics.failure("worker_died")
                raise ApiError(503, f"the request failed: {exc}", "server_error", code="worker_died") from None
        except (asyncio.CancelledError, GeneratorExit):
            rec.update(status="cancelled")
            await gen.aclose()
            raise
        finally:
            rec["output_tokens"] = n
            self.records.append(rec)

    def _usage(self, parsed: _Parsed, n: int) -> dict[str, int]:
        return {"prompt_tokens": len(parsed.prompt), "completion_tokens": n, "total_tokens": len(parsed.prompt) + n}

    async def _complete(self, parsed: _Parsed, gen: tuple[Any, float], chat: bool) -> dict[str, Any]:
        text, finish, n = [], None, 0
        async for delta, fin, count in self._events(parsed, *gen):
            text.append(delta)
            finish, n = fin or finish, count
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time())
        choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                   "logprobs": None, "finish_reason": finish} if chat else
                                  {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model_name, "choices": [choice], "usage": self._usage(parsed, n)}

    async def _stream(self, parsed: _Parsed, gen: tuple[Any, float], chat: bool) -> AsyncIterator[str]:
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": delta or ""} if first else (
                    {"content": delta} if delta else {})
                choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                          "choices": [choice]}) + "\n\n"

        n = 0
        try:
            # one chunk per step's new tokens, as vLLM streams: a token whose text is held back (part of a UTF-8
            # character, a possible stop string, a special token) still sends its chunk, text "", so the client
            # sees the first token when it is made, not a step later; chat's role goes with the first token
            async for delta, fin, count in self._events(parsed, *gen):
                new, first, n = count > n, n == 0, count
                if delta or fin or new:
                    yield chunk(delta, fin, first=chat and first)
        except ApiError as exc:
            yield "data: " + json.dumps(exc.body()) + "\n\n"
        if parsed.include_usage:
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": self.model_name,
                                         "choices": [], "usage": self._usage(parsed, n)}) + "\n\n"
        yield "data: [DONE]\n\n"


class Server:
    """uvicorn running an `App` on a background thread; `url` once started, `stop()` to end."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app, self.host, self.port = app, host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def start(self) -> Server:
        import uvicorn

        # proto IPPROTO_TCP, not 0: accepted connections inherit it, and asyncio sets TCP_NODELAY only on a socket
        # whose proto says TCP. Without it, a kept-alive stream's chunks wait on Nagle and the client's delayed ACK
        # (~40 ms each on Linux); a pre-bound socket is how uvicorn is given port 0 here
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise WorkbenchError(f"--port: cannot bind {self.host}:{self.port} ({exc.strerror}); choose another port") from None
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(self.app.app, log_level="warning", timeout_graceful_shutdown=2, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="workbench-serve-http", daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise WorkbenchError("serve: the HTTP server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        if self._sock is not None:
            self._sock.close()

    def serve_forever(self) -> None:
        assert self._thread is not None
        while self._thread.is_alive():
            self._thread.join(0.5)
