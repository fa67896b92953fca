"""Predictions of the training simulator beside published end-to-end results (validation, not calibration).

`datasets/validation/training_published.yaml` lists systems with the plan fields their authors
published; the simulator completes the rest (fastest plan that fits) and we report the error
as it comes out. Nothing here feeds back into the simulator's parameters.
"""

from __future__ import annotations

from typing import Any

from workbench.errors import WorkbenchError


def compare_published(names: list[str] | None = None, *, stack_changes: dict[str, str] | None = None) -> Any:
    """A DataFrame: system, metric, published, predicted, error (predicted/published − 1), chosen plan.

    `stack_changes` maps a row's software stack to field changes (`{"megatron-2021": "attention=flash"}`):
    an ablation, to see what one cost term does to the table.
    """
    import pandas as pd

    from workbench.data import read_yaml
    from workbench.models.presets import load_model
    from workbench.plan.search import resolve_plan
    from workbench.plan.spec import parse_plan
    from workbench.sim.train import TrainContext, evaluate
    from workbench.topology import from_dict, load_cluster

    table = read_yaml("validation/training_published.yaml")
    rows = []
    for name, e in table.items():
        if names and name not in names:
            continue
        cluster = from_dict(e["cluster"]) if isinstance(e["cluster"], dict) else load_cluster(e["cluster"])
        ctx = TrainContext(cluster, load_model(e["model"]))
        given = dict(e["plan"])
        change = (stack_changes or {}).get(str(given.get("stack", "modern")))
        if change:
            given["stack"] = f"{given.get('stack', 'modern')}:{change.replace(',', ':')}"
        plan = resolve_plan(ctx, parse_plan(given))
        est = evaluate(ctx, None, plan)
        metric = e["metric"]
        if metric == "tflops_per_gpu":
            pred = est.tflops_per_gpu  # type: ignore[union-attr]
        elif metric == "mfu":
            pred = est.mfu  # type: ignore[union-attr]
        elif metric == "tokens_per_s_per_gpu":
            pred = est.tokens_per_s / ctx.world  # type: ignore[union-attr]
        else:
            raise WorkbenchError(f"validation.{name}.metric: {metric!r} is not one of tflops_per_gpu, mfu, "
                                 "tokens_per_s_per_gpu")
        rows.append({
            "name": name, "system": e["system"], "kind": e["kind"], "gpus": ctx.world, "metric": e["metric"],
            "published": float(e["published"]), "predicted": round(float(pred), 4 if metric == "mfu" else 1),
            "error": float(pred) / float(e["published"]) - 1, "mfu": est.mfu,  # type: ignore[union-attr]
            "step_seconds": est.step_seconds, "stack": plan.stack, "plan": str(plan),  # type: ignore[union-attr]
            "source": e["source"],
            "notes": e.get("notes", ""),
        })
    return pd.DataFrame(rows)
