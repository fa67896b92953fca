"""compare(): per-step alignment by kind/op/rank; calibrate.from_run(): fitted specs move the simulation closer."""

from __future__ import annotations

import pytest

from workbench.comparison import compare, normalise_op, per_step
from workbench.result import Result


def _result(rows: list[tuple[int, str, str, float, float, int]], source: str, step_s: float) -> Result:
    ev = [{"rank": r, "device": f"n0.g{r}", "kind": k, "op": op, "bytes": 0, "links": (), "start": s, "end": e,
           "step": st} for r, k, op, s, e, st in rows]
    return Result(events=ev, metrics={"step_seconds": step_s}, source=source)


def test_compare_aligns_per_step_and_reports_error() -> None:
    # measured: 3 steps, the first (warm-up) slow and left out; forward 0.2 s, all-reduce 0.1 s per step
    meas = _result([(0, "compute", "forward", 0, 1.0, 0), (0, "collective", "all_reduce", 1.0, 1.5, 0),
                    (0, "compute", "forward", 2, 2.2, 1), (0, "collective", "all_reduce", 2.2, 2.3, 1),
                    (0, "compute", "forward", 3, 3.2, 2), (0, "collective", "all_reduce", 3.2, 3.3, 2)], "run", 0.3)
    meas.source = "run"
    sim = _result([(0, "compute", "fwd", 0, 0.25, 0), (0, "collective", "allreduce", 0.25, 0.30, 0)], "sim", 0.30)
    t = compare(sim, meas).set_index(["kind", "op"])
    assert t.loc[("compute", "forward"), "measured_seconds"] == pytest.approx(0.2)
    assert t.loc[("compute", "forward"), "error_pct"] == pytest.approx(25.0)
    assert t.loc[("collective", "all_reduce"), "error_pct"] == pytest.approx(-50.0)
    assert t.loc[("step", "step"), "error_pct"] == pytest.approx(0.0)
    assert t.loc[("compute", "*"), "sim_seconds"] == pytest.approx(0.25)


def test_compare_by_rank_and_bad_key() -> None:
    meas = _result([(0, "compute", "forward", 0, 1, 0), (1, "compute", "forward", 0, 3, 0)], "run", 3.0)
    t = per_step(meas, ("kind", "op", "rank")).set_index("rank")
    assert t.loc[1, "seconds"] == 3.0 and t.loc[0, "seconds"] == 1.0
    assert per_step(meas).loc[0, "seconds"] == 2.0  # ranks averaged
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="by"):
        compare(meas, meas, by=("device",))


def test_normalise_op_names() -> None:
    assert normalise_op("AllReduce") == "all_reduce" and normalise_op("bwd") == "backward"
    assert normalise_op("send_activation") == normalise_op("send_recv") == "send_recv"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_calibration_from_a_real_run_moves_the_simulation_closer() -> None:
    pytest.importorskip("torch")
    try:
        from workbench.plan.search import simulate_train  # noqa: F401
    except ImportError:
        pytest.skip("the training simulator is not installed")
    from workbench.calibration.run import before_after, fit_compute, fit_links
    from workbench.runner import run_train
    from workbench.topology import discover

    r = run_train(plan="pp=2,mbs=2,gbs=8", steps=8, timeout=200, engine="megatron")  # its transfers are timed events
    assert 0 < fit_compute(r) < 10  # TFLOP/s of a CPU rank
    gbps, lat = fit_links(r)  # type: ignore[misc]
    assert gbps > 0 and lat > 0
    ba = before_after(discover(cpu_ranks=2), r)
    assert abs(ba["sim_error_pct_after"]) < abs(ba["sim_error_pct_before"]) or abs(ba["sim_error_pct_after"]) < 25
    assert ba["calibrated_specs"]["fp32_tflops"] != dict(discover(cpu_ranks=2).nodes[0].specs)["fp32_tflops"]
