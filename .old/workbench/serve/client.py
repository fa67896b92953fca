"""The traffic benchmark in a process of its own, beside the server it measures.

A serving run (and each microbenchmark of the server) drives its traffic from this process, not from a thread of the
server's: as `vllm bench serve` beside vLLM, the client then has its own interpreter and GIL, and the server
process's CPU (the front end's load, which the serving simulator models) is the server's alone. On one H200 with the
1B model (`benchmarks/results/serve-client-process-h200.md`, both clients aiohttp's, one server, alternated runs): at
concurrency 10 the server streamed 2958 tok/s to a client in its process and 3424 to the client process, at 16
3389 against 4488, mean TTFT 20.0 against 14.2 ms.

The process is spawned once (`ClientProcess().start()`, before the server starts: its imports overlap the
workers' start-up) and runs any number of benchmarks (`run`), each returning the `BenchResult` with the client's
own CPU seconds (`meta['client_cpu_s']`). A client that dies or overruns its time fails the call with a
`RunFailed`-style `WorkbenchError` naming the cause; the process dies with its parent (it reads EOF on its pipe).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError


class ClientProcess:
    """A spawned process that runs `workbench.serve.bench.run` against a URL on request."""

    def __init__(self, start_timeout: float = 120.0) -> None:
        self.start_timeout = start_timeout
        self.proc: Any = None
        self.conn: Any = None

    def start(self) -> ClientProcess:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_entry, args=(child,), name="workbench-serve-client", daemon=True)
        self.proc.start()
        child.close()
        return self

    def run(self, url: str, traffic: Any, *, tokenizer: str | Path | None = None, limit: float | None = None,
            **options: Any) -> Any:
        """`bench.run(url, traffic, tokenizer=<the checkpoint's tokenizer>, progress=False, **options)` in the
        client process; the `BenchResult`, its `meta['client_cpu_s']` the client's CPU seconds for the run (its
        prompts built, its requests sent and read, the metrics summarised). `limit`: the whole call's bound in
        seconds; None (a serving run of any length): none beyond each request's own (`bench.run`'s `timeout`, one
        of `options`) and the process staying alive."""
        if self.proc is None:
            self.start()
        spec = traffic.spec() if hasattr(traffic, "spec") else str(traffic)
        try:
            self.conn.send(("run", url, spec, str(tokenizer) if tokenizer else None, options))
        except (OSError, BrokenPipeError):
            raise WorkbenchError(self._gone("before the benchmark was sent")) from None
        end = time.monotonic() + limit + self.start_timeout if limit is not None else float("inf")
        while not self.conn.poll(0.1):
            if not self.proc.is_alive():
                raise WorkbenchError(self._gone("during the benchmark"))
            if time.monotonic() > end:
                self.stop()
                raise WorkbenchError(f"the traffic client did not finish within {limit} s (stopped it)")
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            raise WorkbenchError(self._gone("while sending its result")) from None
        if kind == "error":
            raise WorkbenchError(str(payload))
        return payload

    def _gone(self, when: str) -> str:
        code = self.proc.exitcode if self.proc is not None else None
        return f"the traffic client process died {when} (exit code {code})"

    def kill(self) -> None:
        """End the client now, from any thread: a `run` in progress then fails naming its exit."""
        proc = self.proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send(("stop",))
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()
        self.proc = None

    def __enter__(self) -> ClientProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _entry(conn: Any) -> None:
    """The client process: run each benchmark it is sent until `stop` or its parent's end (EOF)."""
    import asyncio
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it: Ctrl-C there, not a traceback here
    from workbench.serve import bench

    tokenizers: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "run":
            return
        _, url, spec, tok_path, options = msg
        try:
            tok = None
            if tok_path:
                if tok_path not in tokenizers:
                    from workbench.serve.tokenizer import TextTokenizer

                    has = (Path(tok_path) / "tokenizer.json").is_file()
                    tokenizers[tok_path] = TextTokenizer(tok_path) if has else None
                tok = tokenizers[tok_path]
            c0 = time.process_time()
            res = asyncio.run(bench.run_async(url, spec, progress=False, tokenizer=tok, **options))
            res.meta["client_cpu_s"] = time.process_time() - c0
            reply: tuple[str, Any] = ("ok", res)
        except WorkbenchError as exc:
            reply = ("error", str(exc))
        except Exception as exc:  # noqa: BLE001 - the caller gets the cause, the process goes on
            reply = ("error", f"the traffic client failed: {type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (OSError, BrokenPipeError):
            return
