"""The Placement value object and the mixed-GPU planner (workbench.plan.placement / place)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.plan.place import Options, _Ctx, _Group, _matrices, _solve, evaluate, parse_traffic, place
from workbench.plan.placement import Offload, Placement, Replica, Stage, supported_precisions
from workbench.topology.presets import load_cluster

MIXED = "datasets/clusters/mixed-32.yaml"


def _two_stage(cluster: str | None = "mixed:nodes=2") -> Placement:
    return Placement("m", 8, (Replica((Stage(("n0.g0", "n0.g1"), (0, 2)), Stage(("n1.g0",), (3, 7), "int8",
                                                                                         offload=Offload(weights=0.25)))),
                              Replica((Stage(("n1.g1",), (0, 7)),), 0.5)), cluster=cluster)


def test_round_trip_yaml_json(tmp_path):
    pl = _two_stage()
    for suffix in ("yaml", "json"):
        p = pl.save(tmp_path / f"p.{suffix}")
        back = Placement.load(p)
        assert back == pl and back.to_dict() == pl.to_dict()
    assert [r.index for r in pl.stages] == [0, 1, 2]
    assert pl.stage(1).layer_precision(5) == "int8" and pl.stage(1).tp == 1
    assert pl.routing == pytest.approx([2 / 3, 1 / 3])


def test_html_repr_is_escaped_and_names_stages():
    pl = Placement("<b>x</b>", 2, (Replica((Stage(("n0.g0",), (0, 1)),)),))
    b = pl._repr_mimebundle_()
    assert "<b>x</b>" not in b["text/html"] and "&lt;b&gt;" in b["text/html"]
    assert "stage 0" in b["text/plain"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["replicas"][0]["stages"][1].update(layers=[4, 7]), "stage 1 (replica 0).layers: [4, 7] starts at 4"),
    (lambda d: d["replicas"][1]["stages"][0].update(devices=["n0.g0"]), "n0.g0 is already used by stage 0"),
    (lambda d: d["replicas"][0]["stages"][0].update(precision="fp6"), "stage 0 (replica 0).precision: 'fp6'"),
    (lambda d: d["replicas"][0]["stages"][0].update(tp=3), "tp is the device count"),
    (lambda d: d.update(num_layers=9), "replica 0: its stages cover layers 0..7 but the model has 9"),
    (lambda d: d["replicas"][0]["stages"][1].update(offload={"weights": 2}), "offload.weights: expected a fraction"),
])
def test_structure_errors_name_the_stage(mutate, message):
    d = json.loads(json.dumps(_two_stage().to_dict()))
    mutate(d)
    with pytest.raises(WorkbenchError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        Placement.from_dict(d)


def test_cluster_errors_name_stage_and_device():
    _two_stage().validate()  # fine on its own cluster
    d = _two_stage().to_dict()
    d["replicas"][1]["stages"][0]["devices"] = ["n7.g0"]
    with pytest.raises(WorkbenchError, match=r"stage 2 \(replica 1\).devices: n7.g0 is not a GPU of cluster"):
        Placement.from_dict(d).validate()
    across = Placement("m", 2, (Replica((Stage(("n0.g0", "n1.g0"), (0, 1)),)),))
    with pytest.raises(WorkbenchError, match="TP group spans nodes n0, n1"):
        across.validate("mixed:nodes=2")
    fp8 = Placement("m", 2, (Replica((Stage(("n0.g0",), (0, 1), "fp8"),)),))
    with pytest.raises(WorkbenchError, match=r"device n0.g0 \(RTX-3090\) has no fp8 support"):
        fp8.validate("mixed:nodes=2")


def test_precision_support_follows_the_catalogue():
    assert "bf16" not in supported_precisions("V100-SXM2") and "fp16" in supported_precisions("V100-SXM2")
    assert "fp8" not in supported_precisions("A100-80GB") and "fp8" in supported_precisions("H100-SXM")
    assert "fp8" in supported_precisions("L40S")
    assert "fp4" in supported_precisions("B200") and "fp4" not in supported_precisions("H200")


def test_dp_is_exact_against_brute_force():
    """The DP's bottleneck equals the best of every contiguous split of the layers over the groups."""
    c = load_cluster(MIXED)
    m = "llama:layers=9,hidden=1024,heads=8,kv_heads=8,ffn=4096,vocab=32000,seq=4096"
    from workbench.models.presets import load_model

    ctx = _Ctx(c, load_model(m), parse_traffic("concurrency=8,isl=512,osl=64"), Options())
    groups = [_Group(0, ("n0.g0",)), _Group(4, ("n4.g0", "n4.g1")), _Group(1, ("n1.g0",))]
    tps = [1, 2, 1]
    memo: dict = {}
    res = _solve(ctx, groups, tps, 8, False, memo)
    assert res is not None
    best, L = np.inf, 9
    mats = [memo[(ctx.kind(g.node, t), 8, 3, False)][0] for g, t in zip(groups, tps)]
    for a, b in itertools.combinations_with_replacement(range(L + 1), 2):
        cuts = [(0, a), (a, b), (b, L)]
        best = min(best, max(T[i, j] for T, (i, j) in zip(mats, cuts)))
    assert res[0] == pytest.approx(best, rel=1e-12)
    T, _ = _matrices(ctx, ctx.kind(0, 1), 8, 3, False)
    assert np.isinf(T[1, 0]) and T[2, 2] == 0.0


@pytest.fixture(scope="module")
def planned():
    return place(MIXED, "llama3-70b", "throughput", "concurrency=128,isl=1024,osl=256")


def test_planner_respects_memory_nodes_and_beats_baselines(planned):
    c = load_cluster(MIXED)
    pl = planned.placement
    pl.validate(c)
    assert len(set(pl.devices)) == len(pl.devices)
    for ref in pl.stages:
        assert len({c.node_of(d) for d in ref.stage.devices}) == 1  # TP never crosses the 10 GbE switch
    for d in planned.devices:
        assert d["memory_GiB"] <= d["capacity_GiB"] * 0.9 + 1e-6
    p = planned.predicted
    assert p["fits"] and p["output_throughput"] > 0
    for name in ("uniform", "memory_proportional"):
        assert p["output_throughput"] > 1.5 * planned.baselines[name]["output_throughput"]
    s = planned.search
    assert 0 <= s["gap"] < 1 and s["candidates"] >= s["dp_solves"] > 0
    # the planner's own placement, re-evaluated from its file, predicts the same figures
    again = evaluate(MIXED, "llama3-70b", Placement.from_dict(pl.to_dict()), "concurrency=128,isl=1024,osl=256")
    assert again["predicted"]["output_throughput"] == pytest.approx(p["output_throughput"], rel=1e-9)


def test_preferred_formats_only_where_supported():
    cl = {"name": "ada-ampere", "nodes": [{"gpu": "L40S", "gpus": 4, "intra": "pcie", "nic": "ETH-10G"},
                                          {"gpu": "A100-80GB", "gpus": 8, "intra": "nvswitch", "nic": "ETH-10G"}],
          "fabric": {"kind": "switch", "switch": "ethernet"}}
    from workbench.topology.spec import from_dict

    r = place(from_dict(cl), "llama3-70b", "throughput", "concurrency=64", precisions=("fp8", "bf16"))
    for ref in r.placement.stages:
        gpu = "L40S" if ref.stage.devices[0].startswith("n0.") else "A100"
        assert ref.stage.precision == ("fp8" if gpu == "L40S" else "bf16")


def test_offload_when_the_model_does_not_fit_and_errors_when_it_cannot():
    r = place(MIXED, "kimi-k2", "throughput", "concurrency=16,isl=1024,osl=128")
    offl = [ref.stage.offload for ref in r.placement.stages if ref.stage.offload.any]
    assert offl and all(o.tier in ("host", "nvme") and 0 < o.weights <= 1 for o in offl)
    assert any(d["host_offload_GiB"] > 0 for d in r.devices)
    with pytest.raises(WorkbenchError, match="kimi-k2 .* does not fit on cluster mixed-32 .* offload off"):
        place(MIXED, "kimi-k2", "throughput", "concurrency=16", offload=False)
    with pytest.raises(WorkbenchError, match="does not fit"):
        place("mixed:nodes=2", "kimi-k2", "throughput", "concurrency=16", host_GB=64, nvme_GB=1)


def test_latency_and_cost_objectives_under_slo():
    lat = place(MIXED, "llama3-8b", "latency", "concurrency=4,isl=512,osl=64")
    thr = place(MIXED, "llama3-8b", "throughput", "concurrency=4,isl=512,osl=64")
    assert lat.predicted["mean_e2el_ms"] <= thr.predicted["mean_e2el_ms"] + 1e-6
    cost = place(MIXED, "llama3-8b", "cost", "concurrency=32,isl=512,osl=64", slo="tpot=100")
    assert cost.predicted["slo_met"] and cost.predicted["mean_tpot_ms"] <= 100
    assert cost.predicted["usd_per_Mtok"] <= thr.predicted["usd_per_Mtok"] * 1.0001 or thr.predicted["mean_tpot_ms"] > 100
    with pytest.raises(WorkbenchError, match="objective: 'fast'"):
        place(MIXED, "llama3-8b", "fast")


def test_cli_json_fields_and_bad_placement(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    rc = main(["plan", "place", "--cluster", MIXED, "--model", "llama3-8b", "--traffic", "concurrency=16", "--json",
               "--out", str(out)])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0
    st = d["stages"][0]
    assert {"devices", "layers", "tp", "precision"} <= set(st) and len(st["layers"]) == 2
    assert {"memory_GiB", "capacity_GiB"} <= set(d["devices"][0])
    for block in (d["predicted"], d["baselines"]["uniform"], d["baselines"]["memory_proportional"]):
        assert {"output_throughput", "mean_ttft_ms", "mean_tpot_ms"} <= set(block)
    assert d["planner_seconds"] > 0
    pl = Placement.load(out)
    bad = pl.to_dict()
    bad["replicas"][0]["stages"][0]["devices"] = ["n9.g3"]
    bad["replicas"][0]["stages"][0].pop("tp")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc = main(["plan", "place", "--cluster", MIXED, "--model", "llama3-8b", "--placement", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "n9.g3 is not a GPU of cluster" in err and "Traceback" not in err
    rc = main(["plan", "place", "--cluster", "mixed:nodes=2", "--model", "kimi-k2", "--no-offload"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit on cluster" in err and "Traceback" not in err


def test_open_loop_traffic_in_the_serving_vocabulary():
    t = parse_traffic("rate=4,burstiness=1,dataset=conversation,requests=1000,seed=0")
    assert (t.rate, t.isl, t.osl) == (4.0, 1155, 211)
    r = place(MIXED, "llama3-8b", "throughput", "rate=4,dataset=conversation")
    p = r.predicted
    assert not p["overloaded"] and p["output_throughput"] == pytest.approx(4 * 211)
    assert p["mean_ttft_ms"] > 0 and p["mean_tpot_ms"] > 0
    over = place(MIXED, "llama3-70b", "throughput", "rate=5000,isl=1024,osl=256")
    assert over.predicted["overloaded"] and not over.predicted["slo_met"] or over.predicted["mean_ttft_ms"] == float("inf")
    with pytest.raises(WorkbenchError, match="traffic: unknown key"):
        parse_traffic("concurrency=4,speed=9")


def test_crosscheck_with_the_serving_simulator():
    from workbench.plan.place import crosscheck

    pl = Placement("llama3-8b", 32, (Replica((Stage(tuple(f"n4.g{j}" for j in range(2)), (0, 31)),)),
                                     Replica((Stage(("n0.g0",), (0, 15)), Stage(("n4.g7",), (16, 31)))),))
    x = crosscheck(MIXED, "llama3-8b", pl, "concurrency=8,isl=256,osl=32", requests_per_client=4)
    assert "error" not in x and x["completed"] == 64 and x["output_throughput"] > 0
    ours = evaluate(MIXED, "llama3-8b", pl, "concurrency=8,isl=256,osl=32")["predicted"]
    # two independent models of the same placement: they must agree on the decode rate within a factor of 2
    assert 0.5 < ours["mean_tpot_ms"] / x["mean_tpot_ms"] < 2.0
    off = place(MIXED, "kimi-k2", "throughput", "concurrency=16,isl=256,osl=32")
    assert "error" in crosscheck(MIXED, "kimi-k2", off.placement, "concurrency=16,isl=256,osl=32")


def test_figures_of_a_placement(planned):
    pytest.importorskip("plotly")
    from workbench.viz.placement import comparison_figure, memory_figure, placement_figure

    fig = placement_figure(MIXED, planned.placement)
    stages = [t for t in fig.data if (t.meta or {}).get("role") == "stage"]
    assert len(stages) == len(planned.placement.stages)
    assert sum(len(t.x) for t in stages) == len(planned.placement.devices)
    mem = memory_figure(planned.devices)
    cap = next(t for t in mem.data if t.name == "capacity")
    assert list(cap.y) == [d["capacity_GiB"] for d in planned.devices]
    cmp_ = comparison_figure(planned)
    assert list(cmp_.data[0].x) == ["planner", "uniform", "memory-proportional"]
    html = planned._repr_mimebundle_()["text/html"]
    assert "baseline uniform" in html and "gap vs fluid bound" in html
