"""MoSLD (Zhao et al. 2024): experts sharing one A per layer (DropConnect on it), token-level top-k routers
with a balance loss, all trained jointly from scratch on balanced mixed batches. Its experts share A, so a
new domain cannot be added without moving the old ones: not onboardable."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import DomainData, MixtureMethod, StageRun, register_method

if TYPE_CHECKING:
    from torch import nn

    from ..config import MoAConfig
    from ..model import MixtureModel, MixtureSpec
    from ..train import TrainResult


def layer_groups(per_group: list[int], n_layers: int) -> list[int]:
    """Spread expert-count groups over the layers in order: [8,6,4,2] on 32 layers -> 8 x 8, 8 x 6, ..."""
    return [per_group[min(len(per_group) - 1, i * len(per_group) // n_layers)] for i in range(n_layers)]


@register_method
class MoSLD(MixtureMethod):
    name = "mosld"
    why_not_onboardable = "its experts share one A matrix per layer"
    config_sections = (*MixtureMethod.config_sections, "mosld")

    def spec(self, cfg: MoAConfig, base: nn.Module, model_id: str) -> MixtureSpec:
        from ..model import MixtureSpec
        from ..routing import Routing

        per_layer = layer_groups(cfg.mosld.experts_per_layer, self.n_layers(base))
        return MixtureSpec(method=self.name, experts=[f"e{i}" for i in range(max(per_layer))],
                           experts_per_layer=per_layer, target_modules=list(cfg.mosld.target_modules), r=cfg.lora.r,
                           routing=Routing.TOPK, shared_a=True, dropconnect_p=cfg.mosld.dropconnect_p,
                           top_k=cfg.mosld.top_k, **self.common_spec_fields(cfg, base, model_id))

    def fit(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData, run: StageRun,
            expert_dirs: list[Path] | None = None) -> dict[str, TrainResult]:
        from ..train import TrainRoute

        t = cfg.train
        return {"joint": self.train(mm, tokenizer, data, cfg, run, "joint", "mosld-joint", steps=t.joint_steps,
                                    lr=t.lr, train_experts=True, train_routers=True, route=TrainRoute.LEARNED,
                                    balance_coef=cfg.mosld.balance_coef)}
