"""A serving run, live: start the server, drive it with traffic, stream `Update`s, end in a `Result`.

Updates carry, every `interval` seconds, the rows since the last one in the Result schema:
engine steps as `compute` events (op `prefill` / `decode`, with `batch_seqs` and
`batch_tokens` columns), KV hand-offs as `transfer` events (op `kv_transfer`, with bytes),
finished requests as events on rank -1 (op `request`, with `ttft`, `tpot`, `e2el`), KV-cache
occupancy per worker as memory rows (category `kv_cache`), and KV-transfer bandwidth per link
as link rows. The final `Result` adds the benchmark's metrics (vllm bench serve names) and
`result.requests` (one row per request).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pandas as pd

from workbench.core.stream import RunHandle, Update
from workbench.errors import RunFailed
from workbench.result import Result, events_frame, links_frame, memory_frame


class _Collector:
    """Turns the backend's step/transfer logs and the app's request records into Result rows."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.ranks = {s.name: i for i, s in enumerate(svc.backend.specs)}
        self.roles = {s.name: s.role for s in svc.backend.specs}
        self.devices = {s.name: s.device for s in svc.backend.specs}
        self.n_steps = self.n_tx = self.n_req = 0
        self.shift = svc.backend.t_start - svc.app.t0   # backend times → app (request) times

    def take(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        b, app = self.svc.backend, self.svc.app
        steps = list(b.steps)[self.n_steps:]
        txs = list(b.transfers)[self.n_tx:]
        reqs = list(app.records)[self.n_req:]
        self.n_steps += len(steps)
        self.n_tx += len(txs)
        self.n_req += len(reqs)
        ev, mem, links = [], [], []
        for s in steps:
            role = self.roles[s["worker"]]
            ev.append({"rank": self.ranks[s["worker"]], "device": self.devices[s["worker"]], "kind": "compute",
                       "op": "decode" if role == "decode" or s["batch_tokens"] == s["batch_seqs"] else "prefill",
                       "bytes": 0, "links": (), "start": s["t0"] + self.shift, "end": s["t1"] + self.shift,
                       "batch_seqs": s["batch_seqs"], "batch_tokens": s["batch_tokens"],
                       **{k: v for k, v in s.items() if k.startswith(("t_", "g_", "prefill_", "decode_"))
                          or k == "sampled"}})   # composition and phase seconds (Engine.last_step)
            mem.append({"rank": self.ranks[s["worker"]], "category": "kv_cache", "bytes": s["kv_bytes_used"],
                        "time": s["t1"] + self.shift})
        for t in txs:
            dur = max(t["t1"] - t["t0"], 1e-9)
            ev.append({"rank": self.ranks.get("prefill-0", 0), "device": self.devices.get("prefill-0", "cpu"),
                       "kind": "transfer", "op": "kv_transfer", "bytes": t["bytes"], "links": (t["link"],),
                       "start": t["t0"] + self.shift, "end": t["t1"] + self.shift})
            links.append({"link": t["link"], "start": t["t0"] + self.shift, "end": t["t1"] + self.shift,
                          "GBps": t["bytes"] / dur / 1e9, "utilisation": float("nan")})
        for r in reqs:
            if r.get("e2el") is None:
                continue
            n = r["output_tokens"]
            ev.append({"rank": -1, "device": "client", "kind": "compute", "op": "request", "bytes": 0, "links": (),
                       "start": r["t_arrival"], "end": r["t_arrival"] + r["e2el"], "ttft": r["ttft"],
                       "tpot": (r["e2el"] - r["ttft"]) / (n - 1) if n > 1 else float("nan"), "e2el": r["e2el"],
                       "prompt_tokens": r["prompt_tokens"], "output_tokens": n})
        return events_frame(ev), memory_frame(mem), links_frame(links)


def start(model: str = "demo", traffic: str = "concurrency=4,isl=64,osl=32,requests=32", mode: str = "colocated",
          slo: str | None = None, interval: float = 0.25, job: Any = None, **spec: Any) -> RunHandle:
    """Serve `model`, run `traffic` against it and stream the run; returns at once."""
    from workbench.serve.client import ClientProcess
    from workbench.serve.traffic import Traffic

    t = Traffic.parse(traffic)
    client = ClientProcess()    # its own process (and GIL), as a benchmark client beside a server runs
    cancelled = threading.Event()

    def cancel() -> None:       # the traffic ends now; the run then fails as cancelled and stops the server
        cancelled.set()
        client.kill()

    handle = RunHandle(t.requests, cancel=cancel)

    def main() -> None:
        from workbench.serve.service import start_service

        client.start()
        try:
            svc = start_service(model, mode, **spec)
        except Exception as exc:  # noqa: BLE001
            client.stop()
            handle._finish(error=RunFailed(None, f"serve: the server did not start: {exc}"))
            return
        col = _Collector(svc)
        frames: list[tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = []
        done = threading.Event()

        def pump() -> None:
            while True:
                finished = done.wait(interval)
                e, m, lk = col.take()
                frames.append((e, m, lk))
                n = len(svc.app.records)
                handle._emit(Update(e, m, lk, min(n, t.requests), t.requests, min(1.0, n / t.requests),
                                    time.time() - handle.t0))
                if finished:
                    return

        pumper = threading.Thread(target=pump, name="serve-run-updates", daemon=True)
        pumper.start()
        # the server process's CPU while the traffic runs (its HTTP server, the pipes, this run's updates; the
        # engine runs in its worker processes, the client in its own): the front end's load, in cores. The window
        # also holds what the client does before its clock (the initial test request, the connections opened),
        # which the benchmark's duration leaves out: one request's work more than the run's
        c0 = time.process_time()
        if cancelled.is_set():   # cancelled while the server started
            client.kill()
        try:
            res = client.run(svc.url, t, tokenizer=svc.path, slo=slo)
        except Exception as exc:  # noqa: BLE001
            done.set()
            pumper.join()
            svc.stop()
            client.stop()
            why = "cancelled" if cancelled.is_set() else f"the traffic run failed: {exc}"
            handle._finish(error=RunFailed(None, f"serve: {why}"))
            return
        client.stop()
        duration = float(res.metrics.get("duration") or 0.0)
        frontend_cores = (time.process_time() - c0) / max(duration, 1e-9)
        svc.backend.settle()
        done.set()
        pumper.join()
        svc.stop()
        ev = pd.concat([f[0] for f in frames], ignore_index=True) if frames else events_frame()
        mem = pd.concat([f[1] for f in frames], ignore_index=True) if frames else memory_frame()
        lk = pd.concat([f[2] for f in frames], ignore_index=True) if frames else links_frame()
        metrics = {k: v for k, v in res.metrics.items() if not isinstance(v, dict)}
        metrics["failures"] = res.metrics.get("failures", {})
        metrics["mode"] = mode
        metrics["frontend_cores"] = frontend_cores
        client_s = float(res.meta.get("client_cpu_s", float("nan"))) - float(res.meta.get("setup_cpu_s", 0.0))
        metrics["client_cores"] = client_s / max(duration, 1e-9)   # its work before the clock left out
        result = Result(ev, mem, lk, metrics, source="run", fidelity="measured", job=job)
        result.requests = res.requests  # type: ignore[attr-defined]
        # where each request's time to first token went (Backend.request_log), on the events' clock
        log = pd.DataFrame(list(svc.backend.request_log))
        shifted = {c: log[c] + col.shift for c in ("t_submit", "t_engine", "step_t0", "step_t1", "t_first", "t_end")
                   if c in log}
        result.request_log = log.assign(**shifted)  # type: ignore[attr-defined]
        handle._finish(result)

    threading.Thread(target=main, name="serve-run", daemon=True).start()
    return handle


def start_job(job: Any, checkpoint: str = "demo", **options: Any) -> RunHandle:
    """The core engines' runner for `serving` jobs: the job's traffic against `checkpoint` served for real.

    The job's plan says colocated or disaggregated (`prefill_workers` > 0 or `mode=disaggregated`), and its
    `kv_transport` (when set) the backend the KV pages move with, its `cuda_graph` whether a GPU worker captures
    its decode-only steps (`workbench.serve.graphs`).
    """
    w = job.workload
    traffic: Any = getattr(w, "traffic", None)
    spec = traffic.spec() if hasattr(traffic, "spec") else str(traffic)
    pd_split = bool(getattr(job.plan, "disaggregated", False))
    kv_transport = getattr(job.plan, "kv_transport", "")
    if kv_transport and "transport" not in options:
        options = {**options, "transport": kv_transport}
    if "cuda_graph" not in options:   # a GPU worker replays its decode-only steps as graphs where the plan says so
        options = {**options, "cuda_graph": bool(getattr(job.plan, "cuda_graph", True))}
    slo = getattr(w, "slo", None)
    slo_spec = str(slo) if slo is not None and getattr(slo, "any", True) else None
    return start(checkpoint, spec, "disaggregated" if pd_split else "colocated", slo=slo_spec or None, job=job,
                 **options)
