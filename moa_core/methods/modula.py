"""MoDULA (Ma et al. 2024), in its two forms, trained in three stages: the universal expert on all domains,
then each domain expert alone (the universal one frozen), then the token-level dense routers alone.

- MoDULA-Flan: the universal expert is expert 0 of the parallel stack; domain experts use the first
  domain_r ranks of the shared slot size (the padded rows stay zero: they get exactly zero gradient).
- MoDULA-Res: a separate universal expert feeds the domain experts in series (see moa_core.experts).

A new domain is the paper's stages 2 and 3 again: its expert alone, then the routers alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import DomainData, MixtureMethod, StageRun, register_method

if TYPE_CHECKING:
    from torch import nn

    from ..config import MoAConfig
    from ..model import MixtureModel, MixtureSpec
    from ..train import TrainResult


class MoDULA(MixtureMethod):
    """What both forms share: the staged recipe and the onboarding recipe."""

    onboardable = True
    config_sections = (*MixtureMethod.config_sections, "modula")
    domain_offset = 0  # slot of the first domain expert

    def universal_phase(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData,
                        run: StageRun) -> TrainResult:
        raise NotImplementedError

    def fit(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData, run: StageRun,
            expert_dirs: list[Path] | None = None) -> dict[str, TrainResult]:
        from ..train import TrainRoute

        t = cfg.train
        phases = {"universal": self.universal_phase(mm, cfg, tokenizer, data, run)}
        for k, name in enumerate(cfg.domain_names):
            phases[f"domain:{name}"] = self.train(
                mm, tokenizer, data.domain(k), cfg, run, f"domain:{k}", f"{self.name}-domain-{k}", steps=t.expert_steps,
                lr=t.lr, train_experts=True, train_routers=False, route=k + self.domain_offset)
        phases["router"] = self.train(mm, tokenizer, data, cfg, run, "router", f"{self.name}-router", steps=t.joint_steps,
                                      lr=t.lr, train_experts=False, train_routers=True, route=TrainRoute.LEARNED)
        return phases

    def extend(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData, k_new: int,
               frozen: list[int], run: StageRun, adapter_dir: Path | None = None) -> dict[str, TrainResult]:
        from ..train import TrainRoute

        domain = mm.spec.experts[k_new]
        self.init_slots(mm, cfg, k_new)
        return {
            f"domain:{domain}": self.train(mm, tokenizer, data.domain(-1), cfg, run, "domain", "domain",
                                           steps=cfg.train.expert_steps, lr=cfg.train.lr, train_experts=True,
                                           train_routers=False, route=k_new, frozen_experts=frozen),
            "router": self.train(mm, tokenizer, data, cfg, run, "router", "router", steps=cfg.onboard.router_steps,
                                 lr=cfg.train.lr, train_experts=False, train_routers=True, route=TrainRoute.LEARNED),
        }


@register_method
class MoDULAFlan(MoDULA):
    name = "modula-flan"
    domain_offset = 1  # expert 0 is the universal one

    def spec(self, cfg: MoAConfig, base: nn.Module, model_id: str) -> MixtureSpec:
        from ..model import MixtureSpec
        from ..routing import Routing

        doms = list(cfg.domain_names)
        return MixtureSpec(method=self.name, experts=["universal", *doms],
                           experts_per_layer=[len(doms) + 1] * self.n_layers(base),
                           target_modules=list(cfg.lora.target_modules),
                           r=max(cfg.modula.universal_r, cfg.modula.domain_r), routing=Routing.DENSE,
                           **self.common_spec_fields(cfg, base, model_id))

    def init_slots(self, mm: MixtureModel, cfg: MoAConfig, slots: slice | int) -> None:
        """Domain experts are zero-padded from domain_r to the universal expert's rank: zero their extra rows
        of A (slot 0, the universal expert, keeps its full rank)."""
        import torch

        rows = slice(max(1, slots.start or 0), slots.stop) if isinstance(slots, slice) else slots
        with torch.no_grad():
            for w in mm.wrapped.values():
                w.lora_A.data[rows, cfg.modula.domain_r:] = 0

    def universal_phase(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData,
                        run: StageRun) -> TrainResult:
        return self.train(mm, tokenizer, data, cfg, run, "universal", f"{self.name}-universal",
                          steps=cfg.modula.universal_steps, lr=cfg.train.lr, train_experts=True, train_routers=False,
                          route=0)


@register_method
class MoDULARes(MoDULA):
    name = "modula-res"

    def spec(self, cfg: MoAConfig, base: nn.Module, model_id: str) -> MixtureSpec:
        from ..model import MixtureSpec
        from ..routing import Routing

        doms = list(cfg.domain_names)
        return MixtureSpec(method=self.name, experts=doms, experts_per_layer=[len(doms)] * self.n_layers(base),
                           target_modules=list(cfg.lora.target_modules), r=cfg.modula.domain_r, routing=Routing.DENSE,
                           universal_r=cfg.modula.universal_r, universal_scaling=cfg.lora.alpha / cfg.modula.universal_r,
                           leaky_slope=cfg.modula.leaky_slope, **self.common_spec_fields(cfg, base, model_id))

    def universal_phase(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData,
                        run: StageRun) -> TrainResult:
        from ..train import TrainRoute

        return self.train(mm, tokenizer, data, cfg, run, "universal", f"{self.name}-universal",
                          steps=cfg.modula.universal_steps, lr=cfg.train.lr, train_experts=False, train_routers=False,
                          train_universal=True, route=TrainRoute.EXPERTS_OFF)
