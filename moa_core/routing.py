"""Routers and their auxiliary losses: one router per transformer layer, reading that layer's input.

- MoA (`Routing.SEQUENCE`): each layer's `LayerRouter` over the pooled hidden state of the prompt ->
  [B, E] logits; top-1 per sequence; trained with cross-entropy on the domain label.
- MoSLD (`Routing.TOPK`: `top_k_gates` + `load_balance_loss`): token-level softmax, top-k renormalised, Switch-style
  balance loss.
- MoDULA (`Routing.DENSE`): token-level dense softmax over the experts.

Routers read the residual stream entering the layer after a parameter-free RMS normalisation: the
stream's scale grows with depth, and normalising keeps one learning rate sensible for every layer's
router without adding parameters (the paper's router is a plain linear, which this still is).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Routing(StrEnum):
    """How a mixture's routers choose experts (`MixtureSpec.routing`; saved in mixture.json as the value)."""

    SEQUENCE = "sequence"  # one expert per sequence, decided from the prompt (MoA)
    TOPK = "topk"  # per token, the top-k experts' renormalised softmax weights (MoSLD)
    DENSE = "dense"  # per token, a softmax over every expert (MoDULA)

    @property
    def per_token(self) -> bool:
        return self is not Routing.SEQUENCE


def _rms(h: Tensor, eps: float = 1e-6) -> Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def pooler(mask: Tensor, how: str = "mean", dtype: torch.dtype = torch.float32) -> Callable[[Tensor], Tensor]:
    """The pooling of `pool` over prompts with this mask [B, T], its mask-only parts computed once: -> a function
    hidden [B, T, H] (of `dtype`) -> [B, H]. A routing pass pools every layer's input over one mask: built once per
    pass, it launches 3 kernels per layer (multiply, sum, divide) where `pool` launches 6 (the same values)."""
    if how == "mean":
        m = mask.to(dtype).unsqueeze(-1)  # [B, T, 1]
        count = m.sum(1).clamp_min(1.0)  # [B, 1]
        return lambda hidden: (hidden * m).sum(1) / count
    if how == "last":
        pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(1).values.clamp_min(0)  # [B]
        rows = torch.arange(mask.shape[0], device=mask.device)
        return lambda hidden: hidden[rows, last]
    raise ValueError(f"unknown pooling {how!r}; use 'mean' or 'last'")


def pool(hidden: Tensor, mask: Tensor, how: str = "mean") -> Tensor:
    """hidden [B, T, H], mask [B, T] (1 = a prompt token to pool) -> [B, H].

    `last` takes the last masked position of each row (works for left or right padding)."""
    return pooler(mask, how, hidden.dtype)(hidden)


class LayerRouter(nn.Module):
    """Bias-free linear H -> E over RMS-normalised hidden states ([..., H] -> [..., E] logits)."""

    def __init__(self, hidden: int, num_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        nn.init.normal_(self.weight, std=init_std)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(_rms(h).to(self.weight.dtype), self.weight)

    @torch.no_grad()
    def add_expert(self, init_std: float = 0.02) -> None:
        row = torch.empty(1, self.weight.shape[1], device=self.weight.device, dtype=self.weight.dtype)
        nn.init.normal_(row, std=init_std)
        self.weight = nn.Parameter(torch.cat([self.weight.data, row]), requires_grad=self.weight.requires_grad)


def top_k_gates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """logits [..., E] -> (gates [..., E] with the top-k softmax weights renormalised and zeros elsewhere,
    probs [..., E] the full softmax)."""
    probs = logits.softmax(-1)
    top, idx = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    return gates, probs


def load_balance_loss(probs: Tensor, gates: Tensor, mask: Tensor) -> Tensor:
    """Switch-Transformer balance loss E * sum_k f_k * P_k over the valid tokens.

    probs, gates: [B, T, E]; mask [B, T]. f_k = share of token->expert assignments going to expert k
    (top-k selections), P_k = mean router probability of expert k. Equals 1 when perfectly balanced."""
    E = probs.shape[-1]
    m = mask.to(probs.dtype).unsqueeze(-1)
    n = m.sum().clamp_min(1.0)
    assigned = (gates > 0).to(probs.dtype) * m
    f = assigned.sum((0, 1)) / assigned.sum().clamp_min(1.0)
    P = (probs * m).sum((0, 1)) / n
    return E * (f * P).sum()
