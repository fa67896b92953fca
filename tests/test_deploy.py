"""Deployment files: built from a Job, validated offline against Kubernetes (two versions, strict),
the LeaderWorkerSet CRD and the Compose schema; broken input is an error and writes nothing."""

from __future__ import annotations

import copy

import pytest
import yaml

import workbench as wb
from workbench.cli import main
from workbench.deploy import Options, objects, stack, write
from workbench.deploy.validate import K8S_VERSIONS, validate_compose, validate_k8s
from workbench.errors import WorkbenchError

pytest.importorskip("kubernetes_validate")


def _by_kind(objs: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objs}


def test_training_on_p5_gets_efa_plumbing_and_validates(tmp_path) -> None:
    job = wb.Job.create("aws-p5:nodes=2", "llama3-8b", "tp=8,pp=2,dp=1,gbs=32", steps=20)
    res = write(job, "k8s", tmp_path)
    objs = list(yaml.safe_load_all((tmp_path / "workbench.yaml").read_text()))
    k = _by_kind(objs)
    assert set(k) == {"Service", "Job"} and k["Service"]["spec"]["clusterIP"] == "None"
    spec = k["Job"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 2
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["vpc.amazonaws.com/efa"] == "32"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and c["resources"]["limits"]["hugepages-2Mi"] == "5120Mi"
    assert c["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1" and "ofi-nccl" in env["LD_LIBRARY_PATH"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "p5.48xlarge"
    assert "--nnodes" in c["command"] and c["command"][c["command"].index("--nnodes") + 1] == "2"
    assert len(res["validated"]) == 2 * len(K8S_VERSIONS)
    assert wb.Job.load(tmp_path / "job.yaml") == wb.resolve(job)


def test_infiniband_presets_get_rdma_devices_not_efa() -> None:
    job = wb.resolve(wb.Job.create("dgx-h100:nodes=2", "llama3-8b", "tp=8,dp=2,gbs=32"))
    c = _by_kind(objects(job, Options()))["Job"]["spec"]["template"]["spec"]["containers"][0]
    limits = c["resources"]["limits"]
    assert "vpc.amazonaws.com/efa" not in limits and limits["rdma/rdma_shared_device_a"] == "1"
    assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in c["env"]


def test_strict_validation_rejects_a_broken_object() -> None:
    job = wb.resolve(wb.Job.create("aws-p5:nodes=2", "llama3-8b", "tp=8,dp=2,gbs=32"))
    objs = objects(job, Options())
    bad = copy.deepcopy(objs)
    bad[1]["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(WorkbenchError, match="not valid Kubernetes"):
        validate_k8s(bad)
    bad = copy.deepcopy(objs)
    bad[1]["spec"]["completions"] = "two"
    with pytest.raises(WorkbenchError, match="completions"):
        validate_k8s(bad)


def test_swarm_stack_validates_against_compose_and_says_no_efa(tmp_path) -> None:
    job = wb.resolve(wb.Job.create("aws-p5:nodes=2", "llama3-8b", "tp=8,dp=2,gbs=32"))
    st = stack(job, Options())
    assert validate_compose(st) == "stack @ compose-spec"
    svc = st["services"]["train"]
    assert svc["deploy"]["replicas"] == 2 and svc["environment"]["NCCL_IB_DISABLE"] == "1"
    bad = copy.deepcopy(st)
    bad["services"]["train"]["deploy"]["replicaz"] = 2
    with pytest.raises(WorkbenchError, match="Compose schema"):
        validate_compose(bad)


def test_cli_bad_input_is_exit_2_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["deploy", "k8s", "--cluster", "aws-p5", "--model", "llama3-8b", "--plan", "tp=8,gbs=32",
                 "--name", "Bad_Name", "--out", str(out)]) == 2
    assert "deploy.name" in capsys.readouterr().err and not out.exists()
    assert main(["deploy", "k8s", "--cluster", "aws-p5", "--model", "llama3-8b", "--replicas", "4",
                 "--out", str(out)]) == 2
    assert main(["deploy", "k8s", "--cluster", "local", "--model", "llama3-8b", "--plan", "dp=1,gbs=2",
                 "--out", str(out)]) == 2
    assert "CPU-rank clusters" in capsys.readouterr().err and not out.exists()
    assert main(["deploy", "swarm", "--cluster", "aws-p5:nodes=2", "--model", "llama3-8b", "--plan", "tp=8,dp=2,gbs=32",
                 "--out", str(out)]) == 0
    assert (out / "stack.yaml").exists()


def test_serving_colocated_deployment_service_hpa_pdb() -> None:
    job = wb.Job.create("aws-p5en:nodes=2", "llama3.1-8b", "tp=2", "serving")
    objs = objects(job, Options(min_replicas=2, max_replicas=6, target_waiting=4))
    k = _by_kind(objs)
    assert set(k) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    c = k["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" and c["resources"]["limits"]["vpc.amazonaws.com/efa"] == "16"
    assert c["command"][:3] == ["workbench", "serve", "/models/package"] and "--tp" in c["command"]
    hpa = k["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "workbench_num_requests_waiting"
    assert hpa["metrics"][0]["pods"]["target"]["averageValue"] == "4"
    assert len(validate_k8s(objs)) == 4 * len(K8S_VERSIONS)


def test_serving_replica_across_nodes_is_a_leaderworkerset() -> None:
    job = wb.Job.create("aws-p5en:nodes=2", "llama3.1-70b", "tp=16", "serving")
    objs = objects(job, Options())
    lws = _by_kind(objs)["LeaderWorkerSet"]
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert _by_kind(objs)["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["kind"] == "LeaderWorkerSet"
    checked = validate_k8s(objs)
    assert any("LeaderWorkerSet CRD" in c for c in checked)
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["size"] = "two"
    with pytest.raises(WorkbenchError, match="LeaderWorkerSet CRD"):
        validate_k8s([bad])


def test_serving_disaggregated_and_pipeline_errors() -> None:
    job = wb.Job.create("aws-p5en:nodes=2", "llama3.1-8b", "prefill_workers=1,decode_workers=1", "serving")
    c = _by_kind(objects(job, Options()))["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "disaggregated" in c["command"] and c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert validate_compose(stack(job, Options())) == "stack @ compose-spec"
    with pytest.raises(WorkbenchError, match="plan.pp"):
        objects(wb.Job.create("aws-p5en:nodes=2", "llama3.1-8b", "tp=2,pp=2", "serving"), Options())
