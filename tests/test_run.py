"""Real runs: sharded training equals the single-process reference, loss falls, telemetry streams live,
a failed rank ends the run with an error naming it in bounded time."""

from __future__ import annotations

import tempfile
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from workbench.errors import WorkbenchError  # noqa: E402
from workbench.runner import RunFailed, run_train, start_train  # noqa: E402
from workbench.runner.gpt import gpt_config, init_gpt, reference_train  # noqa: E402
from workbench.runner.launcher import plan_dict  # noqa: E402
from workbench.runner.parallel import Layout, shard  # noqa: E402

SMALL = "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32"


def _max_param_error(plan: str, optimizer: str, lr: float, p2p: str = "auto") -> float:
    c, p = gpt_config(SMALL), plan_dict(plan)
    out = tempfile.mkdtemp()
    r = run_train(model=SMALL, plan=plan, steps=1, optimizer=optimizer, lr=lr, dump_params=out, timeout=120, p2p=p2p,
                  engine="megatron")  # the hand-written engine: its shards compare with the reference one by one
    if p["pp"] > 1:
        assert r.metrics["p2p"] == (["dist"] if p2p == "dist" else ["transport-tcp"])
    ref, ref_losses = reference_train(c, 1, p["gbs"], optimizer=optimizer, lr=lr)
    assert r.metrics["losses"][0] == pytest.approx(ref_losses[0], rel=1e-5)
    full, init = dict(ref.named_parameters()), dict(init_gpt(c).named_parameters())
    worst, seen = 0.0, set()
    for rank in range(p["dp"] * p["tp"] * p["pp"]):
        lay = Layout(p["dp"], p["tp"], p["pp"], rank)
        for name, got in torch.load(f"{out}/rank{rank}.pt").items():
            seen.add(name)
            want = shard(name, full[name].detach(), lay.t, lay.tp, c.heads)
            before = shard(name, init[name].detach(), lay.t, lay.tp, c.heads)
            assert not torch.equal(want, before) or name.startswith("pos"), f"{name} did not move in the reference"
            worst = max(worst, float((got - want).abs().max()))
    assert seen == set(full), f"parameters missing from the shards: {set(full) - seen}"
    return worst


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("plan,p2p", [("dp=2,mbs=2,gbs=8", "auto"), ("tp=2,mbs=2,gbs=4", "auto"),
                                      ("pp=2,mbs=1,gbs=4", "transport"), ("pp=2,mbs=1,gbs=4", "dist")])
def test_one_step_equals_single_process_reference(plan: str, p2p: str) -> None:
    # SGD: the update is proportional to the gradient, so any gradient error shows
    assert _max_param_error(plan, "sgd", 0.1, p2p) < 1e-6


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_zero1_with_adamw_equals_reference() -> None:
    # AdamW's first step divides by |g| + 1e-8, so fp32 rounding of tiny gradients moves by up to ~lr/50
    assert _max_param_error("dp=2,zero=1,mbs=2,gbs=8", "adamw", 1e-3) < 5e-5


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_loss_falls_and_telemetry_streams_while_running() -> None:
    # the hand-written engine times every collective, so its gradient all-reduce is checked here
    h = start_train(model=SMALL, plan="dp=2,mbs=2,gbs=8", steps=8, lr=3e-3, timeout=100, engine="megatron")
    seen, during = [], []
    h.subscribe(lambda u: during.append((u.t, len(u.events))))
    for u in h.updates(timeout=60):
        seen.append(u)
    r = h.wait(timeout=10)
    losses = r.metrics["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2, losses
    # events arrived before the run ended, not all at once at the end
    t_end = max(u.t for u in seen)
    assert any(len(u.events) and u.t < t_end - 0.3 for u in seen)
    assert r.metrics["updates_per_s"] >= 10
    ev = r.events
    assert {"compute", "collective"} <= set(ev["kind"]) and {"group", "step"} <= set(ev.columns)
    assert (ev["end"] >= ev["start"]).all() and set(ev["rank"]) == {0, 1}
    dp = ev[ev["group"] == "dp"]
    assert (dp["bytes"] == r.metrics["params"] * 4).all()  # the whole gradient, once per step and rank
    assert set(r.memory["category"]) == {"weights", "gradients", "optimizer", "activations", "buffers"}
    assert r.memory[r.memory["category"] == "activations"]["bytes"].max() > 0
    assert set(r.links["link"]) <= {"n0.g0<->n0.host", "n0.g1<->n0.host"} and len(r.links)
    assert sum(len(u.events) for u in seen) == len(ev)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("plan", ["dp=2,mbs=2,gbs=8", "pp=2,mbs=2,gbs=8"])
def test_killed_rank_is_named_in_bounded_time_with_partial_results(plan: str) -> None:
    h = start_train(model=SMALL, plan=plan, steps=10_000, timeout=80)
    for u in h.updates(timeout=60):
        if u.step >= 2:
            break
    killed = time.time()
    h.kill_rank(1)
    with pytest.raises(RunFailed) as info:
        h.wait(timeout=30)
    assert time.time() - killed < 30
    err = info.value
    assert err.rank == 1 and "rank 1" in str(err) and "SIGKILL" in str(err)
    assert err.partial is not None and err.partial.metrics["steps"] >= 2 and len(err.partial.events)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_hung_rank_is_named_after_the_stall_timeout() -> None:
    import signal

    h = start_train(model=SMALL, plan="dp=2,mbs=2,gbs=8", steps=10_000, stall_timeout=4, timeout=80)
    for u in h.updates(timeout=60):
        if u.step >= 2:
            break
    stopped = time.time()
    h.kill_rank(1, signal.SIGSTOP)  # alive but frozen: no exit code, no error, no telemetry
    with pytest.raises(RunFailed) as info:
        h.wait(timeout=40)
    assert time.time() - stopped < 15
    assert info.value.rank == 1 and "hang" in str(info.value)
    assert h.pids and all(_gone(pid) for pid in h.pids.values())


def _gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_rank_error_is_reported_with_its_traceback() -> None:
    h = start_train(model=SMALL, plan="dp=2,mbs=2,gbs=8", steps=6, fail_rank_at_step=(0, 3), timeout=80)
    with pytest.raises(RunFailed) as info:
        h.wait(timeout=60)
    assert info.value.rank == 0 and "injected failure at step 3" in str(info.value)
    assert info.value.partial is not None and info.value.partial.metrics["steps"] == 3


def test_cancel_stops_every_rank() -> None:
    h = start_train(model=SMALL, plan="dp=2", steps=10_000, timeout=80)
    threading.Timer(1.0, h.cancel).start()
    with pytest.raises(RunFailed, match="cancelled"):
        h.wait(timeout=30)


@pytest.mark.parametrize("plan,field", [("dp=2,gbs=3", r"plan\.gbs"), ("tp=3", r"plan\.tp"), ("dp=x", r"plan\.dp"),
                                        ("pp=9", r"plan\.pp"), ("foo=1", r"plan(\.foo|: unknown field 'foo')")])
def test_bad_plans_name_the_field(plan: str, field: str) -> None:
    with pytest.raises(WorkbenchError, match=field):
        start_train(model=SMALL, plan=plan, steps=1)


def test_bad_model_names_the_field() -> None:
    with pytest.raises(WorkbenchError, match=r"model\.heads"):
        start_train(model="gpt:layers=2,hidden=100,heads=3,vocab=64,seq=16", plan="dp=1", steps=1)
