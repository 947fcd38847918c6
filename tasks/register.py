"""register stage: log the mixture as an MLflow pyfunc, register a version, gate the @champion alias."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from moa_core.atomic import atomic_write_json
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


def log_mixture_version(ctx: StageContext, mixture_dir: Path, tags: dict[str, str]) -> str:
    """Inside an active MLflow run: log `mixture_dir` (and the base model with registry.include_base) as the
    pyfunc model, register a version, tag it."""
    from .pyfunc import MoAPyfunc, signature

    base_path, model_id = resolve_base_path(ctx.cfg.base_model, ctx.root)
    artifacts = {"mixture": str(mixture_dir)}
    if ctx.cfg.registry.include_base:  # else the version points at base_path on this machine
        artifacts["base"] = str(base_path)
    info = mlflow.pyfunc.log_model(
        name="moa-model", python_model=MoAPyfunc(),
        artifacts=artifacts,
        model_config={"base_path": str(base_path), "base_model": model_id,
                      "max_new_tokens": ctx.cfg.evaluate.max_new_tokens, "max_length": ctx.cfg.train.max_length,
                      "device": ctx.cfg.base_model.device},
        pip_requirements=["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "safetensors", "pandas"],
        signature=signature(ctx.cfg.evaluate.max_new_tokens),  # declares `max_new_tokens`: else MLflow drops params
        registered_model_name=ctx.cfg.registry.model_name,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(ctx.cfg.registry.model_name, version, k, v)
    return version


def set_promotion(ctx: StageContext, version: str, promote: bool, why: str) -> None:
    """Move @champion to `version`, or tag the version with why it was not promoted."""
    client, name = MlflowClient(), ctx.cfg.registry.model_name
    client.set_model_version_tag(name, version, "moa.promotion", why)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    else:
        client.set_model_version_tag(name, version, "moa.not_promoted_reason", why)
    mlflow.set_tags({"moa.registered_version": version, "moa.promoted": str(promote)})


def run_register(ctx: StageContext) -> dict[str, Any]:
    reg = ctx.cfg.registry
    value = _metric_of(ctx)
    with stage_run(ctx, "register") as run:
        version = log_mixture_version(ctx, ctx.layout.mixture(ctx.cfg.method), {
            reg.promote_metric: str(value), "moa.method": ctx.cfg.method, "moa.domains": ",".join(ctx.cfg.domain_names)})
        try:
            champ = MlflowClient().get_model_version_by_alias(reg.model_name, CHAMPION)
            champ_value = float(champ.tags[reg.promote_metric]) if reg.promote_metric in champ.tags else None
        except Exception:  # no alias yet
            champ_value = None
        promote, why = should_promote(value, champ_value, reg.higher_is_better, reg.tolerance)
        set_promotion(ctx, version, promote, why)
        mlflow.log_metric(reg.promote_metric, value)
    result = {"model": reg.model_name, "version": version, "promoted": promote, "reason": why,
              "metric": value, "run_id": run.info.run_id}
    atomic_write_json(ctx.layout.metrics / "registered.json", result)
    return result
