"""New-domain onboarding stages: check -> curate -> train the new expert -> extend the mixture -> evaluate
old and new domains -> register (promote only if no old domain regressed) -> record the domain in params.yaml.

Everything that can be wrong with the request (name, source, field mapping, empty data, no trained
mixture, a method that cannot be extended) fails in `plan_onboarding` or curation, before any training,
and leaves params.yaml and the registry untouched.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import mlflow

from moa_core.atomic import atomic_dir_write
from moa_core.base_model import load_base
from moa_core.config import ConfigError, add_domain_to_params, load_raw, parse_config
from moa_core.evaluate import evaluate_system, learned_routing
from moa_core.methods import DomainData, MixtureMethod, get_method
from moa_core.model import load_mixture, read_spec, save_mixture
from moa_core.onboard import OnboardError, extend_mixture, not_onboardable_message, regression_gate
from moa_core.sources import FILE_SUFFIXES, check_source

from .common import TORCH_LOCK, StageContext, fingerprint, log_history, progress, read_training_metrics, stage_run
from .evaluate import eval_progress

_KEEP = ("licence", "attribution")


@dataclasses.dataclass(frozen=True)
class OnboardPlan:
    """The request, validated: the project as it is (`old`) and as it will be with the domain (`new`)."""

    domain: str
    old: StageContext
    new: StageContext
    params_path: Path
    entry: dict[str, Any]  # what goes under domains.<name> in params.yaml

    @property
    def method(self) -> str:
        return self.old.cfg.method

    @property
    def recipe(self) -> MixtureMethod:
        """The method's registry entry: how it is extended, whether it needs the new domain's stage-1 expert."""
        return get_method(self.method)


def source_from_spec(spec: str, fields: dict[str, str] | None, root: Path, split: str = "train") -> dict[str, Any]:
    """`--source` as a params.yaml source entry: `builtin:NAME[/CATEGORY]` is a packaged source (e.g.
    builtin:bbc/tech); an existing path or a name ending in a data-file suffix is a local file (kind: file);
    anything else is a dataset id in the local Hugging Face cache (kind: hub)."""
    fields = dict(fields or {})
    if spec.startswith("builtin:"):
        name, _, category = spec.removeprefix("builtin:").partition("/")
        return {"kind": "builtin", "name": name, **({"category": category} if category else {})}
    p = Path(spec).expanduser()
    p_abs = p if p.is_absolute() else root / p
    if p_abs.exists() or p.suffix.lower() in FILE_SUFFIXES:
        if not p_abs.exists():
            raise OnboardError(f"--source {spec}: no such file (looked at {p_abs})")
        try:
            shown = str(p_abs.resolve().relative_to(root.resolve()))
        except ValueError:
            shown = str(p_abs.resolve())
        src: dict[str, Any] = {"kind": "file", "path": shown}
    else:
        src = {"kind": "hub", "id": spec, "split": split}
    if fields:
        src["fields"] = fields
    return src


def plan_onboarding(params: str | Path, domain: str, source: str, fields: dict[str, str] | None = None,
                    description: str = "", profile: str | None = None) -> OnboardPlan:
    """Validate the request against params.yaml and the trained mixture; raises ConfigError/OnboardError."""
    params_path = Path(params).resolve()
    root = params_path.parent
    raw = load_raw(params_path)
    old = StageContext(cfg=parse_config(raw, str(params_path), profile), root=root)
    if domain in old.cfg.domain_names:
        raise OnboardError(f"domain {domain!r} already exists in {params_path.name} (domains: {old.cfg.domain_names}); "
                           "pick a new name, or change its source there and retrain with `moa run`")
    # the request itself first (name, source, fields): it needs no trained model to be checked
    entry: dict[str, Any] = {"description": description or f"onboarded from {source}",
                             "source": source_from_spec(source, fields, root)}
    new_raw = {**raw, "domains": {**_domain_mapping(raw), domain: entry}}
    try:
        new_cfg = parse_config(new_raw, f"{params_path.name} + domain {domain!r}", profile)
    except ConfigError as exc:
        raise OnboardError(f"the new domain does not validate: {exc}") from None
    check_source(new_cfg.domain(domain).source, root)  # SourceError: the file, format or columns are wrong
    if not get_method(old.cfg.method).onboardable:
        raise OnboardError(not_onboardable_message(old.cfg.method))
    mixture = old.layout.mixture(old.cfg.method)
    if not (mixture / "mixture.json").exists():
        raise OnboardError(f"no trained {old.cfg.method} mixture at {mixture}; run the pipeline first (`moa run`)")
    spec = read_spec(mixture)
    if list(spec.domains) != old.cfg.domain_names:
        raise OnboardError(f"the mixture at {mixture} holds {spec.domains} but params.yaml lists "
                           f"{old.cfg.domain_names}; run the pipeline so they agree, then onboard")
    return OnboardPlan(domain, old, StageContext(cfg=new_cfg, root=root), params_path, entry)


def _domain_mapping(raw: dict[str, Any]) -> dict[str, Any]:
    doms = raw.get("domains") or {}
    if isinstance(doms, list):
        return {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in doms}
    return dict(doms)


def with_parent(plan: OnboardPlan, parent_run_id: str, flow_run_id: str | None) -> OnboardPlan:
    kw = {"parent_run_id": parent_run_id, "flow_run_id": flow_run_id}
    return dataclasses.replace(plan, old=dataclasses.replace(plan.old, **kw), new=dataclasses.replace(plan.new, **kw))


# ----------------------------------------------------------------------------------------- stages
def run_extend(plan: OnboardPlan) -> dict[str, Any]:
    """Old mixture + the new expert (+ updated routers) -> models/onboard/<domain>/ (the candidate)."""
    ctx, d = plan.new, plan.domain
    lay, doms = ctx.layout, ctx.cfg.domain_names
    train = [ctx.split(x, "train") for x in doms]
    ckpt = lay.checkpoints / f"onboard-{d}"
    fp = fingerprint(ctx, *plan.recipe.config_sections, "onboard", domains=doms)
    with TORCH_LOCK, stage_run(ctx, f"onboard_extend:{d}", domain=d, method=plan.method):
        base, tok, _ = load_base(ctx.cfg.base_model, ctx.root)
        mm = load_mixture(base, lay.mixture(plan.method))
        res = extend_mixture(mm, ctx.cfg, tok, d, DomainData(train),
                             adapter_dir=lay.expert(d) if plan.recipe.needs_experts else None,
                             ckpt_root=ckpt, on_log=progress(f"onboard_extend:{d}", ctx.cfg.onboard.router_steps),
                             fingerprint=fp)
        after = {name: mm.expert_hash(k) for k, name in enumerate(mm.spec.experts)}
        summary = {
            "domain": d, "method": plan.method, "expert_index": res.expert_index,
            "train_seconds": round(res.seconds, 2), "trainable_params": res.trainable_params,
            "old_experts_unchanged": all(after[n] == h for n, h in res.old_expert_hashes.items()),
            "expert_sha256": after,
            "phases": {k: {"final_loss": r.final_loss, "steps": r.steps, "seconds": round(r.seconds, 2)}
                       for k, r in res.phases.items()},
        }
        for phase, r in res.phases.items():
            log_history(r.history, f"{phase.replace(':', '_')}/")
        mlflow.log_metrics({"train_seconds": summary["train_seconds"], "trainable_params": res.trainable_params})
        mlflow.log_dict(summary, "onboard_extend.json")
        save_mixture(mm, lay.onboarded(d), extra={"onboard": summary})
    shutil.rmtree(ckpt, ignore_errors=True)
    return summary


def run_onboard_evaluate(plan: OnboardPlan) -> dict[str, Any]:
    """Old mixture on the old domains vs the candidate on all domains (test split); the regression gate."""
    new, old, d = plan.new, plan.old, plan.domain
    ob = new.cfg.onboard
    with TORCH_LOCK:
        base, tok, _ = load_base(old.cfg.base_model, old.root)
        mm_old = load_mixture(base, old.layout.mixture(plan.method))
        routing = learned_routing(mm_old.spec)
        before = evaluate_system(mm_old, tok, old.splits("test"), old.cfg, routing,
                                 eval_progress("old mixture", old.cfg.domain_names))
        base, tok, _ = load_base(new.cfg.base_model, new.root)
        mm_new = load_mixture(base, new.layout.onboarded(d))
        after = evaluate_system(mm_new, tok, new.splits("test"), new.cfg, routing,
                                eval_progress(f"with {d}", new.cfg.domain_names))
        # what the new domain gets without any expert: the figure the onboarding summary starts from
        base_new = evaluate_system(mm_new, tok, {d: new.split(d, "test")}, new.cfg, "off",
                                   eval_progress("base model", [d])).per_domain[d]
    gate = regression_gate(before.per_domain, after.per_domain, ob.regression_metric, ob.tolerance,
                           before.router_accuracy_by_domain, after.router_accuracy_by_domain,
                           ob.router_accuracy_tolerance)
    result = {
        "domain": d, "metric": ob.regression_metric, "tolerance": ob.tolerance, "passed": gate.passed,
        "reason": gate.reason, "compared": gate.compared,
        "before": before.per_domain, "after": after.per_domain, "base_new_domain": base_new,
        "router_accuracy_before": before.router_accuracy, "router_accuracy_after": after.router_accuracy,
        "router_accuracy_by_domain": after.router_accuracy_by_domain,
        "router_accuracy_by_domain_before": before.router_accuracy_by_domain,
    }
    with stage_run(new, f"onboard_evaluate:{d}", domain=d):
        for dom, vals in after.per_domain.items():
            mlflow.log_metrics({f"{dom}_{k}": float(v) for k, v in vals.items() if isinstance(v, int | float)})
        if after.router_accuracy is not None:
            mlflow.log_metric("router_accuracy", after.router_accuracy)
        mlflow.set_tag("moa.regression_gate", gate.reason)
        mlflow.log_dict(result, "onboard_evaluate.json")
    return result


def run_onboard_register(plan: OnboardPlan, evaluation: dict[str, Any]) -> dict[str, Any]:
    """Register the candidate; promote it, install it as the project's mixture and record the domain in
    params.yaml only when the regression gate passed."""
    from moa_core import metrics

    from .register import EVAL_FINGERPRINT, ROUTER_ACCURACY, eval_fingerprint, log_mixture_version, set_promotion

    ctx, d = plan.new, plan.domain
    lay = ctx.layout
    # the figures the register stage's gate reads, measured here on all domains' test split: the next `moa run`
    # compares against them without evaluating this version again
    flat = metrics.results_to_json([metrics.EvalRow(system="candidate", per_domain=evaluation["after"])])["candidate"]
    key = ctx.cfg.registry.promote_metric
    figures = {EVAL_FINGERPRINT: eval_fingerprint(ctx),
               ROUTER_ACCURACY: json.dumps(evaluation["router_accuracy_by_domain"], sort_keys=True),
               **({key: str(flat[key])} if key in flat else {})}
    with stage_run(ctx, f"onboard_register:{d}", domain=d) as run:
        version = log_mixture_version(ctx, lay.onboarded(d), {
            "moa.method": plan.method, "moa.domains": ",".join(ctx.cfg.domain_names), "moa.onboarded": d,
            f"onboard.{evaluation['metric']}_gate": "passed" if evaluation["passed"] else "failed", **figures})
        promote = bool(evaluation["passed"])
        set_promotion(ctx, version, promote, f"onboarding {d}: {evaluation['reason']}")
    if promote:
        atomic_dir_write(lay.mixture(plan.method), lambda tmp: shutil.copytree(lay.onboarded(d), tmp, dirs_exist_ok=True))
        add_domain_to_params(plan.params_path, d, plan.entry)
    return {"model": ctx.cfg.registry.model_name, "version": version, "promoted": promote,
            "reason": evaluation["reason"], "params_updated": promote, "run_id": run.info.run_id}


def onboarding_cost(plan: OnboardPlan, expert: dict[str, Any] | None, extend: dict[str, Any]) -> dict[str, Any]:
    """Onboarding vs retraining everything, as MoDULA reports it: training seconds and trainable parameters.
    The retrain figures are the last pipeline run's measured stage times (metrics/*.json) for the old
    domains; its parameter count is that of the new mixture's experts and routers."""
    old = plan.old.cfg.domain_names
    experts = [read_training_metrics(plan.old, f"train_expert_{x}") for x in old]
    router = read_training_metrics(plan.old, f"train_router_{plan.method}")
    stage1 = sum(e.get("train_seconds", 0.0) for e in experts) if plan.recipe.needs_experts else 0.0
    retrain_s = router.get("train_seconds", 0.0) + stage1
    onboard_s = extend["train_seconds"] + (expert or {}).get("train_seconds", 0.0)
    spec_params = _mixture_params(plan.new.layout.onboarded(plan.domain))
    return {
        "onboard_train_seconds": round(onboard_s, 2),  # training loops only, as the pipeline's figure
        "onboard_expert_train_seconds": round((expert or {}).get("train_seconds", 0.0), 2),
        "onboard_router_train_seconds": round(extend["train_seconds"], 2),
        "pipeline_train_seconds_old_domains": round(retrain_s, 2),
        "onboard_trainable_params": extend["trainable_params"],
        "full_mixture_trainable_params": spec_params,
        "seconds_ratio": round(onboard_s / retrain_s, 3) if retrain_s else None,
        "params_ratio": round(extend["trainable_params"] / spec_params, 3) if spec_params else None,
    }


def _mixture_params(mixture_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(mixture_dir / "mixture.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".scaling"))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
