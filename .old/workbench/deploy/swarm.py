"""A Docker Swarm stack file for a serving or training Job.

Swarm has no device pass-through for services (moby/swarmkit#1244): GPUs are reachable only as
*generic resources* the node advertises (`node-generic-resources` in the daemon config), and EFA
or InfiniBand devices not at all — so a stack runs NCCL over TCP sockets between nodes, and KV
transfer between hosts over the transport's tcp backend. docs/deploy.md says this plainly.
"""

from __future__ import annotations

import math
from typing import Any

from workbench.deploy.k8s import PORT, RDZV_PORT, Options, _serve_command, serving_roles
from workbench.deploy.plumbing import plumbing


def _gpu_reservation(gpus: int) -> dict[str, Any]:
    return {"reservations": {"generic_resources": [{"discrete_resource_spec": {"kind": "NVIDIA-GPU", "value": gpus}}]}}


def stack(job: Any, opts: Options) -> dict[str, Any]:
    """The compose-format stack (`docker stack deploy -c stack.yaml NAME`)."""
    pl = plumbing(job.cluster)
    services: dict[str, Any] = {}
    env = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"}  # no EFA/IB devices inside Swarm services
    if job.kind == "serving":
        for role in serving_roles(job, pl):
            services[role.name] = {
                "image": opts.image, "command": _serve_command(opts, job, role), "environment": env,
                "networks": ["hostnet"], "volumes": ["models:/models:ro"],
                "healthcheck": {"test": ["CMD", "curl", "-fsS", f"http://127.0.0.1:{PORT}/health"],
                                "interval": "10s", "timeout": "5s", "retries": 3, "start_period": "300s"},
                "deploy": {"mode": "replicated", "replicas": opts.min_replicas,
                           "resources": _gpu_reservation(min(role.gpus, pl.gpus)),
                           "update_config": {"parallelism": 1, "order": "start-first"},
                           "restart_policy": {"condition": "on-failure", "max_attempts": 5}},
            }
        volumes: dict[str, Any] = {"models": {}}
    else:
        world = job.layout.world
        per_node = min(world, pl.gpus)
        nodes = math.ceil(world / per_node)
        wl = job.workload
        services["train"] = {
            "image": opts.image, "environment": env | {"WORKBENCH_CHECKPOINT_DIR": "/checkpoints"},
            "command": ["sh", "-c",
                        f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
                        f"--rdzv-endpoint tasks.train:{RDZV_PORT} --rdzv-id {opts.name} -m workbench.runner.worker "
                        f"--model '{job.model.name}' --plan '{job.plan}' --steps {wl.steps} --backend nccl "
                        f"--out /checkpoints/run"],
            "networks": ["hostnet"], "volumes": ["checkpoints:/checkpoints"],
            "deploy": {"mode": "replicated", "replicas": nodes, "resources": _gpu_reservation(per_node),
                       "restart_policy": {"condition": "on-failure", "max_attempts": 3},
                       "placement": {"max_replicas_per_node": 1}},
        }
        volumes = {"checkpoints": {}}
    return {"services": services, "networks": {"hostnet": {"external": True, "name": "host"}}, "volumes": volumes}
