"""The mixture methods, one object each, found by name: see `base` for what a method owns.

    method = get_method(cfg.method)          # UnknownMethodError, with a "did you mean", for a bad name
    mm = method.build(cfg, base, model_id)
    phases = method.fit(mm, cfg, tokenizer, DomainData(train, val), StageRun(ckpt_root, on_log, fp), expert_dirs)

A new method is one subclass of `MixtureMethod` decorated with `@register_method` (README: "How to add a
method"); params.yaml's `method` and `evaluate.compare_methods` accept it from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# importing a method's module registers it; this order is the order `method_names()` lists them in
from . import moa  # noqa: I001
from . import mosld  # noqa: F401
from . import modula  # noqa: F401
from .base import (
    DomainData, MixtureMethod, StageRun, UnknownMethodError, get_method, method_names, onboardable_methods,
    register_method, unknown_method_message, unregister_method,
)
from .moa import experts_side_by_side

if TYPE_CHECKING:
    from torch import nn

    from ..config import MoAConfig
    from ..distributed import DataParallel
    from ..model import MixtureModel, MixtureSpec
    from ..train import LogFn, TrainResult

__all__ = [
    "DomainData", "MixtureMethod", "PlannedMixture", "StageRun", "UnknownMethodError", "build_mixture",
    "experts_side_by_side", "fit_method", "get_method", "method_names", "onboardable_methods", "planned_mixtures",
    "register_method", "spec_from_config", "unknown_method_message", "unregister_method",
]


def spec_from_config(cfg: MoAConfig, method: str, base: nn.Module, model_id: str) -> MixtureSpec:
    """The mixture `method` needs on this base model, from params.yaml."""
    return get_method(method).spec(cfg, base, model_id)


def build_mixture(cfg: MoAConfig, method: str, base: nn.Module, model_id: str) -> MixtureModel:
    """`method`'s untrained mixture on `base`."""
    return get_method(method).build(cfg, base, model_id)


def fit_method(
    cfg: MoAConfig, method: str, base: nn.Module, tokenizer: Any, model_id: str,
    data: DomainData | list[list[Any]], expert_dirs: list[Path] | None = None, ckpt_root: Path | None = None,
    on_log: LogFn | None = None, eta: float | None = None, fingerprint: str = "", dp: DataParallel | None = None,
) -> tuple[MixtureModel, dict[str, TrainResult]]:
    """Build and train `method`'s mixture after stage 1 -> (the model, one TrainResult per phase).

    data: the train records per domain in domain order (a DomainData to pass validation records too: with
    `train.eval_every` > 0 every phase then stops early at its validation minimum).
    eta: overrides router.eta (MoA's routing-loss weight; 0.0 is the routing-loss ablation)."""
    if eta is not None:
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"eta": eta})})
    m = get_method(method)
    mm = m.build(cfg, base, model_id)
    data = data if isinstance(data, DomainData) else DomainData(data)
    return mm, m.fit(mm, cfg, tokenizer, data, StageRun(ckpt_root, on_log, fingerprint, dp), expert_dirs)


@dataclass(frozen=True)
class PlannedMixture:
    """One mixture the pipeline trains and evaluates: models/mixture/<name>, the `name` row of the table."""

    name: str
    method: str
    eta: float | None = None  # router.eta override (the routing-loss ablation)
    # evaluate reads it without checking: a compare_methods row is left out where a lone DVC stage did not train it
    required: bool = True

    @property
    def needs_experts(self) -> bool:
        return get_method(self.method).needs_experts


# evaluate.baselines' key for MoA trained without the routing loss (eta = 0), and its mixture's name
NO_ROUTING_LOSS_BASELINE = "moa_no_routing_loss"
NO_ROUTING_LOSS = PlannedMixture(name="moa-no-routing-loss", method=moa.MoA.name, eta=0.0)


def planned_mixtures(cfg: MoAConfig) -> list[PlannedMixture]:
    """The mixtures a pipeline run trains, in order: params.yaml's `method` (the one registered), the
    routing-loss ablation when evaluate.baselines asks for it, then evaluate.compare_methods."""
    plan = [PlannedMixture(cfg.method, cfg.method)]
    if NO_ROUTING_LOSS_BASELINE in cfg.evaluate.baselines:
        plan.append(NO_ROUTING_LOSS)
    names = {p.name for p in plan}
    plan += [PlannedMixture(m, m, required=False) for m in dict.fromkeys(cfg.evaluate.compare_methods) if m not in names]
    return plan
