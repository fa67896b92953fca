"""Replicas that follow load: a router in front of real `workbench serve demo` processes adds a replica
when load grows and removes one when idle, draining first; no request fails on the way."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from workbench.deploy.router import Router, ScalePolicy, _gauge, serve_command  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402


def test_policy_and_gauge_parsing() -> None:
    with pytest.raises(WorkbenchError, match="--replicas"):
        ScalePolicy(min=3, max=2)
    with pytest.raises(WorkbenchError, match="router.poll"):
        ScalePolicy(poll=float("nan"))
    text = "# TYPE workbench:num_requests_waiting gauge\nworkbench:num_requests_waiting 3.0\nother 9\n"
    assert _gauge(text, "num_requests_waiting") == 3.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replicas_follow_load_up_and_down_without_losing_requests(tmp_path) -> None:
    from workbench.serve.bench import run as bench
    from workbench.serve.demo import demo_checkpoint

    demo_checkpoint()  # built (or reused from the cache) before the clock of the test starts
    policy = ScalePolicy(min=1, max=2, up_inflight=2.0, up_for=1.0, idle_for=4.0, poll=0.25)
    router = Router(serve_command("demo", ["--max-seqs", "4"]), policy, log_dir=str(tmp_path))
    with router:
        assert len(router.replicas) == 1
        results = []

        def load() -> None:  # a burst: 12 clients, long outputs
            results.append(bench(router.url, "concurrency=12,requests=36,isl=16,osl=32", progress=False,
                                 timeout=300))

        t = threading.Thread(target=load)
        t.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(e["event"] == "ready" and e["replicas"] >= 2
                                                       for e in router.events):
            time.sleep(0.5)
        t.join(timeout=300)
        assert results, "the load did not finish"
        up = max(s["replicas"] for s in router.timeline)
        assert up == 2, f"no second replica under load: {router.events}"
        # idle: the extra replica drains and stops
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(router.replicas) > 1
                                               or "stop" not in [e["event"] for e in router.events]):
            time.sleep(0.5)
        assert len(router.replicas) == 1, f"the idle replica was not removed: {router.events}"
        m = results[0].metrics
        assert m["completed"] == 36 and m["failed"] == 0
        events = [e["event"] for e in router.events]
        assert events.index("drain") < events.index("stop")
        frame = router.frame()
        assert {"t", "replicas", "inflight"} <= set(frame.columns) and frame["inflight"].max() >= 2
        pytest.importorskip("plotly")
        from workbench.viz.replicas import replicas_figure

        fig = replicas_figure(frame, router.events)
        assert max(fig.data[0].y) == 2 and "drain" in list(fig.data[-1].text)
    assert not router.replicas
