"""A small router in front of local server replicas that adds a replica when load grows and removes
one when idle, draining its in-flight requests first — what the HPA of `workbench deploy k8s` does
on a cluster, runnable on one machine.

Each replica is a real `workbench serve …` process on its own port. The router is an ASGI app
(Starlette + uvicorn) that forwards every OpenAI-API request, streaming included, to the ready
replica with the fewest requests in flight. A control loop samples the load every `poll`
seconds — requests in flight per ready replica, and the replicas' own `num_requests_waiting`
gauges from their `/metrics` — and scales:

- **up** when the mean in flight per ready replica has stayed above `up_inflight` for `up_for`
  seconds (and fewer than `max` replicas exist);
- **down** when a replica has had nothing in flight for `idle_for` seconds (and more than `min`
  exist): it is marked draining (no new requests), and stopped once its last request finished.

`GET /router/state` gives the timeline (time, replicas, ready, in flight, waiting) for the
dashboard and tests; `GET /metrics` exports the same as Prometheus gauges.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError


@dataclass
class Replica:
    port: int
    proc: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    draining: bool = False
    inflight: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    waiting: float = 0.0
    log: str = ""


@dataclass(frozen=True)
class ScalePolicy:
    min: int = 1
    max: int = 4
    up_inflight: float = 4.0
    up_for: float = 2.0
    idle_for: float = 10.0
    poll: float = 0.5
    start_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.max <= 64:
            raise WorkbenchError(f"--replicas: need 1 ≤ MIN ≤ MAX ≤ 64, got {self.min}:{self.max}")
        for name in ("up_inflight", "up_for", "idle_for", "poll", "start_timeout"):
            v = getattr(self, name)
            if not (v == v) or v <= 0 or v > 86_400:
                raise WorkbenchError(f"router.{name}: expected a positive number of at most 86400, got {v!r}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Router:
    """Replicas of `command(port)` behind one port, scaled by `policy`. Use as a context manager."""

    def __init__(self, command: Callable[[int], list[str]], policy: ScalePolicy | None = None,
                 host: str = "127.0.0.1", port: int | None = None, env: dict[str, str] | None = None,
                 log_dir: str | None = None) -> None:
        self.command, self.policy = command, policy or ScalePolicy()
        self.host, self.port = host, port or free_port(host)
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.replicas: list[Replica] = []
        self.timeline: list[dict[str, float]] = []
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._busy_since: float | None = None
        self._server: Any = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ replicas
    def _spawn(self) -> Replica:
        import tempfile

        port = free_port(self.host)
        log = os.path.join(self.log_dir or tempfile.gettempdir(), f"workbench-replica-{port}.log")
        out = open(log, "wb")  # noqa: SIM115 - owned by the process for its lifetime
        from workbench.runner.launcher import _death_signal_hook

        proc = subprocess.Popen(self.command(port), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, preexec_fn=_death_signal_hook(os.getpid()))
        out.close()
        r = Replica(port, proc, time.monotonic(), log=log)
        self.replicas.append(r)
        self._event("start", r)
        return r

    def _stop_replica(self, r: Replica, why: str) -> None:
        if r.proc.poll() is None:
            try:
                os.killpg(r.proc.pid, signal.SIGTERM)
                r.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(r.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                r.proc.wait(timeout=10)
        with self._lock:
            if r in self.replicas:
                self.replicas.remove(r)
        self._event(why, r)

    def _event(self, what: str, r: Replica) -> None:
        self.events.append({"t": time.monotonic() - self._t0, "event": what, "port": r.port,
                            "replicas": len(self.replicas)})

    def _probe(self, r: Replica) -> None:
        import httpx

        try:
            if not r.ready:
                r.ready = httpx.get(f"http://{self.host}:{r.port}/health", timeout=1.0).status_code == 200
                if r.ready:
                    self._event("ready", r)
            if r.ready:
                text = httpx.get(f"http://{self.host}:{r.port}/metrics", timeout=1.0).text
                r.waiting = _gauge(text, "num_requests_waiting")
        except httpx.HTTPError:
            pass

    # ------------------------------------------------------------ control loop
    def _control(self) -> None:
        p = self.policy
        while not self._stop.wait(p.poll):
            now = time.monotonic()
            with self._lock:
                reps = list(self.replicas)
            for r in reps:
                if r.proc.poll() is not None:  # died: replace it, the router stays up
                    self._stop_replica(r, "died")
                    continue
                if not r.ready and now - r.started > p.start_timeout:
                    self._stop_replica(r, "start timeout")
                    continue
                self._probe(r)
            stopping: list[Replica] = []
            with self._lock:
                live = [r for r in self.replicas if not r.draining]
                ready = [r for r in live if r.ready]
                inflight = sum(r.inflight for r in self.replicas)
                waiting = sum(r.waiting for r in self.replicas)
                per = sum(r.inflight for r in ready) / len(ready) if ready else 0.0
                if per > p.up_inflight and len(live) < p.max and all(r.ready for r in live):
                    self._busy_since = self._busy_since or now
                    if now - self._busy_since >= p.up_for:
                        self._spawn()
                        self._busy_since = None
                else:
                    self._busy_since = None
                while len(live) < p.min:
                    live.append(self._spawn())
                idle = [r for r in ready if r.inflight == 0 and now - r.idle_since >= p.idle_for]
                if len(live) > p.min and idle and per <= p.up_inflight / 2:
                    victim = max(idle, key=lambda r: r.started)  # the newest goes first
                    victim.draining = True
                    self._event("drain", victim)
                stopping = [r for r in self.replicas if r.draining and r.inflight == 0]
                for r in stopping:
                    self.replicas.remove(r)
                self.timeline.append({"t": now - self._t0, "replicas": len(self.replicas), "ready": len(ready),
                                      "inflight": inflight, "waiting": waiting})
            for r in stopping:  # outside the lock: requests keep flowing to the others meanwhile
                self._stop_replica(r, "stop")

    def _pick(self) -> Replica | None:
        with self._lock:
            ready = [r for r in self.replicas if r.ready and not r.draining and r.proc.poll() is None]
            if not ready:
                return None
            r = min(ready, key=lambda x: x.inflight)
            r.inflight += 1
            return r

    def _done(self, r: Replica) -> None:
        with self._lock:
            r.inflight -= 1
            if r.inflight == 0:
                r.idle_since = time.monotonic()

    # ------------------------------------------------------------ the HTTP face
    def app(self) -> Any:
        import httpx
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
        from starlette.routing import Route

        client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))

        async def forward(request: Request) -> Response:
            r = None
            deadline = time.monotonic() + 30.0
            while r is None:  # no ready replica (all starting): wait a bounded time
                r = self._pick()
                if r is None:
                    if time.monotonic() > deadline:
                        return JSONResponse({"error": {"message": "no server replica is ready", "type": "unavailable",
                                                       "param": None, "code": 503}}, status_code=503)
                    import asyncio

                    await asyncio.sleep(0.1)
            url = f"http://{self.host}:{r.port}{request.url.path}"
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
            try:
                req = client.build_request(request.method, url, content=await request.body(), headers=headers,
                                           params=request.query_params)
                resp = await client.send(req, stream=True)
            except httpx.HTTPError as exc:
                self._done(r)
                return JSONResponse({"error": {"message": f"replica on port {r.port} failed: {exc}",
                                               "type": "server_error", "param": None, "code": 502}}, status_code=502)

            async def body() -> Any:
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                finally:
                    await resp.aclose()
                    self._done(r)

            return StreamingResponse(body(), status_code=resp.status_code,
                                     media_type=resp.headers.get("content-type"))

        async def health(request: Request) -> Response:
            ok = any(r.ready and not r.draining for r in self.replicas)
            return JSONResponse({"status": "ok" if ok else "starting", "replicas": len(self.replicas)},
                                status_code=200 if ok else 503)

        async def metrics(request: Request) -> Response:
            last = self.timeline[-1] if self.timeline else {"replicas": 0, "ready": 0, "inflight": 0, "waiting": 0}
            lines = [f"# TYPE workbench:router_{k} gauge\nworkbench:router_{k} {float(v)}"
                     for k, v in last.items() if k != "t"]
            lines.append(f"# TYPE workbench:num_requests_waiting gauge\nworkbench:num_requests_waiting {float(last['waiting'])}")
            return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

        async def state(request: Request) -> Response:
            return JSONResponse({"timeline": self.timeline[-5000:], "events": self.events,
                                 "replicas": [{"port": r.port, "ready": r.ready, "draining": r.draining,
                                               "inflight": r.inflight} for r in self.replicas]})

        async def models(request: Request) -> Response:
            return await forward(request)

        routes = [Route("/health", health), Route("/metrics", metrics), Route("/router/state", state),
                  Route("/v1/models", models, methods=["GET"]),
                  Route("/v1/{path:path}", forward, methods=["POST"])]
        return Starlette(routes=routes)

    # ------------------------------------------------------------ lifetime
    def start(self, wait_ready: float = 300.0) -> Router:
        import uvicorn

        for _ in range(self.policy.min):
            self._spawn()
        config = uvicorn.Config(self.app(), host=self.host, port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        for target in (self._server.run, self._control):
            t = threading.Thread(target=target, daemon=True, name="wb-router")
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            if any(r.ready for r in self.replicas) and self._server.started:
                return self
            if any(r.proc.poll() is not None for r in self.replicas) and not any(r.ready for r in self.replicas):
                logs = " ".join(r.log for r in self.replicas)
                self.stop()
                raise WorkbenchError(f"serve: a replica exited before it was ready (logs: {logs})")
            time.sleep(0.2)
        self.stop()
        raise WorkbenchError(f"serve: no replica became ready within {wait_ready:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        for r in list(self.replicas):
            self._stop_replica(r, "shutdown")
        if self._server is not None:
            self._server.should_exit = True
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def frame(self) -> Any:
        """The replica/load timeline as a DataFrame (t, replicas, ready, inflight, waiting)."""
        import pandas as pd

        return pd.DataFrame(self.timeline)


def _gauge(text: str, name: str) -> float:
    """The sum of a gauge's samples in Prometheus text (any prefix, any labels)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        metric = key.split("{")[0]
        if metric.endswith(name):
            try:
                total += float(value)
            except ValueError:
                continue
    return total


def serve_command(target: str, extra: list[str]) -> Callable[[int], list[str]]:
    """The command of one replica: `workbench serve TARGET … --port PORT`."""
    def command(port: int) -> list[str]:
        return [sys.executable, "-m", "workbench.cli", "serve", target, *extra, "--host", "127.0.0.1",
                "--port", str(port)]

    return command
