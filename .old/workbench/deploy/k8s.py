"""Kubernetes objects for a Job: serving (Deployments or LeaderWorkerSets, Service, HPA, PDB) or
training (an indexed Job running torchrun behind a headless Service), with the fabric plumbing.

Every function returns plain dicts (one per object) ready for `yaml.safe_dump_all`; nothing here
talks to a cluster. The objects are checked offline by `workbench.deploy.validate`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from workbench.deploy.plumbing import NodePlumbing, plumbing
from workbench.errors import WorkbenchError

PORT = 8000
RDZV_PORT = 29500
#: the per-pod load metric the server exports on /metrics (`workbench:num_requests_waiting`),
#: as the custom-metrics API names it after prometheus-adapter's rename (':' → '_')
LOAD_METRIC = "workbench_num_requests_waiting"


@dataclass(frozen=True)
class Options:
    """How to deploy: image, names, replica bounds of each serving role, the load target per pod."""

    image: str = "ghcr.io/workbench/workbench:latest"
    name: str = "workbench"
    namespace: str = "default"
    min_replicas: int = 1
    max_replicas: int = 4
    target_waiting: int = 8  # queued requests per pod above which the HPA adds a replica
    model_path: str = "/models/package"
    checkpoint_claim: str = "workbench-checkpoints"
    model_claim: str = "workbench-models"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", self.name):
            raise WorkbenchError(f"deploy.name: {self.name[:60]!r} must be a DNS label (lower case, digits, '-', ≤ 42)")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.namespace):
            raise WorkbenchError(f"deploy.namespace: {self.namespace[:60]!r} must be a DNS label")
        if not self.image or any(c.isspace() for c in self.image) or len(self.image) > 255:
            raise WorkbenchError(f"deploy.image: {self.image[:60]!r} is not an image reference (e.g. repo/name:tag)")
        if not (1 <= self.min_replicas <= self.max_replicas <= 1000):
            raise WorkbenchError(f"deploy.replicas: need 1 ≤ min ≤ max ≤ 1000, got {self.min_replicas}:{self.max_replicas}")
        if not 1 <= self.target_waiting <= 100_000:
            raise WorkbenchError(f"deploy.target_waiting: expected 1..100000, got {self.target_waiting}")


@dataclass(frozen=True)
class Role:
    """One kind of serving worker: `gpus` per replica spread over `nodes` nodes."""

    name: str
    gpus: int
    nodes: int
    args: tuple[str, ...]


def _meta(opts: Options, name: str, role: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": opts.namespace,
            "labels": {"app.kubernetes.io/name": opts.name, "app.kubernetes.io/component": component,
                       "workbench.dev/role": role}}


def _selector(opts: Options, role: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": opts.name, "workbench.dev/role": role}


def _container(opts: Options, pl: NodePlumbing, gpus: int, command: list[str], *, serving: bool,
               extra_env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    limits = pl.limits() | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    c: dict[str, Any] = {
        "name": "workbench", "image": opts.image, "command": command,
        "env": pl.env() + (extra_env or []),
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if pl.capabilities:
        c["securityContext"] = {"capabilities": {"add": pl.capabilities}}
    if serving:
        c["ports"] = [{"name": "http", "containerPort": PORT, "protocol": "TCP"}]
        probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
        c["readinessProbe"] = probe | {"initialDelaySeconds": 10, "failureThreshold": 3}
        c["livenessProbe"] = probe | {"initialDelaySeconds": 120, "failureThreshold": 6}
        c["startupProbe"] = probe | {"failureThreshold": 180}  # weights can take minutes to load
        c["volumeMounts"].append({"name": "models", "mountPath": "/models", "readOnly": True})
    else:
        c["volumeMounts"].append({"name": "checkpoints", "mountPath": "/checkpoints"})
    return c


def _volumes(opts: Options, pl: NodePlumbing, serving: bool) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{pl.shm_gib}Gi"}}]
    if serving:
        vols.append({"name": "models", "persistentVolumeClaim": {"claimName": opts.model_claim, "readOnly": True}})
    else:
        vols.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": opts.checkpoint_claim}})
    return vols


def _pod_spec(opts: Options, pl: NodePlumbing, container: dict[str, Any], serving: bool,
              restart: str = "Always") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [container], "volumes": _volumes(opts, pl, serving), "restartPolicy": restart,
                            "terminationGracePeriodSeconds": 120 if serving else 30}
    if pl.instance_type:
        spec["nodeSelector"] = {"node.kubernetes.io/instance-type": pl.instance_type}
    spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return spec


# ------------------------------------------------------------------ serving
def serving_roles(job: Any, pl: NodePlumbing) -> list[Role]:
    """The worker roles of a serving job. The real server (`workbench serve`) runs colocated, or
    disaggregated with its prefill and decode workers as processes of one server (KV moved between
    their GPUs over cuda_ipc), so each replica is one role holding every GPU the plan gives it."""
    p = job.plan
    g = lambda name, default: int(getattr(p, name, None) or default)  # noqa: E731
    disagg = g("prefill_workers", 0) > 0 and g("decode_workers", 0) > 0
    prec = str(getattr(p, "precision", None) or "bf16")
    dtype = {"fp32": "float32", "fp16": "float16"}.get(prec, "bfloat16")
    if disagg:
        pre, dec = g("prefill_tp", g("tp", 1)) * g("pp", 1), g("decode_tp", g("tp", 1)) * g("pp", 1)
        gpus = pre + dec
        args: tuple[str, ...] = ("--mode", "disaggregated", "--prefill-device", "cuda:0", "--decode-device",
                                 f"cuda:{pre}", "--transport", "cuda_ipc", "--dtype", dtype)
    else:
        gpus = g("tp", 1) * g("pp", 1)
        args = ("--device", "cuda:0", "--dtype", dtype) + (("--tp", str(g("tp", 1))) if g("tp", 1) > 1 else ())
    if g("pp", 1) > 1:
        raise WorkbenchError("plan.pp: the real server (`workbench serve`) runs TP inside a node, not pipeline "
                             "stages yet; deploy with pp=1 (simulate pp>1 with `workbench simulate serve`)")
    if gpus < 1:
        raise WorkbenchError("plan: a serving replica needs at least one GPU")
    nodes = math.ceil(gpus / pl.gpus)
    if nodes > 1 and gpus % pl.gpus:
        raise WorkbenchError(f"plan: a replica of {gpus} GPUs spans {nodes} nodes of {pl.gpus}; "
                             f"use a multiple of {pl.gpus} GPUs per replica")
    return [Role("server", gpus, nodes, args)]


def _serve_command(opts: Options, job: Any, role: Role) -> list[str]:
    return ["workbench", "serve", opts.model_path, "--host", "0.0.0.0", "--port", str(PORT), *role.args]


def serving_objects(job: Any, opts: Options) -> list[dict[str, Any]]:
    """Deployments (LeaderWorkerSets where a replica spans nodes), a Service, an HPA and a PDB per role."""
    pl = plumbing(job.cluster)
    out: list[dict[str, Any]] = []
    for role in serving_roles(job, pl):
        name = f"{opts.name}-{role.name}"
        per_pod = min(role.gpus, pl.gpus)
        container = _container(opts, pl, per_pod, _serve_command(opts, job, role), serving=True)
        template = {"metadata": {"labels": _selector(opts, role.name)},
                    "spec": _pod_spec(opts, pl, container, serving=True)}
        if role.nodes == 1:
            workload = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(opts, name, role.name, "serving"),
                        "spec": {"replicas": opts.min_replicas, "selector": {"matchLabels": _selector(opts, role.name)},
                                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                                 "template": template}}
            target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        else:
            worker = _container(opts, pl, per_pod, _serve_command(opts, job, role) + ["--worker"], serving=False)
            worker["env"].append({"name": "WORKBENCH_LEADER", "value": "$(LWS_LEADER_ADDRESS)"})
            worker["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"},
                                      {"name": "models", "mountPath": "/models", "readOnly": True}]
            worker_spec = _pod_spec(opts, pl, worker, serving=True)
            workload = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
                        "metadata": _meta(opts, name, role.name, "serving"),
                        "spec": {"replicas": opts.min_replicas, "startupPolicy": "LeaderCreated",
                                 "leaderWorkerTemplate": {"size": role.nodes, "restartPolicy": "RecreateGroupOnPodRestart",
                                                          "leaderTemplate": template,
                                                          "workerTemplate": {"metadata": {"labels": _selector(opts, role.name)},
                                                                             "spec": worker_spec}}}}
            target = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": name}
        out.append(workload)
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(opts, name, role.name, "serving"),
                    "spec": {"selector": _selector(opts, role.name),
                             "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]}})
        out.append({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                    "metadata": _meta(opts, name, role.name, "autoscaling"),
                    "spec": {"scaleTargetRef": target, "minReplicas": opts.min_replicas, "maxReplicas": opts.max_replicas,
                             "metrics": [{"type": "Pods", "pods": {
                                 "metric": {"name": LOAD_METRIC},
                                 "target": {"type": "AverageValue", "averageValue": str(opts.target_waiting)}}}],
                             "behavior": {"scaleUp": {"stabilizationWindowSeconds": 30,
                                                      "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]},
                                          "scaleDown": {"stabilizationWindowSeconds": 300,
                                                        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}}}})
        out.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                    "metadata": _meta(opts, name, role.name, "serving"),
                    "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(opts, role.name)}}})
    return out


# ------------------------------------------------------------------ training
def training_objects(job: Any, opts: Options) -> list[dict[str, Any]]:
    """A headless Service and an indexed Job: one pod per node running torchrun with c10d rendezvous
    at pod 0, checkpoints on a persistent volume, restarts bounded."""
    pl = plumbing(job.cluster)
    world = job.layout.world
    if world > job.cluster.num_gpus:
        raise WorkbenchError(f"plan: {world} ranks need {world} GPUs; {job.cluster.name} has {job.cluster.num_gpus}")
    per_node = min(world, pl.gpus)
    nodes = math.ceil(world / per_node)
    if world % per_node:
        raise WorkbenchError(f"plan: {world} ranks do not fill whole nodes of {pl.gpus} GPUs")
    name = f"{opts.name}-train"
    wl = job.workload
    rdzv = f"{name}-0.{name}.{opts.namespace}.svc:{RDZV_PORT}"
    command = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node),
               "--node-rank", "$(JOB_COMPLETION_INDEX)", "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv,
               "--rdzv-id", name, "-m", "workbench.runner.worker", "--model", job.model.name, "--plan", str(job.plan),
               "--steps", str(wl.steps), "--backend", "nccl", "--lr", str(wl.lr), "--seed", str(wl.seed),
               "--out", "/checkpoints/run"]
    container = _container(opts, pl, per_node, command, serving=False,
                           extra_env=[{"name": "WORKBENCH_CHECKPOINT_DIR", "value": "/checkpoints"}])
    container["ports"] = [{"name": "rdzv", "containerPort": RDZV_PORT, "protocol": "TCP"}]
    pod = _pod_spec(opts, pl, container, serving=False, restart="Never")  # podFailurePolicy needs Never
    pod["subdomain"] = name
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(opts, name, "train", "training"),
         "spec": {"clusterIP": "None", "selector": {"job-name": name},
                  "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(opts, name, "train", "training"),
         "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes, "backoffLimit": 3,
                  "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]},
                  "template": {"metadata": {"labels": _selector(opts, "train")}, "spec": pod}}},
    ]


def objects(job: Any, opts: Options) -> list[dict[str, Any]]:
    """All Kubernetes objects of a job (serving or training, by the job's workload kind)."""
    return serving_objects(job, opts) if job.kind == "serving" else training_objects(job, opts)
