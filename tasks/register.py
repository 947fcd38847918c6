"""register stage: log the mixture as an MLflow pyfunc, register a version, gate the @champion alias."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from moa_core.atomic import atomic_write_json
from moa_core.base_model import load_base, resolve_base_path
from moa_core.layout import Layout

from .common import TORCH_LOCK, StageContext, stage_logger, stage_run, tracking_uri
from .incremental import FINGERPRINT_TAG, fingerprint_stage, record_success, skip_if_unchanged

CHAMPION = "champion"


EVAL_FINGERPRINT = "moa.eval_fingerprint"  # version tag: the test split and domains its figures were measured on
ROUTER_ACCURACY = "moa.router_accuracy_by_domain"  # version tag: JSON {domain: accuracy 0-1}


@dataclass
class Figures:
    """What the gate compares: the promote metric (averaged over the current domains) and the router accuracy
    per domain (empty for token-level mixtures), both on one test split (`fingerprint`)."""

    metric: float
    router_accuracy: dict[str, float]
    fingerprint: str


def eval_fingerprint(ctx: StageContext) -> str:
    """Hash of what an evaluation's figures depend on besides the model: the domains, their curated test split
    and the evaluation settings. Figures with another fingerprint are not comparable."""
    h = hashlib.sha256()
    h.update(repr((ctx.cfg.domain_names, ctx.cfg.evaluate.model_dump(), ctx.cfg.train.max_length)).encode())
    for d in ctx.cfg.domain_names:
        h.update(ctx.split_path(d, "test").read_bytes())
    return h.hexdigest()[:16]


def _candidate(ctx: StageContext) -> Figures:
    data = json.loads((ctx.layout.metrics / "eval.json").read_text())
    system = data.get(ctx.cfg.method)
    key = ctx.cfg.registry.promote_metric
    if system is None or key not in system:
        raise KeyError(f"metrics/eval.json has no {key!r} for {ctx.cfg.method!r}; fix registry.promote_metric "
                       f"(available: {sorted(system or {})})")
    acc = {d: float(system[f"{d}_router_accuracy"]) for d in ctx.cfg.domain_names if f"{d}_router_accuracy" in system}
    return Figures(float(system[key]), acc, eval_fingerprint(ctx))


def champion_figures(ctx: StageContext, fingerprint: str) -> tuple[str, Figures] | None:
    """(which champion and how it was measured, figures) of @champion on the current test split: its stored tags
    when they were measured on it, else the champion evaluated again. None only when the registered model has no @champion alias; any
    error reading the registry or evaluating the champion propagates (the caller must not promote then)."""
    client, name = MlflowClient(), ctx.cfg.registry.model_name
    version = client.get_registered_model(name).aliases.get(CHAMPION)  # the model exists: a version was just added
    if version is None:
        return None
    tags = client.get_model_version(name, str(version)).tags
    key = ctx.cfg.registry.promote_metric
    if tags.get(EVAL_FINGERPRINT) == fingerprint and key in tags:
        return f"champion v{version}, same test split", Figures(
            float(tags[key]), json.loads(tags.get(ROUTER_ACCURACY) or "{}"), fingerprint)
    stage_logger().info("champion v%s was measured on another test split or domain set: evaluating it again", version)
    return (f"champion v{version} evaluated again on this test split",
            _evaluate_version(ctx, str(version), fingerprint))


def _evaluate_version(ctx: StageContext, version: str, fingerprint: str) -> Figures:
    """A registered version's mixture on the current test split of the current domains (a domain the version
    has no expert for is routed like any prompt; its router accuracy is only kept for the version's domains)."""
    import yaml

    from moa_core import metrics
    from moa_core.evaluate import evaluate_system
    from moa_core.model import load_mixture

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{ctx.cfg.registry.model_name}/{version}"))
    # the pyfunc's MLmodel says where its `mixture` artifact lies (artifacts/<the logged directory's name>)
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    with TORCH_LOCK:
        base, tok, _ = load_base(ctx.cfg.base_model, ctx.root)
        mm = load_mixture(base, local / pyfunc["artifacts"]["mixture"]["path"])
        routing = "router" if mm.spec.routing == "sequence" else "token"
        ev = evaluate_system(mm, tok, ctx.splits("test"), ctx.cfg, routing)
    flat = metrics.results_to_json([metrics.EvalRow(system="champion", per_domain=ev.per_domain,
                                                    router_accuracy=ev.router_accuracy)])["champion"]
    acc = {d: a for d, a in ev.router_accuracy_by_domain.items() if d in mm.spec.domains}
    return Figures(float(flat[ctx.cfg.registry.promote_metric]), acc, fingerprint)


def should_promote(candidate: float, champion: float | None, higher_is_better: bool, tolerance: float) -> tuple[bool, str]:
    """Promote unless the candidate is worse than the champion by more than `tolerance`."""
    if champion is None:
        return True, "no champion yet"
    worse = champion - candidate if higher_is_better else candidate - champion
    if worse > tolerance:
        return False, f"candidate {candidate:.4f} is worse than champion {champion:.4f} (tolerance {tolerance})"
    return True, f"candidate {candidate:.4f} is not worse than champion {champion:.4f}"


def _log_pyfunc(ctx: StageContext, artifacts: dict[str, str], base_path: Path, model_id: str) -> Any:
    from .pyfunc import MoAPyfunc, signature

    return mlflow.pyfunc.log_model(
        name="moa-model", python_model=MoAPyfunc(),
        artifacts=artifacts,
        model_config={"base_path": str(base_path), "base_model": model_id,
                      "max_new_tokens": ctx.cfg.evaluate.max_new_tokens, "max_length": ctx.cfg.train.max_length,
                      "device": ctx.cfg.base_model.device, "serve": ctx.cfg.serve.model_dump()},
        pip_requirements=["torch==2.13.0", "transformers==5.23.0", "peft==0.21.2", "safetensors", "pandas"],
        signature=signature(ctx.cfg.evaluate.max_new_tokens),  # declares `max_new_tokens`: else MLflow drops params
        registered_model_name=ctx.cfg.registry.model_name,
    )


def log_mixture_version(ctx: StageContext, mixture_dir: Path, tags: dict[str, str]) -> str:
    """Inside an active MLflow run: log `mixture_dir` (and the base model with registry.include_base) as the
    pyfunc model, register a version, tag it."""
    base_path, model_id = resolve_base_path(ctx.cfg.base_model, ctx.root)
    artifacts = {"mixture": str(mixture_dir)}
    if ctx.cfg.registry.include_base:  # else the version points at base_path on this machine
        artifacts["base"] = str(base_path)
    # MLflow also warns, at every registration, that a python_model object is pickled and that unpickling may run
    # code. Ours is MoAPyfunc, a stateless class of this package that the pickle names by reference
    # (tasks.pyfunc.MoAPyfunc): loading a version imports that module and runs nothing else.
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    pickled_notice = lambda record: "serialized using CloudPickle" not in record.getMessage()  # noqa: E731
    pyfunc_logger.addFilter(pickled_notice)
    try:
        with warnings.catch_warnings():
            # MLflow asks for an input example, in a warning with raw ANSI colour codes in every log; validating an
            # example would load the base model once more per registration, and the signature is the schema.
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            info = _log_pyfunc(ctx, artifacts, base_path, model_id)
    finally:
        pyfunc_logger.removeFilter(pickled_notice)
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


def router_regressions(candidate: dict[str, float], champion: dict[str, float], tolerance: float) -> list[str]:
    """The champion's domains whose router accuracy the candidate lowers by more than `tolerance` (absolute)."""
    return [f"{d}: router accuracy {a:.0%} -> {candidate.get(d, float('nan')):.0%}"
            for d, a in champion.items() if not candidate.get(d, float("nan")) >= a - tolerance]


def gate(candidate: Figures, champion: Figures | None, reg: Any) -> tuple[bool, str]:
    """The @champion gate: the promote metric not worse beyond registry.tolerance, and no domain's router
    accuracy lower beyond registry.router_accuracy_tolerance, both measured on the same test split."""
    promote, why = should_promote(candidate.metric, None if champion is None else champion.metric,
                                  reg.higher_is_better, reg.tolerance)
    dropped = router_regressions(candidate.router_accuracy, champion.router_accuracy if champion else {},
                                 reg.router_accuracy_tolerance)
    if dropped:
        return False, f"{why}, but the router got worse: {'; '.join(dropped)} (tolerance {reg.router_accuracy_tolerance})"
    return promote, why


def _version_exists(ctx: StageContext, result: dict[str, Any]) -> bool:
    """The recorded version is still in the registry (a new tracking store, or a deleted version, registers again)."""
    try:
        MlflowClient().get_model_version(ctx.cfg.registry.model_name, str(result["version"]))
    except Exception:  # noqa: BLE001 - whatever the store says, "not found" or unreachable, register again
        return False
    return True


def run_register(ctx: StageContext) -> dict[str, Any]:
    """Register the method's mixture as a new version and let the gate decide @champion. Skipped in a pipeline run
    whose evaluation, mixture and settings are those of the version registered last (no new version then, so
    @champion stays where the gate put it)."""
    reg = ctx.cfg.registry
    lay = ctx.layout
    reads = [lay.metrics / "eval.json", Layout.at(ctx.root).metrics / "eval_intervals.json",
             lay.mixture(ctx.cfg.method), *(ctx.split_path(d, "test") for d in ctx.cfg.domain_names)]
    # the version's tags name the method and domains; another tracking store has none of our versions
    stage_fp = fingerprint_stage(ctx, "register", reads, method=ctx.cfg.method, domains=ctx.cfg.domain_names,
                                 tracking=tracking_uri(ctx))
    done = skip_if_unchanged(ctx, "register", stage_fp, still_valid=lambda recorded: _version_exists(ctx, recorded))
    if done is not None:
        return done
    cand = _candidate(ctx)
    value = cand.metric
    with stage_run(ctx, "register", **{FINGERPRINT_TAG: stage_fp}) as run:
        version = log_mixture_version(ctx, ctx.layout.mixture(ctx.cfg.method), {
            reg.promote_metric: str(value), "moa.method": ctx.cfg.method, "moa.domains": ",".join(ctx.cfg.domain_names),
            EVAL_FINGERPRINT: cand.fingerprint, ROUTER_ACCURACY: json.dumps(cand.router_accuracy, sort_keys=True)})
        try:
            champ = champion_figures(ctx, cand.fingerprint)
        except Exception as exc:  # noqa: BLE001 - whatever fails, a model that may be worse must not take @champion
            promote, why = False, (f"the champion could not be read or evaluated again ({type(exc).__name__}: "
                                   f"{str(exc)[:300]}); @champion is unchanged. Fix the registry, then run "
                                   "`moa stage register` again")
        else:
            promote, why = gate(cand, champ[1] if champ else None, reg)
            if champ is not None:
                why += f" ({champ[0]})"
        set_promotion(ctx, version, promote, why)
        mlflow.log_metric(reg.promote_metric, value)
    result = {"model": reg.model_name, "version": version, "promoted": promote, "reason": why,
              "metric": value, "run_id": run.info.run_id}
    registered = atomic_write_json(ctx.layout.metrics / "registered.json", result)
    record_success(ctx, "register", stage_fp, [registered], result)
    return result
