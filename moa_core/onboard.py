"""Adding one domain to a trained mixture without retraining the others, and the regression gate.

MoA (paper, section "new domain"): the new domain's stage-1 LoRA becomes one more expert; a short joint
stage then trains that expert and every layer's router on the balanced mix of all domains, gold-routed,
with LM + eta * CE(router, domain). The old experts' slices get zero gradients, so they stay bit-identical.
MoDULA (paper, stage 2 then 3): the new domain expert is trained alone with the universal expert frozen,
then the routers alone. MoSLD shares one A across experts, so a new expert would move the old ones: it is
refused with the command that retrains instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import MoAConfig
from .model import MixtureModel
from .train import LogFn, TrainResult, phase_helpers, train_mixture

ONBOARDABLE = ("moa", "modula-flan", "modula-res")
LOWER_IS_BETTER = {"ppl": True, "bleu": False, "rougeL": False}


class OnboardError(ValueError):
    """Onboarding cannot start (or its result is unsafe); the message says what to do instead."""


@dataclass
class ExtendResult:
    expert_index: int
    phases: dict[str, TrainResult]
    old_expert_hashes: dict[str, str]
    trainable_params: int = 0

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.phases.values())


def check_onboardable(mm: MixtureModel, old_domains: list[str], new_domain: str) -> None:
    method = mm.spec.method
    if method not in ONBOARDABLE:
        raise OnboardError(
            f"method {method!r} cannot add a domain without retraining: its experts share one A matrix per layer. "
            f"Add the domain to params.yaml and retrain with `moa run` (or switch `method` to one of {ONBOARDABLE})."
        )
    have = list(mm.spec.domains)
    if have != list(old_domains):
        raise OnboardError(
            f"the trained mixture holds domains {have} but params.yaml lists {old_domains}; run the pipeline "
            "(`moa run` or `dvc repro`) so they agree, then onboard"
        )
    if new_domain in have:
        raise OnboardError(f"domain {new_domain!r} already has an expert in the mixture; pick another name")


def extend_mixture(
    mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, domain: str, train_by_domain: list[list[Any]],
    adapter_dir: str | Path | None = None, ckpt_root: Path | None = None, on_log: LogFn | None = None,
    fingerprint: str = "",
) -> ExtendResult:
    """Add `domain` as one more expert of `mm` and update the routers; returns what was trained.

    train_by_domain: train records of every domain in mixture order, the new domain last.
    adapter_dir: MoA only, the new domain's stage-1 PEFT adapter.
    Raises OnboardError before training when the method cannot be extended, and RuntimeError if an old
    expert changed (it would be a bug: the check is the guarantee the issue asks for)."""
    old = list(mm.spec.domains)
    check_onboardable(mm, old, domain)
    if len(train_by_domain) != len(old) + 1:
        raise ValueError(f"need train records for {len(old) + 1} domains (old ones, then {domain!r}), got {len(train_by_domain)}")
    method, t = mm.spec.method, cfg.train
    n_slots = len(mm.spec.experts)
    hashes = {name: mm.expert_hash(k) for k, name in enumerate(mm.spec.experts)}
    k_new = mm.add_expert(domain)
    frozen = list(range(n_slots))
    phases: dict[str, TrainResult] = {}
    ck, log = phase_helpers(ckpt_root, on_log)

    if method == "moa":
        if adapter_dir is None:
            raise ValueError("MoA onboarding needs the new domain's stage-1 adapter (adapter_dir)")
        mm.load_peft_expert(k_new, adapter_dir)
        phases["joint"] = train_mixture(
            mm, tokenizer, train_by_domain, cfg, steps=cfg.onboard.router_steps, lr=t.joint_lr, train_experts=True,
            train_routers=True, route="gold", eta=cfg.router.eta, frozen_experts=frozen, ckpt_dir=ck("joint"),
            on_log=log("joint"), fingerprint=fingerprint)
    else:
        if method == "modula-flan":  # domain experts use the first domain_r ranks of the shared slot size
            with torch.no_grad():
                for w in mm.wrapped.values():
                    w.lora_A.data[k_new, cfg.modula.domain_r:] = 0
        phases[f"domain:{domain}"] = train_mixture(
            mm, tokenizer, [train_by_domain[-1]], cfg, steps=t.expert_steps, lr=t.lr, train_experts=True,
            train_routers=False, route=k_new, frozen_experts=frozen, ckpt_dir=ck("domain"), on_log=log("domain"),
            fingerprint=fingerprint)
        phases["router"] = train_mixture(
            mm, tokenizer, train_by_domain, cfg, steps=cfg.onboard.router_steps, lr=t.lr, train_experts=False,
            train_routers=True, route="learned", ckpt_dir=ck("router"), on_log=log("router"), fingerprint=fingerprint)
    changed = [name for k, name in enumerate(mm.spec.experts[:n_slots]) if mm.expert_hash(k) != hashes[name]]
    if changed:
        raise RuntimeError(f"onboarding {domain!r} changed the old experts {changed}; nothing was saved")
    return ExtendResult(k_new, phases, hashes, new_expert_parameter_count(mm, k_new))


def new_expert_parameter_count(mm: MixtureModel, k: int) -> int:
    """Parameters onboarding trains: expert k's A/B slices plus every router's weights."""
    expert = sum(t.numel() for t in mm.expert_tensors(k).values())
    routers = sum(p.numel() for p in mm.routers.parameters())
    return expert + routers


# ------------------------------------------------------------------------------------- regression gate
@dataclass
class Regression:
    domain: str
    metric: str
    before: float
    after: float
    allowed: float

    def __str__(self) -> str:
        bound = "up to" if LOWER_IS_BETTER.get(self.metric, False) else "down to"
        return f"{self.domain}: {self.metric} {self.before:.4g} -> {self.after:.4g} (allowed {bound} {self.allowed:.4g})"


@dataclass
class GateResult:
    regressions: list[Regression] = field(default_factory=list)
    compared: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.regressions

    @property
    def reason(self) -> str:
        if self.passed:
            return f"no old domain regressed ({', '.join(self.compared)})"
        return "regression on " + "; ".join(str(r) for r in self.regressions)


def regression_gate(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], metric: str,
                    tolerance: float, router_before: dict[str, float] | None = None,
                    router_after: dict[str, float] | None = None, router_tolerance: float = 0.0) -> GateResult:
    """Compare every old domain's `metric` before vs after onboarding. `tolerance` is relative: with ppl
    (lower is better) an old domain regresses when after > before * (1 + tolerance); with bleu/rougeL
    when after < before * (1 - tolerance). With `router_before`/`router_after` (router accuracy per domain,
    0-1), an old domain also regresses when its accuracy drops by more than `router_tolerance` (absolute):
    its prompts then reach another domain's expert although its perplexity may hardly move."""
    if metric not in LOWER_IS_BETTER:
        raise ValueError(f"unknown regression metric {metric!r}; use one of {sorted(LOWER_IS_BETTER)}")
    missing = sorted(set(before) - set(after))
    if missing:
        raise ValueError(f"the new mixture was not evaluated on old domains {missing}")
    gate = GateResult()
    for d, vals in before.items():
        b, a = float(vals[metric]), float(after[d][metric])
        allowed = b * (1 + tolerance) if LOWER_IS_BETTER[metric] else b * (1 - tolerance)
        gate.compared[d] = {"before": b, "after": a, "allowed": allowed}
        worse = a > allowed if LOWER_IS_BETTER[metric] else a < allowed
        if worse or a != a:  # NaN counts as a regression
            gate.regressions.append(Regression(d, metric, b, a, allowed))
    for d, b in (router_before or {}).items():
        if d not in before:
            continue
        a = (router_after or {}).get(d, float("nan"))
        gate.compared[d].update({"router_accuracy_before": b, "router_accuracy_after": a})
        if not a >= b - router_tolerance:  # NaN (not measured) counts as a regression
            gate.regressions.append(Regression(d, "router accuracy", b, a, b - router_tolerance))
    return gate
