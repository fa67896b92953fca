"""The span recorder: CPU clock spans, and CUDA-event spans resolved once per step onto the host timeline
without synchronising the device per span (with stand-in events here; with real ones on a GPU)."""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from workbench.runner.telemetry import Recorder  # noqa: E402

DEVICE_CLOCK_OFFSET = 1234.5  # the device's clock starts somewhere else entirely
LAG = 0.002  # the device runs this far behind the host once work is queued


class FakeEvent:
    """A CUDA timing event stand-in: its device time is the host time it was recorded at, shifted to a
    device clock, plus LAG when the fake stream is busy (every event after the step's first one)."""

    created = 0
    synchronized = 0
    busy = False

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        FakeEvent.created += 1
        self.t: float | None = None

    def record(self) -> None:
        self.t = time.perf_counter() + DEVICE_CLOCK_OFFSET + (LAG if FakeEvent.busy else 0.0)
        FakeEvent.busy = True

    def synchronize(self) -> None:
        FakeEvent.synchronized += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.t is not None and end.t is not None
        return (end.t - self.t) * 1e3  # milliseconds, as torch returns


def _step(rec: Recorder, step: int, sleep: float = 0.001) -> tuple[float, float]:
    rec.step = step
    t0 = time.perf_counter()
    with rec.compute("forward", 300.0):
        time.sleep(sleep)
        with rec.comm("collective", "all_reduce", 4096, "tp"):
            time.sleep(sleep)
        time.sleep(sleep)
    with rec.comm("transfer", "send_activation", 128, "pp", 1):
        time.sleep(sleep)
    with rec.compute("optimizer"):
        time.sleep(sleep)
    FakeEvent.busy = False  # the training loop synchronises at the end of a step
    t1 = time.perf_counter()
    return t0, t1


def _fake_cuda_recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    def no_sync(*_a: Any, **_k: Any) -> None:
        raise AssertionError("torch.cuda.synchronize called by the recorder")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    FakeEvent.created = FakeEvent.synchronized = 0
    FakeEvent.busy = False
    rec = Recorder(0, enabled=True, cuda=False)
    rec.cuda, rec._event_cls = True, FakeEvent
    return rec


def test_cpu_spans_are_clock_pairs_split_around_inner_collectives() -> None:
    rec = Recorder(0)
    t0, t1 = _step(rec, 0)
    rec.step_done(0, t0, t1, 1.0)
    ev = rec.take()["events"]
    assert [(e[0], e[1]) for e in ev] == [("collective", "all_reduce"), ("compute", "forward"),
                                         ("compute", "forward"), ("transfer", "send_activation"),
                                         ("compute", "optimizer")]
    assert all(len(e) == 9 and t0 <= e[5] <= e[6] <= t1 for e in ev)
    spans = sorted((e[5], e[6]) for e in ev)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # a rank's events never overlap
    assert sum(e[8] for e in ev if e[1] == "forward") == pytest.approx(300.0)


def test_cuda_spans_are_events_resolved_per_step_on_the_host_timeline(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _fake_cuda_recorder(monkeypatch)
    cpu = Recorder(0)
    t0, t1 = _step(rec, 0)
    assert rec.take()["events"] == []  # nothing resolved before the step is done
    rec.step_done(0, t0, t1, 1.0)
    b = rec.take()
    _, _ = _step(cpu, 0)
    cpu.step_done(0, t0, t1, 1.0)
    want = cpu.take()["events"]
    got = b["events"]
    # the same rows as the CPU path (kind, op, bytes, group, peer, step), only the clock differs
    assert sorted(e[:5] + (e[7],) for e in got) == sorted(e[:5] + (e[7],) for e in want)
    assert all(isinstance(e[5], float) and isinstance(e[6], float) for e in got)
    assert sum(e[8] for e in got if e[1] == "forward") == pytest.approx(300.0)
    # mapped through the step's anchor (its first event, recorded on an idle stream): device clock offset gone;
    # later events carry the device's lag behind the host, as real device times would
    first = min(e[5] for e in got)
    assert t0 <= first <= t0 + 1e-3
    assert all(t0 <= e[5] <= e[6] <= t1 + LAG + 1e-3 for e in got)
    spans = sorted((e[5], e[6]) for e in got)
    assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))
    assert FakeEvent.synchronized == 1  # one wait per step, on its last event; none per span
    # events are recycled: later steps create none
    made = FakeEvent.created
    for s in (1, 2):
        a, z = _step(rec, s)
        rec.step_done(s, a, z, None)
    assert FakeEvent.created == made and FakeEvent.synchronized == 3
    assert {e[7] for e in rec.take()["events"]} == {1, 2}


def test_cuda_recorder_off_steps_record_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _fake_cuda_recorder(monkeypatch)
    for s in range(4):  # the A/B overhead run: odd steps record, even steps do not
        rec.enabled = s % 2 == 1
        a, z = _step(rec, s)
        rec.step_done(s, a, z, None)
    b = rec.take()
    assert {e[7] for e in b["events"]} == {1, 3}
    assert [st["telemetry"] for st in b["steps"]] == [False, True, False, True]
    assert FakeEvent.synchronized == 2


@pytest.mark.gpu  # skipped where no CUDA GPU exists (tests/conftest.py)
@pytest.mark.timeout(120)
def test_real_cuda_events_time_the_device_not_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    rec = Recorder(0, enabled=True, cuda=True)
    real_sync = torch.cuda.synchronize
    calls = []
    for step in range(3):
        rec.step = step
        t0 = time.perf_counter()
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *x: calls.append(x))
        with rec.compute("forward", 1.0):
            for _ in range(20):
                y = a @ a
            launched = time.perf_counter()
            with rec.comm("collective", "all_reduce", 4, "dp"):
                y = y * 2
            y = y + 1
        monkeypatch.setattr(torch.cuda, "synchronize", real_sync)
        real_sync()
        t1 = time.perf_counter()
        rec.step_done(step, t0, t1, None)
        ev = [e for e in rec.take()["events"] if e[7] == step]
        assert not calls, "the recorder synchronised the device inside a step"
        assert len(ev) == 3 and all(t0 - 1e-4 <= e[5] <= e[6] <= t1 + 1e-4 for e in ev), (t0, t1, ev)
        fwd = sorted((e for e in ev if e[1] == "forward"), key=lambda e: e[5])
        # the first forward piece covers the 20 matmuls' device time, long after the host had launched them
        assert fwd[0][6] > launched, (fwd, launched)
        spans = sorted((e[5], e[6]) for e in ev)
        assert all(p[1] <= q[0] + 1e-6 for p, q in zip(spans, spans[1:]))
