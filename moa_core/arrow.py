"""PEFT's Arrow over the stage-1 experts: the training-free routing baseline of the comparison table.

Arrow (Ostapenko et al. 2024, in PEFT since 0.18) routes every token of every LoRA layer to the top-k
experts whose prototype (the top right singular vector of B A) is most aligned with the token, and mixes them
with softmax weights. It needs no router training, so it answers "is a learned router worth it?" over the very
adapters MoA starts from. It is built with PEFT's own `create_arrow_model`, and `PeftSystem` lets
`evaluate_system` score it exactly as it scores the mixtures (same prompts, perplexity, greedy generation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .model import MixtureOutput


@dataclass
class PeftSystemSpec:
    """The part of `MixtureSpec` that `evaluate_system` reads: a token-level system with these experts."""

    method: str
    experts: list[str] = field(default_factory=list)
    routing: str = "token"


class PeftSystem(nn.Module):
    """A PEFT model behind the calls `evaluate_system` makes on a `MixtureModel`: forward (token-level routing,
    or `adapters_off` for the base model) and generate. Forcing one expert is not offered: Arrow routes itself."""

    def __init__(self, peft_model: nn.Module, method: str, experts: Sequence[str]) -> None:
        super().__init__()
        self.model = peft_model
        self.spec = PeftSystemSpec(method, list(experts))

    def _scope(self, expert: Tensor | None, adapters_off: bool) -> contextlib.AbstractContextManager:
        if expert is not None:
            raise ValueError(f"{self.spec.method} routes every token itself; it cannot force one expert per row")
        return self.model.disable_adapter() if adapters_off else contextlib.nullcontext()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, expert: Tensor | None = None,
                adapters_off: bool = False, **_: Any) -> MixtureOutput:
        """input_ids, attention_mask [B, T] -> logits [B, T, V] (the mixture-only arguments are ignored)."""
        with self._scope(expert, adapters_off):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return MixtureOutput(None, None, None, out.logits, [])

    def generate(self, input_ids: Tensor, attention_mask: Tensor, expert: Tensor | None = None,
                 adapters_off: bool = False, **gen_kwargs: Any) -> tuple[Tensor, None]:
        with self._scope(expert, adapters_off):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs), None


def build_arrow(base: nn.Module, expert_dirs: Sequence[str | Path], experts: Sequence[str], top_k: int,
                seed: int) -> PeftSystem:
    """Arrow over the PEFT adapters in `expert_dirs` (one per expert, same rank and target modules), mixing
    `top_k` of them per token (capped at their number); `seed` fixes the prototypes' power iteration."""
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=min(top_k, len(expert_dirs)), router_temperature=1.0, rng_seed=seed)
    model = create_arrow_model(base, [str(d) for d in expert_dirs], config)
    model.eval()
    return PeftSystem(model, "arrow", experts)
