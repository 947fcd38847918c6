"""register stage: log the mixture as an MLflow pyfunc, register a version, gate the @champion alias."""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow import MlflowClient

from moa_core.base_model import resolve_base_path

from .common import StageContext, stage_run

CHAMPION = "champion"


def _metric_of(ctx: StageContext) -> float:
    data = json.loads((ctx.layout.metrics / "eval.json").read_text())
    system = data.get(ctx.cfg.method)
    key = ctx.cfg.registry.promote_metric
    if system is None or key not in system:
        raise KeyError(f"metrics/eval.json has no {key!r} for {ctx.cfg.method!r}; fix registry.promote_metric "
                       f"(available: {sorted(system or {})})")
    return float(system[key])


def should_promote(candidate: float, champion: float | None, higher_is_better: bool, tolerance: float) -> tuple[bool, str]:
    """Promote unless the candidate is worse than the champion by more than `tolerance`."""
    if champion is None:
        return True, "no champion yet"
    worse = champion - candidate if higher_is_better else candidate - champion
    if worse > tolerance:
        return False, f"candidate {candidate:.4f} is worse than champion {champion:.4f} (tolerance {tolerance})"
    return True, f"candidate {candidate:.4f} is not worse than champion {champion:.4f}"


def run_register(ctx: StageContext) -> dict[str, Any]:

    from moa_cli.pyfunc import MoAPyfunc

    reg = ctx.cfg.registry
    value = _metric_of(ctx)
    base_path, model_id = resolve_base_path(ctx.cfg.base_model, ctx.root)
    with stage_run(ctx, "register") as run:
        info = mlflow.pyfunc.log_model(
            name="moa-model", python_model=MoAPyfunc(),
            artifacts={"mixture": str(ctx.layout.mixture(ctx.cfg.method))},
            model_config={"base_path": str(base_path), "base_model": model_id,
                          "max_new_tokens": ctx.cfg.evaluate.max_new_tokens, "max_length": ctx.cfg.train.max_length},
            pip_requirements=["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "safetensors", "pandas"],
            registered_model_name=reg.model_name,
        )
        client = MlflowClient()
        version = str(info.registered_model_version)
        try:
            champ = client.get_model_version_by_alias(reg.model_name, CHAMPION)
            champ_value = float(champ.tags[reg.promote_metric]) if reg.promote_metric in champ.tags else None
        except Exception:  # no alias yet
            champ, champ_value = None, None
        promote, why = should_promote(value, champ_value, reg.higher_is_better, reg.tolerance)
        client.set_model_version_tag(reg.model_name, version, reg.promote_metric, str(value))
        client.set_model_version_tag(reg.model_name, version, "moa.method", ctx.cfg.method)
        client.set_model_version_tag(reg.model_name, version, "moa.domains", ",".join(ctx.cfg.domain_names))
        client.set_model_version_tag(reg.model_name, version, "moa.promotion", why)
        if promote:
            client.set_registered_model_alias(reg.model_name, CHAMPION, version)
        else:
            client.set_model_version_tag(reg.model_name, version, "moa.not_promoted_reason", why)
        mlflow.log_metric(reg.promote_metric, value)
        mlflow.set_tags({"moa.registered_version": version, "moa.promoted": str(promote)})
    result = {"model": reg.model_name, "version": version, "promoted": promote, "reason": why,
              "metric": value, "run_id": run.info.run_id}
    (ctx.layout.metrics / "registered.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
