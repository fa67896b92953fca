"""Deployment files for a planned Job: Kubernetes (serving and training, EFA/InfiniBand plumbing) and
Docker Swarm stacks, validated offline against their schemas before they are written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.deploy.k8s import Options, objects
from workbench.deploy.swarm import stack

__all__ = ["Options", "objects", "stack", "write"]


def write(job: Any, target: str, out: str | Path, opts: Options | None = None) -> dict[str, Any]:
    """Build, validate and write the files of `job` for `target` (k8s | swarm) into `out`.

    Nothing is written unless every object validates; returns {files, validated}.
    """
    import yaml

    from workbench.api import resolve
    from workbench.deploy.plumbing import plumbing
    from workbench.deploy.validate import validate_compose, validate_k8s
    from workbench.errors import WorkbenchError

    opts = opts or Options()
    plumbing(job.cluster)  # a cluster that cannot be deployed fails before the plan search runs
    job = resolve(job)  # a partial training plan is completed by the plan search, as the notebook shows it
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out: {str(out)[:200]!r} exists and is not a directory")
    if target == "k8s":
        objs = objects(job, opts)
        checked = validate_k8s(objs)
        docs = {"workbench.yaml": yaml.safe_dump_all(objs, sort_keys=False),
                "job.yaml": job.dumps("yaml")}
    elif target == "swarm":
        st = stack(job, opts)
        checked = [validate_compose(st)]
        docs = {"stack.yaml": yaml.safe_dump(st, sort_keys=False), "job.yaml": job.dumps("yaml")}
    else:
        raise WorkbenchError(f"deploy: target {target!r} is not k8s or swarm")
    try:
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name, text in docs.items():
            p = out / name
            p.write_text(text)
            files.append(str(p))
    except OSError as exc:
        raise WorkbenchError(f"--out: cannot write into {str(out)[:200]!r}: {exc.strerror or exc}") from None
    return {"files": files, "validated": checked}
