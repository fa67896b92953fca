"""The cluster model: presets, paths, NICs, YAML/JSON round trip, validation, discovery, CLI."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.topology import (
    Cluster,
    Fabric,
    Node,
    discover,
    dump,
    dumps,
    from_dict,
    load,
    load_cluster,
    loads,
    preset,
    preset_names,
    to_dict,
)
from workbench.topology import catalogue as cat

pytestmark = pytest.mark.timeout(120)

HAS_NVIDIA = shutil.which("nvidia-smi") is not None


def _all_clusters() -> list[Cluster]:
    mixed_by_hand = from_dict({
        "name": "lab",
        "nodes": [
            {"gpu": "RTX-3090", "gpus": 2, "intra": "nvlink-bridge", "nic": "ETH-25G", "nics": 1},
            {"gpu": "H100-SXM", "gpus": 8, "intra": "nvswitch", "nic": "CX7-NDR-400G", "nics": 8, "count": 2},
            {"gpu": "CPU", "gpus": 4, "nic": "ETH-10G", "nics": 1, "specs": {"fp32_tflops": 0.2, "memory_GBps": 9.5}},
        ],
        "fabric": {"kind": "fat-tree", "switch": "ethernet", "leaf_ports": 4, "spines": 2, "oversubscription": 2},
    })
    return [preset(n) for n in preset_names()] + [load_cluster("mixed:nodes=5"), mixed_by_hand]


# ---------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_and_routes(name: str) -> None:
    c = preset(name)
    assert c.num_gpus == len(c.gpus) > 0
    g = c.graph
    assert all(lk.GBps > 0 and lk.latency_us >= 0 for lk in g.links)
    # every link joins two known vertices and every device reaches every other one
    assert all(lk.a in g.vertices and lk.b in g.vertices for lk in g.links)
    first, last = c.gpus[0], c.gpus[-1]
    for a, b in ((first, c.gpus[1]), (first, last), (last, first)):
        p = c.path(a, b)
        assert p.hops[0] == a and p.hops[-1] == b
        assert 0 < p.bottleneck_GBps < math.inf
    assert c.summary()["nodes"] == len(c.nodes)


def test_aws_p5_two_nodes() -> None:
    c = load_cluster("aws-p5:nodes=2")
    assert c.num_gpus == 16
    assert len(c.gpus) == 16 and c.gpus[0] == "n0.g0" and c.gpus[-1] == "n1.g7"
    assert c.scale_out_Gbps_per_node(0) == 3200
    assert c.scale_out_Gbps_per_node(1) == 3200
    assert c.scale_up_GBps_per_gpu(0) == 900  # NVLink 4, both directions
    assert c.gpu_models() == {"H100-SXM": 16}


def test_preset_options() -> None:
    c = load_cluster("aws-p5:nodes=4,nics=16,oversubscription=2,leaf_ports=2")
    assert len(c.nodes) == 4 and all(n.nics == 16 for n in c.nodes)
    assert c.fabric.oversubscription == 2 and c.fabric.leaf_ports == 2
    assert load_cluster("dgx-a100:gpu=A100-80GB").gpu_models() == {"A100-80GB": 16}
    mixed = load_cluster("mixed:nodes=3")
    assert [n.gpu for n in mixed.nodes] == ["RTX-3090", "RTX-3090", "A100-80GB"]


# ---------------------------------------------------------------------------------------------
# paths


def test_intra_node_path_goes_through_nvswitch() -> None:
    c = load_cluster("aws-p5:nodes=2")
    p = c.path("n0.g0", "n0.g5")
    assert p.hops == ["n0.g0", "n0.nvsw", "n0.g5"]
    assert [lk.kind for lk in p.links] == ["nvlink", "nvlink"]
    assert p.bottleneck_GBps == cat.gpu("H100-SXM").nvlink_GBps / 2 == 450
    _, hop = cat.node_link("nvswitch", 4)
    assert p.latency_us == pytest.approx(2 * hop)
    assert c.path("n0.g3", "n0.g3").links == ()


def test_cross_node_path_same_rail_and_across_rails() -> None:
    c = load_cluster("aws-p5:nodes=2")
    nic = cat.nic("EFAv2-100G")
    same = c.path("n0.g0", "n1.g0")
    assert same.hops == ["n0.g0", "n0.nic0", "rail0.leaf0", "n1.nic0", "n1.g0"]
    assert [lk.kind for lk in same.links] == ["pcie", "efa", "efa", "pcie"]
    assert same.bottleneck_GBps == nic.GBps == 12.5
    assert same.latency_us == pytest.approx(sum(lk.latency_us for lk in same.links))
    assert same.latency_us == pytest.approx(nic.latency_us + 2 * cat.node_link("pcie", 5)[1])

    across = c.path("n0.g0", "n1.g1")  # GPU 1 sits on rail 4 (NICs 4-7)
    hops = across.hops
    assert hops[:3] == ["n0.g0", "n0.nic0", "rail0.leaf0"] and hops[-3:] == ["rail4.leaf0", "n1.nic4", "n1.g1"]
    assert hops[3].startswith("spine")
    assert [lk.kind for lk in across.links] == ["pcie", "efa", "fabric", "fabric", "efa", "pcie"]
    assert across.latency_us == pytest.approx(same.latency_us + 2 * cat.switch_latency_us("efa"))
    assert across.bottleneck_GBps == 12.5


def test_lanes_pick_the_gpus_nics() -> None:
    c = load_cluster("aws-p5:nodes=2")
    used = {c.path("n0.g1", "n1.g1", lane=k).hops[1] for k in range(8)}
    assert used == {"n0.nic4", "n0.nic5", "n0.nic6", "n0.nic7"}


def test_pcie_node_routes_through_host_and_bottleneck_is_the_slowest_link() -> None:
    c = load_cluster("mixed")
    p = c.path("n0.g0", "n0.g1")
    assert p.hops == ["n0.g0", "n0.host", "n0.g1"]
    assert p.bottleneck_GBps == cat.node_link("pcie", 4)[0]
    x = c.path("n0.g0", "n1.g0")
    assert x.hops == ["n0.g0", "n0.nic0", "sw0", "n1.nic0", "n1.g0"]
    assert x.bottleneck_GBps == cat.nic("ETH-10G").GBps == 1.25


def test_fat_tree_oversubscription_shrinks_uplinks() -> None:
    def uplink(over: float) -> float:
        c = from_dict({"nodes": [{"gpu": "A100-80GB", "nic": "CX6-HDR-200G", "nics": 8, "count": 2}],
                       "fabric": {"kind": "fat-tree", "switch": "ib-hdr", "leaf_ports": 8, "spines": 2,
                                  "oversubscription": over}})
        p = c.path("n0.g0", "n1.g0")
        assert [lk.kind for lk in p.links][2:4] == ["fabric", "fabric"]  # different leaves: via a spine
        return p.links[2].GBps

    # 8 ports of 25 GB/s per leaf over 2 spines: 4 ports each at 1:1, 2 at 2:1
    assert uplink(1.0) == 100.0
    assert uplink(2.0) == 50.0


def test_nics_of() -> None:
    p5 = load_cluster("aws-p5:nodes=2")
    assert p5.nics_of("n0.g1") == ["n0.nic4", "n0.nic5", "n0.nic6", "n0.nic7"]
    p4d = load_cluster("aws-p4d")
    assert p4d.nics_of("n0.g0") == p4d.nics_of("n0.g1") == ["n0.nic0"]
    assert p4d.nics_of("n1.g7") == ["n1.nic3"]
    odd = from_dict({"nodes": [{"gpu": "A100-80GB", "nics": 12}]})
    served = [n for g in odd.gpus for n in odd.nics_of(g)]
    assert sorted(served) == sorted(f"n0.nic{k}" for k in range(12))  # every NIC serves a GPU
    with pytest.raises(WorkbenchError, match="is a nic, not a GPU"):
        p5.nics_of("n0.nic0")
    with pytest.raises(WorkbenchError, match=r"device: unknown device 'n9.g0'"):
        p5.path("n0.g0", "n9.g0")
    with pytest.raises(WorkbenchError, match="paths run between GPUs"):
        p5.path("n0.g0", "n0.nvsw")


# ---------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("c", _all_clusters(), ids=lambda c: c.name)
def test_yaml_and_json_round_trip(c: Cluster, tmp_path: Path) -> None:
    for suffix in (".yaml", ".json"):
        path = dump(c, tmp_path / f"c{suffix}")
        back = load(path)
        assert back == c
        assert back.graph.links == c.graph.links
    assert loads(dumps(c, "json")) == c
    assert loads(dumps(c, "yaml")) == c
    assert from_dict(to_dict(c)) == c


def test_dump_groups_identical_nodes() -> None:
    d = to_dict(load_cluster("aws-p5:nodes=4"))
    assert len(d["nodes"]) == 1 and d["nodes"][0]["count"] == 4


def test_discovered_cluster_round_trips(tmp_path: Path) -> None:
    c = discover(cpu_ranks=2, measure=False)
    assert load(dump(c, tmp_path / "local.yaml")) == c


# ---------------------------------------------------------------------------------------------
# validation


def _err(d: object) -> str:
    with pytest.raises(WorkbenchError) as exc:
        from_dict(d)
    return str(exc.value)


def test_unknown_gpu_names_the_field_and_the_choices() -> None:
    msg = _err({"nodes": [{"gpu": "A100-80GB"}, {"gpu": "H100-SXM"}, {"gpu": "H10"}]})
    assert msg.startswith("nodes[2].gpu: unknown GPU model 'H10' (known: ")
    assert "H100-SXM" in msg and "CPU" in msg


@pytest.mark.parametrize(("d", "start"), [
    ({"nodes": [{"gpu": "H100-SXM", "nic": "EFA9"}]}, "nodes[0].nic: unknown NIC model 'EFA9'"),
    ({"nodes": [{"gpu": "H100-SXM", "gpus": 0}]}, "nodes[0].gpus: expected a whole number >= 1"),
    ({"nodes": [{"gpu": "H100-SXM", "gpus": 2.5}]}, "nodes[0].gpus: expected a whole number"),
    ({"nodes": [{"gpu": "H100-SXM", "colour": "red"}]}, "nodes[0]: unknown keys ['colour']"),
    ({"nodes": [{"gpus": 8}]}, "nodes[0].gpu: missing"),
    ({"nodes": [{"gpu": "L40S", "intra": "nvswitch"}]}, "nodes[0].intra: L40S has no NVLink"),
    ({"nodes": [{"gpu": "H100-SXM", "intra": "warp"}]}, "nodes[0].intra: unknown 'warp'"),
    ({"nodes": []}, "nodes: expected a non-empty list"),
    ({"nodes": [{"gpu": "H100-SXM"}], "fabric": {"kind": "torus"}}, "fabric.kind: unknown 'torus' (allowed: rail"),
    ({"nodes": [{"gpu": "H100-SXM"}], "fabric": {"switch": "carrier-pigeon"}}, "fabric.switch: unknown"),
    ({"nodes": [{"gpu": "H100-SXM"}], "fabric": {"oversubscription": 0}}, "fabric.oversubscription: expected a number > 0"),
    ({"nodes": [{"gpu": "H100-SXM"}], "fabric": {"racks": 2}}, "fabric: unknown keys ['racks']"),
    ({"nodes": [{"gpu": "H100-SXM", "count": 2}, {"gpu": "A100-80GB", "nics": 0}]},
     "nodes[1].nics: a node of a multi-node cluster needs at least one NIC"),
    ({"nodes": [{"gpu": "CPU", "specs": {"fp32_tflops": -1}}]}, "nodes[0].specs.fp32_tflops: expected a number > 0"),
    ({"name": "x", "nodes": [{"gpu": "H100-SXM"}], "racks": 1}, "cluster: unknown keys ['racks']"),
    (["not", "a", "mapping"], "cluster: expected a mapping"),
])
def test_validation_names_the_field(d: object, start: str) -> None:
    assert _err(d).startswith(start)


@pytest.mark.parametrize(("spec", "start"), [
    ("aws-p9", "cluster: unknown preset 'aws-p9' (known: aws-p4d"),
    ("aws-p5:racks=2", "aws-p5: unknown options ['racks']"),
    ("aws-p5:nodes=0", "aws-p5.nodes: expected a whole number >= 1"),
    ("aws-p5:nodes=two", "aws-p5.nodes: expected a whole number"),
    ("aws-p5:nics=many", "aws-p5.nics: expected a whole number >= 0"),
    ("aws-p5:oversubscription=lots", "aws-p5.oversubscription: expected a number"),
    ("aws-p5:gpu=A100-80GB", "aws-p5.gpu: 'A100-80GB' is not a variant of aws-p5"),
    ("aws-p5:nodes", "aws-p5: option 'nodes' needs a value"),
    ("missing-file.yaml", "cluster: no such file 'missing-file.yaml'"),
])
def test_bad_specs(spec: str, start: str) -> None:
    with pytest.raises(WorkbenchError) as exc:
        load_cluster(spec)
    assert str(exc.value).startswith(start)


def test_invalid_yaml_text() -> None:
    with pytest.raises(WorkbenchError, match="not valid YAML/JSON"):
        loads("nodes: [{gpu: H100-SXM")


# ---------------------------------------------------------------------------------------------
# discovery


@pytest.mark.skipif(HAS_NVIDIA, reason="this machine has NVIDIA GPUs; the CPU-rank path is not taken")
def test_discover_gives_cpu_ranks_with_measured_specs() -> None:
    c = discover()
    assert len(c.nodes) == 1
    node = c.nodes[0]
    assert node.gpu == "CPU" and node.gpus == (os.cpu_count() or 1)
    specs = dict(node.specs)
    assert specs["fp32_tflops"] > 0 and specs["memory_GBps"] > 0 and specs["memory_GB"] > 0
    assert {c.graph.vertex(g).kind for g in c.gpus} == {"cpu"}
    # the measured rates flow into the device and link specs the simulator reads
    assert c.gpu_spec("n0.g0").peak("fp32") == specs["fp32_tflops"]
    assert c.gpu_spec("n0.g0").is_cpu
    if node.gpus > 1:
        assert c.path("n0.g0", "n0.g1").bottleneck_GBps == pytest.approx(specs["memory_GBps"])
    three = discover(cpu_ranks=3, measure=False)
    assert three.num_gpus == 3 and load_cluster("local").nodes[0].gpu == "CPU"


def test_gpu_names_map_to_catalogue_models() -> None:
    from workbench.topology.discover import gpu_model_from_name

    assert gpu_model_from_name("NVIDIA H100 80GB HBM3") == "H100-SXM"
    assert gpu_model_from_name("NVIDIA H100 PCIe") == "H100-PCIe"
    assert gpu_model_from_name("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert gpu_model_from_name("NVIDIA GeForce RTX 4090") == "RTX-4090"
    assert gpu_model_from_name("Matrox G200") is None


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "show", "aws-p5:nodes=2"]) == 0
    out = capsys.readouterr().out
    assert "16 devices" in out and "3200 Gbps per node" in out
    assert main(["topology", "show", "aws-p5:nodes=2", "--yaml"]) == 0
    assert loads(capsys.readouterr().out) == load_cluster("aws-p5:nodes=2")
    assert main(["topology", "show", "mixed", "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["gpus"] == 12


def test_cli_path(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["topology", "path", "aws-p5:nodes=2", "n0.g0", "n1.g1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bottleneck_GBps"] == 12.5 and d["hops"][1] == "n0.nic0"
    assert d["nics_a"] == ["n0.nic0", "n0.nic1", "n0.nic2", "n0.nic3"]
    assert main(["topology", "path", "aws-p5:nodes=2", "n0.g0", "n0.g1"]) == 0
    assert "bottleneck 450 GB/s" in capsys.readouterr().out


def test_cli_validate_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = dump(load_cluster("dgx-h100"), tmp_path / "good.yaml")
    assert main(["topology", "validate", str(good)]) == 0
    assert capsys.readouterr().out.startswith("ok: dgx-h100")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - {gpu: H100-SXM}\n  - {gpu: H100-SXM}\n  - {gpu: H10}\n")
    assert main(["topology", "validate", str(bad)]) == 2
    assert "error: nodes[2].gpu: unknown GPU model 'H10'" in capsys.readouterr().err
    assert main(["topology", "show", "aws-p5:nics=x"]) == 2
    assert "aws-p5.nics" in capsys.readouterr().err


def test_cli_subprocess_broken_file_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("nodes: [{gpu: H100-SXM, gpus: 8\n")  # unterminated
    r = subprocess.run([sys.executable, "-m", "workbench.cli", "topology", "validate", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: cluster file: not valid YAML/JSON")
    assert "Traceback" not in r.stderr


def test_cli_discover(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["topology", "discover", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["nodes"] == 1 and len(d["devices"]) == d["gpus"] >= 1
    assert main(["topology", "discover", "--yaml"]) == 0
    assert loads(capsys.readouterr().out).num_gpus == d["gpus"]


def test_node_and_fabric_defaults_are_sane() -> None:
    c = Cluster("one", (Node(gpu="H100-SXM"),), Fabric())
    assert c.num_gpus == 8 and c.path("n0.g0", "n0.g7").bottleneck_GBps == 450


@pytest.mark.parametrize("gpu", ["RTX-3090", "H100-PCIe"])
def test_bridge_only_gpus_cannot_sit_on_an_nvswitch(gpu: str) -> None:
    with pytest.raises(WorkbenchError, match=rf"nodes\[0\]\.intra: {gpu} connects by NVLink bridge only"):
        from_dict({"nodes": [{"gpu": gpu, "gpus": 2, "intra": "nvswitch"}]})
    c = from_dict({"nodes": [{"gpu": gpu, "gpus": 2, "intra": "nvlink-bridge"}]})
    assert [lk.kind for lk in c.path("n0.g0", "n0.g1").links] == ["nvlink-bridge"]
