"""One call from a checkpoint to a running OpenAI-compatible server: workers, app, HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError


@dataclass
class Service:
    backend: Any
    app: Any
    server: Any
    model_name: str
    path: Path | None = None   # the checkpoint served (its tokenizer cuts a client's prompts to exact lengths)

    @property
    def url(self) -> str:
        return str(self.server.url)

    def stop(self) -> None:
        self.server.stop()
        self.backend.stop()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def resolve_model(model: str | Path) -> Path:
    """`demo` → the embedded small model (trained on first use); otherwise a checkpoint directory."""
    if str(model) == "demo":
        from workbench.serve.demo import demo_checkpoint

        return demo_checkpoint()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise WorkbenchError(f"model: {str(model)!r} is not a directory (give a Hugging Face checkpoint "
                             f"directory with config.json and *.safetensors, or 'demo')")
    return path


def start_service(model: str | Path, mode: str = "colocated", *, host: str = "127.0.0.1", port: int = 0,
                  api_key: str | None = None, name: str | None = None, max_inflight: int = 256,
                  default_max_tokens: int = 64, **spec: Any) -> Service:
    """Start the workers and the HTTP server; `Service.url` is where it listens."""
    from workbench.serve.backend import Backend
    from workbench.serve.server import App, Server
    from workbench.serve.tokenizer import TextTokenizer

    path = resolve_model(model)
    tok = TextTokenizer(path) if (path / "tokenizer.json").is_file() else None
    backend = Backend(str(path), mode, max_inflight=max_inflight, **spec).start()
    try:
        app = App(backend, tok, name or path.name, api_key=api_key, default_max_tokens=default_max_tokens)
        server = Server(app, host, port).start()
    except BaseException:
        backend.stop()
        raise
    return Service(backend, app, server, app.model_name, path)


@contextmanager
def served(model: str | Path, mode: str = "colocated", *, initial_test: bool = True,
           **spec: Any) -> Iterator[tuple[Service, Callable[..., Any]]]:
    """The real server on `model` and `drive(traffic, **options)`: the traffic benchmark against it from a client
    process of its own (`workbench.serve.client`, started first so that its imports overlap the workers' start-up),
    returning the `BenchResult` (`meta['client_cpu_s']`: the client's CPU for the run). Both stop on exit.
    `initial_test`: the benchmark's default for its initial test request (microbenchmarks that count the server's
    steps and records per run turn it off and warm the server up themselves)."""
    from workbench.serve.client import ClientProcess

    with ClientProcess() as client, start_service(model, mode, **spec) as svc:
        yield svc, lambda traffic, **options: client.run(svc.url, traffic, tokenizer=svc.path,
                                                         **({"initial_test": initial_test} | options))


def serve_demo(traffic: str = "concurrency=4,dataset=conversation,scale=0.05,max_isl=200,max_osl=48,requests=24",
               mode: str = "colocated", slo: str | None = "ttft=2000,tpot=200", **spec: Any) -> Any:
    """Start the server on the demo model, drive it with the traffic benchmark (in its own process), stop it.

    Returns the `BenchResult` (metrics in `vllm bench serve` names, per-request rows) with a
    sample completion in `meta["sample"]`.
    """
    import httpx

    with served("demo", mode, **spec) as (svc, drive):
        sample = httpx.post(svc.url + "/v1/completions", timeout=60, json={
            "prompt": "The transport", "max_tokens": 40, "temperature": 0}).json()
        result = drive(traffic, slo=slo)
        result.meta["sample"] = "The transport" + sample["choices"][0]["text"]
        result.meta["mode"] = mode
    return result
