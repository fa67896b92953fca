"""Offline validation of generated files: Kubernetes objects against the upstream JSON schemas of
several Kubernetes versions (strict: unknown fields are errors), the LeaderWorkerSet against its
CRD's schema, the Swarm stack against the Compose schema."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from workbench.errors import WorkbenchError

K8S_VERSIONS = ("1.33.0", "1.37.0")


def _schema(name: str) -> Any:
    from workbench.data import dataset_path

    return json.loads(dataset_path(f"deploy/{name}").read_text())


def validate_k8s(objs: Iterable[dict[str, Any]], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """Every object checked; returns what was checked (`Kind/name @ version`), raises on the first error."""
    import jsonschema
    import kubernetes_validate

    checked = []
    lws = _schema("leaderworkerset-v1.schema.json")
    for obj in objs:
        label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion", "").startswith("leaderworkerset.x-k8s.io/"):
            try:
                jsonschema.validate(obj, lws)
            except jsonschema.ValidationError as exc:
                raise WorkbenchError(f"deploy: {label} breaks the LeaderWorkerSet CRD schema at "
                                     f"{'/'.join(map(str, exc.absolute_path))}: {exc.message[:300]}") from None
            checked.append(f"{label} @ LeaderWorkerSet CRD v1")
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(obj, v, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(map(str, getattr(exc, "path", ())))
                raise WorkbenchError(f"deploy: {label} is not valid Kubernetes {v} at {path}: "
                                     f"{str(getattr(exc, 'message', exc))[:300]}") from None
            checked.append(f"{label} @ {v}")
    return checked


def validate_compose(stack: dict[str, Any]) -> str:
    import jsonschema

    try:
        jsonschema.Draft7Validator(_schema("compose-spec.json")).validate(stack)
    except jsonschema.ValidationError as exc:
        raise WorkbenchError(f"deploy: the stack file breaks the Compose schema at "
                             f"{'/'.join(map(str, exc.absolute_path))}: {exc.message[:300]}") from None
    return "stack @ compose-spec"
