"""MoA (Feng et al. 2024): one stage-1 PEFT LoRA per domain, then the experts and a sequence-level router per
layer trained jointly on balanced mixed batches, each row routed to its own domain's expert (gold routing),
loss LM + eta * CE(router, domain)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import DomainData, MixtureMethod, StageRun, register_method

if TYPE_CHECKING:
    from torch import nn

    from ..config import MoAConfig
    from ..model import MixtureModel, MixtureSpec
    from ..train import TrainResult


@register_method
class MoA(MixtureMethod):
    name = "moa"
    needs_experts = True
    onboardable = True

    def spec(self, cfg: MoAConfig, base: nn.Module, model_id: str) -> MixtureSpec:
        from ..model import MixtureSpec
        from ..routing import Routing

        doms = list(cfg.domain_names)
        return MixtureSpec(method=self.name, experts=doms, experts_per_layer=[len(doms)] * self.n_layers(base),
                           target_modules=list(cfg.lora.target_modules), r=cfg.lora.r, routing=Routing.SEQUENCE,
                           **self.common_spec_fields(cfg, base, model_id))

    def fit(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData, run: StageRun,
            expert_dirs: list[Path] | None = None) -> dict[str, TrainResult]:
        from ..train import TrainRoute

        if not expert_dirs or len(expert_dirs) != len(data):
            raise ValueError("MoA stage 2 needs one stage-1 adapter per domain")
        for k, d in enumerate(expert_dirs):
            mm.load_peft_expert(k, d)
        eta, t = cfg.router.eta, cfg.train
        # eta = 0 (the routing-loss ablation): the routers get no gradient, so they are not trained (DDP
        # refuses parameters that receive none; one process would skip them all the same)
        phases = {"joint": self.train(mm, tokenizer, data, cfg, run, "joint", "moa-joint", steps=t.joint_steps,
                                      lr=t.joint_lr, train_experts=True, train_routers=eta > 0,
                                      route=TrainRoute.GOLD, eta=eta)}
        if data.val and t.eval_every > 0 and eta > 0:
            # early stopping kept the experts of the joint stage's best validation step (step 0, the stage-1
            # experts, included); the routers are refitted alone to the experts that ship
            phases["router"] = self.train(mm, tokenizer, data, cfg, run, "router", "moa-router", steps=t.joint_steps,
                                          lr=t.joint_lr, train_experts=False, train_routers=True,
                                          route=TrainRoute.GOLD, eta=eta)
        return phases

    def extend(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData, k_new: int,
               frozen: list[int], run: StageRun, adapter_dir: Path | None = None) -> dict[str, TrainResult]:
        """The paper's new-domain recipe: the new stage-1 LoRA becomes one more expert; a short joint stage
        trains it and every router on all domains, gold-routed (the old experts get zero gradients)."""
        from ..train import TrainRoute

        if adapter_dir is None:
            raise ValueError("MoA onboarding needs the new domain's stage-1 adapter (adapter_dir)")
        mm.load_peft_expert(k_new, adapter_dir)
        return {"joint": self.train(mm, tokenizer, data, cfg, run, "joint", "joint", steps=cfg.onboard.router_steps,
                                    lr=cfg.train.joint_lr, train_experts=True, train_routers=True,
                                    route=TrainRoute.GOLD, eta=cfg.router.eta, frozen_experts=frozen)}


def experts_side_by_side(cfg: MoAConfig, base: nn.Module, model_id: str, adapter_dirs: list[Path]) -> MixtureModel:
    """The stage-1 adapters as the experts of one mixture (MoA's, before stage 2): the evaluation's
    baseline rows switch them off, force each row's own, or add the LoRA-mixed adapter as one more."""
    moa = MoA()
    mm = moa.build(cfg, base, model_id)
    for k, d in enumerate(adapter_dirs):
        mm.load_peft_expert(k, d)
    return mm
