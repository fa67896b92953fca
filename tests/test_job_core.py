"""The job core: one Job value object, one rank layout shared by simulator, runner and compare."""

from __future__ import annotations

import subprocess
import sys

import pytest

import workbench as wb
from workbench.core.layout import RankLayout, split_layers, stage_layers
from workbench.core.ops import bus_factor, normalise_op, op, wire_bytes
from workbench.errors import WorkbenchError


def test_rank_layout_is_megatron_order() -> None:
    lay = RankLayout(tp=2, cp=1, dp=2, pp=2)
    assert lay.world == 8
    assert [lay.stage_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert lay.coords(5) == {"tp": 1, "cp": 0, "dp": 0, "pp": 1}
    assert lay.group("tp", 5) == (4, 5) and lay.group("dp", 5) == (5, 7) and lay.group("pp", 5) == (1, 5)
    assert lay.first_rank(1) == 4
    assert all(lay.rank_of(**{k: v for k, v in lay.coords(r).items()}) == r for r in range(8))
    assert sorted(r for g in lay.groups("tp") for r in g) == list(range(8))


def test_rank_layout_expert_groups_and_errors() -> None:
    lay = RankLayout(dp=4, ep=2)
    assert lay.group("ep", 0) == (0, 1) and lay.group("ep", 3) == (2, 3) and lay.group("edp", 1) == (1, 3)
    with pytest.raises(WorkbenchError, match="plan.ep"):
        RankLayout(dp=3, ep=2)
    with pytest.raises(WorkbenchError, match="plan.tp"):
        RankLayout(tp=0)
    assert split_layers(10, 4) == [3, 3, 2, 2] and list(stage_layers(10, 4, 1)) == [3, 4, 5]


def test_one_op_vocabulary() -> None:
    assert op("AllReduce").kind == "collective" and op("fwd").kind == "compute" and op("send").kind == "transfer"
    assert bus_factor("all_reduce", 8) == pytest.approx(1.75)
    assert wire_bytes("all_gather", 800, 8) == pytest.approx(700)
    assert wire_bytes("send_recv", 800, 2) == 800
    assert normalise_op("reduce-scatter") == "reduce_scatter"


def test_job_round_trip_and_edge_errors(tmp_path) -> None:
    job = wb.Job.create("aws-p5:nodes=2", "llama3-8b", "tp=8,pp=2,gbs=32", steps=3)
    assert job.kind == "training" and job.workload.steps == 3 and job.layout == RankLayout(tp=8, pp=2)
    again = wb.Job.load(job.save(tmp_path / "job.yaml"))
    assert again == job
    assert wb.Job.from_dict(job.to_dict()) == job
    with pytest.raises(WorkbenchError, match="workload.steps"):
        wb.Job.create("aws-p5", "llama3-8b", "tp=8", steps=0)
    with pytest.raises(WorkbenchError, match="job: unknown field"):
        wb.Job.from_dict({"cluster": "aws-p5", "model": "llama3-8b", "plans": "tp=8"})
    with pytest.raises(WorkbenchError, match="workload.kind"):
        wb.Job.create("aws-p5", "llama3-8b", "tp=8", workload="baking")
    html = job._repr_mimebundle_()["text/html"]
    assert "llama3-8b" in html and "<script" not in html


def test_simulate_completes_the_plan_and_carries_the_job() -> None:
    job = wb.Job.create("aws-p5:nodes=2", "llama3-8b", "gbs=32")
    r = wb.simulate(job)
    assert r.job is not None and r.job.plan.complete and r.metrics["step_seconds"] > 0
    assert {"step_seconds", "tokens_per_s", "tflops_per_gpu", "mfu"} <= set(r.metrics)
    lay = r.job.layout
    assert set(r.events["rank"]) == {lay.first_rank(s) for s in range(lay.pp)}


def test_import_workbench_is_light() -> None:
    code = ("import sys, workbench as wb; wb.Job; wb.simulate; wb.start; wb.search; wb.compare; wb.calibrate; "
            "print(sorted(m for m in ('torch', 'plotly', 'ipywidgets', 'numba', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pp2_dp2_run_compares_stage_by_stage_with_its_simulation() -> None:
    """Ranks of a pp=2 × dp=2 run sit in the same stages as the simulator's: rank r of the run and
    rank r of the prediction hold the same layers (this failed while the runner ordered tp→pp→dp)."""
    pytest.importorskip("torch")
    from workbench.runner.launcher import local_job

    job = local_job(None, "gpt:layers=2,hidden=64,heads=4,vocab=128,seq=32", "dp=2,pp=2,mbs=1,gbs=4", steps=3)
    measured = wb.run(job, timeout=240)
    predicted = wb.simulate(measured.job)
    lay = measured.job.layout
    assert lay == RankLayout(dp=2, pp=2)
    assert 0 < measured.metrics["mfu"] < 1 and measured.metrics["tflops_per_gpu"] > 0
    # the runner's events name their stage; it is the layout's stage of that rank
    ev = measured.events
    assert (ev["stage"] == ev["rank"].map(lay.stage_of)).all()
    # each simulated rank is the representative of its stage, and the run's same rank is in that stage
    for rank in predicted.events["rank"].unique():
        sim_stage = set(predicted.events.loc[predicted.events["rank"] == rank, "stage"])
        run_stage = set(ev.loc[ev["rank"] == rank, "stage"])
        assert sim_stage == run_stage == {lay.stage_of(int(rank))}
    by_rank = wb.compare(predicted, measured, by=("rank", "kind"))
    assert set(by_rank["rank"]) >= {0, 2}
    by_stage = wb.compare(predicted, measured, by=("stage", "kind"))
    assert set(by_stage["stage"].dropna()) == {0, 1}
    # stage 1 (the last) runs the head and loss: its compute per step is measured and predicted there
    row = by_stage[(by_stage["stage"] == 1) & (by_stage["kind"] == "compute")].iloc[0]
    assert row["sim_seconds"] > 0 and row["measured_seconds"] > 0


def test_a_step_with_too_many_micro_batches_is_an_error_not_a_runaway() -> None:
    job = wb.Job.create("aws-p5:nodes=2", "llama3-8b", "tp=8,pp=2,dp=1,mbs=1,gbs=65536")
    with pytest.raises(WorkbenchError, match="plan.gbs: 65536 micro-batches"):
        wb.simulate(job)
