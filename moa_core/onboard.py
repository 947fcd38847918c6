"""Adding one domain to a trained mixture without retraining the others, and the regression gate.

`extend_mixture` does what every method shares: refuse a method that cannot be extended (with the command
that retrains instead), append one expert slot, hash the old experts, and check after training that they
are bit-identical. What is trained in between is the method's own recipe (`MixtureMethod.extend` in
moa_core.methods: MoA's short joint stage, MoDULA's stages 2 and 3 for the new domain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MoAConfig
from .methods import DomainData, StageRun, get_method, onboardable_methods
from .model import MixtureModel
from .train import LogFn, TrainResult

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
    method = get_method(mm.spec.method)
    if not method.onboardable:
        raise OnboardError(not_onboardable_message(method.name))
    have = list(mm.spec.domains)
    if have != list(old_domains):
        raise OnboardError(
            f"the trained mixture holds domains {have} but params.yaml lists {old_domains}; run the pipeline "
            "(`moa run` or `dvc repro`) so they agree, then onboard"
        )
    if new_domain in have:
        raise OnboardError(f"domain {new_domain!r} already has an expert in the mixture; pick another name")


def not_onboardable_message(method: str) -> str:
    return (f"method {method!r} cannot add a domain without retraining: {get_method(method).why_not_onboardable}. "
            f"Add the domain to params.yaml and retrain with `moa run` (or switch `method` to one of "
            f"{onboardable_methods()}).")


def extend_mixture(
    mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, domain: str, data: DomainData | list[list[Any]],
    adapter_dir: str | Path | None = None, ckpt_root: Path | None = None, on_log: LogFn | None = None,
    fingerprint: str = "",
) -> ExtendResult:
    """Add `domain` as one more expert of `mm` and update the routers; returns what was trained.

    data: records of every domain in mixture order, the new domain last (a list of train records per
    domain, or a DomainData with the validation records too).
    adapter_dir: the new domain's stage-1 PEFT adapter (methods that `needs_experts`).
    Raises OnboardError before training when the method cannot be extended, and RuntimeError if an old
    expert changed (it would be a bug: the check is the guarantee the issue asks for)."""
    old = list(mm.spec.domains)
    check_onboardable(mm, old, domain)
    data = data if isinstance(data, DomainData) else DomainData(data)
    if len(data) != len(old) + 1:
        raise ValueError(f"need train records for {len(old) + 1} domains (old ones, then {domain!r}), got {len(data)}")
    n_slots = len(mm.spec.experts)
    hashes = {name: mm.expert_hash(k) for k, name in enumerate(mm.spec.experts)}
    k_new = mm.add_expert(domain)
    phases = get_method(mm.spec.method).extend(
        mm, cfg, tokenizer, data, k_new, list(range(n_slots)), StageRun(ckpt_root, on_log, fingerprint),
        Path(adapter_dir) if adapter_dir is not None else None)
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
