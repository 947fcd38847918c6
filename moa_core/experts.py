"""The expert-mixture linear layer shared by MoA, MoSLD and MoDULA.

`ExpertMixtureLinear` wraps one frozen `nn.Linear` (W0) and holds E LoRA experts as stacked tensors:

    A: [E_a, r, d_a]    E_a = 1 when A is shared (MoSLD), else E;  d_a = d_in, or d_out for MoDULA-Res
    B: [E, d_out, r]
    scaling: [E]        alpha / r of each expert (experts of lower rank are zero-padded to r)

and computes, for a batch whose rows or tokens use different experts, without a Python loop over rows
or experts:

    parallel:  y = W0 x + sum_k g_k s_k B_k A_k x                                (MoA, MoSLD, MoDULA-Flan)
    residual:  h = s_u B_u A_u x;   y = W0 x + h + sum_k g_k s_k B_k LeakyReLU(A_k h)   (MoDULA-Res)

MoDULA-Res on a non-square projection (d_in != d_out, e.g. gate/up/down): the routed experts read h,
which lives in d_out, so their A is sized [r, d_out] (d_a = d_out). That keeps the paper's serial form
on every projection instead of restricting Res to square ones.

Two routing forms, set per forward by the owning transformer layer through a shared `LayerSlot`:
- `Route.index` [B]: one expert per sequence (MoA top-1, forced/gold routing). Each row's A_k and s_k B_k
  are gathered and applied with `bmm`, the second product accumulating into W0 x (`baddbmm`), so the
  cost is that of one LoRA, whatever E is. Without autograd (generation) the gathered weights are kept
  on the `Route` and reused while the same route stays set (every decode step of one generate call).
- `Route.gates` [B, T, E]: per-token weights (MoSLD top-k, MoDULA dense softmax). The experts are
  concatenated along the rank axis, so the mixture is two matmuls of rank E*r; unselected experts
  have gate 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Route:
    """How the experts of one transformer layer are used for the current forward.

    Exactly one of `index` ([B] long, sequence-level) or `gates` ([B, T, E] float, token-level) is set,
    or neither, which switches the routed experts off (the universal expert of MoDULA-Res stays on).
    """

    index: Tensor | None = None
    gates: Tensor | None = None
    # index is E equal expert-major blocks (rows [k*b, (k+1)*b) use expert k, for every expert k; b = B / E), as
    # MixtureModel.forward(expert_blocks=True) vouches: the experts apply to views of the blocks, without gathers
    blocks: bool = False
    # gathered (A, s*B) per wrapped projection, filled only when autograd is off; lives as long as the route
    cache: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class LayerSlot:
    """Mutable routing state shared by every wrapped projection of one transformer layer."""

    layer: int
    route: Route = field(default_factory=Route)
    adapters_off: bool = False
    fused: bool = False  # this forward may use the fused routed-LoRA kernels (moa_core.lora_kernels)
    folded: bool = False  # one expert's LoRA is folded into the group's weights (lora_kernels.LoraGroup.fold): use them


class ExpertMixtureLinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        slot: LayerSlot,
        num_experts: int,
        r: int,
        scaling: float,
        *,
        shared_a: bool = False,
        dropout: float = 0.0,
        dropconnect_p: float = 0.0,
        universal_r: int = 0,
        universal_scaling: float = 1.0,
        leaky_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"ExpertMixtureLinear wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        self.slot = slot
        self.num_experts = num_experts
        self.r = r
        self.shared_a = shared_a
        self.residual = universal_r > 0  # MoDULA-Res: a universal expert feeds the routed ones
        self.dropconnect_p = dropconnect_p
        self.leaky_slope = leaky_slope
        self.fused_group = None  # a lora_kernels.LoraGroup, set by MixtureModel for the fused inference path
        self.fused_columns = (0, 0)  # this projection's columns of its group's result (set with fused_group)
        d_in, d_out = base.in_features, base.out_features
        d_a = d_out if self.residual else d_in
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(1 if shared_a else num_experts, r, d_a, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, device=dev, dtype=dt))
        self.register_buffer("scaling", torch.full((num_experts,), float(scaling), device=dev, dtype=dt))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if universal_r > 0:
            self.universal_A = nn.Parameter(torch.empty(universal_r, d_in, device=dev, dtype=dt))
            self.universal_B = nn.Parameter(torch.zeros(d_out, universal_r, device=dev, dtype=dt))
            self.universal_scaling = universal_scaling
        else:
            self.universal_A = self.universal_B = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PEFT's LoRA init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a new expert starts as a no-op."""
        for k in range(self.lora_A.shape[0]):
            nn.init.kaiming_uniform_(self.lora_A[k], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.universal_A is not None:
            nn.init.kaiming_uniform_(self.universal_A, a=math.sqrt(5))
            nn.init.zeros_(self.universal_B)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # ------------------------------------------------------------------------------------------ forward
    def _expert_A(self) -> Tensor:
        """A with DropConnect (MoSLD): element-wise Bernoulli mask on the shared weights, inverse-scaled,
        during training only."""
        if self.training and self.dropconnect_p > 0:
            return F.dropout(self.lora_A, p=self.dropconnect_p, training=True)
        return self.lora_A

    def _act(self, h: Tensor) -> Tensor:
        return F.leaky_relu(h, self.leaky_slope) if self.residual else h

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, T, d_in] -> [B, T, d_out]."""
        if self.slot.folded:
            return self.fused_group.folded(self, x)  # every row's expert is in the weights already
        if self._fused_here(x) and self.fused_group.takes_whole(x):
            return self.fused_group.whole(self, x, self.slot.route.index)  # base and LoRA in the group's kernels
        if self._blocked_group_here():
            return self.fused_group.blocked(self, x, self.slot.route.index)  # the group's members in one pass
        # plain nn.Linear: call F.linear directly (one module call less per projection and decode step)
        y = F.linear(x, self.base.weight, self.base.bias) if type(self.base) is nn.Linear else self.base(x)
        if self.slot.adapters_off:
            return y
        xd = self.dropout(x) if self.training else x  # dropout is the identity in eval: skip the module call
        if self.residual:
            h = (xd @ self.universal_A.t()) @ self.universal_B.t() * self.universal_scaling  # [B, T, d_out]
            y = y + h
            xd = h  # the domain experts read the universal expert's output
        route = self.slot.route
        if route.index is not None:
            return self._indexed(xd, route, y)
        if route.gates is not None:
            return y + self._gated(xd, route.gates)
        return y

    def _fused_here(self, x: Tensor) -> bool:
        """Whether this forward's routed LoRA goes to the fused kernels (lora_kernels.LoraGroup): inference with one
        expert per sequence, on a projection the model put in a group."""
        slot = self.slot
        return (slot.fused and self.fused_group is not None and slot.route.index is not None and not slot.adapters_off
                and not self.training and x.dtype == self.fused_group.dtype)

    def _blocked_group_here(self) -> bool:
        """Whether this forward runs with its group's other members (lora_kernels.blocked_group): training, rows in
        expert-major blocks, in a group that may (same rank and dropout, base weights stacked)."""
        slot = self.slot
        return (self.training and slot.route.blocks and not slot.adapters_off and self.fused_group is not None
                and self.fused_group.trains_blocked())

    def _indexed(self, x: Tensor, route: Route, y: Tensor) -> Tensor:
        """Sequence-level top-1: x [B, T, d_a], route.index [B], y = W0 x [B, T, d_out] -> y + delta."""
        if self._fused_here(x):
            return self.fused_group.apply(self, x, route.index, y)  # one kernel per group of projections
        if x.shape[1] == 1 and not self.shared_a and torch.compiler.is_compiling():
            return self._indexed_decode(x, route.index, y)
        if route.blocks and not self.shared_a:
            return self._blocked(x, y)
        A_g, B_g = self._gathered(route)
        h = x @ A_g if self.shared_a else torch.bmm(x, A_g)  # [B, T, r]
        if self.residual:
            h = F.leaky_relu(h, self.leaky_slope)
        return torch.baddbmm(y, h, B_g)  # y + h (s B)^T, one kernel

    def _blocked(self, x: Tensor, y: Tensor) -> Tensor:
        """Rows in E equal expert-major blocks (`Route.blocks`): x [E*b, T, d_a], y [E*b, T, d_out] -> y + delta.
        Block k is multiplied by expert k's own A and s*B (one bmm each over [E, b*T, .] views): no gather of a
        weight per row, and so no index_add in the backward either. Serves the projections alone in their group (o,
        down) and groups that cannot run their members together; the others go through LoraGroup.blocked."""
        E = self.lora_B.shape[0]
        h = torch.bmm(x.reshape(E, -1, x.shape[-1]), self._expert_A().transpose(1, 2))  # [E, b*T, r]
        if self.residual:
            h = F.leaky_relu(h, self.leaky_slope)
        sB = self.lora_B * self.scaling.view(-1, 1, 1)  # [E, d_out, r]
        return torch.baddbmm(y.reshape(E, -1, y.shape[-1]), h, sB.transpose(1, 2)).view(y.shape)

    def _indexed_decode(self, x: Tensor, index: Tensor, y: Tensor) -> Tensor:
        """One decode step (T = 1) under torch.compile: gather, multiply and reduce instead of bmm, which
        inductor fuses into one kernel per product (a batched GEMM of [1, d] x [d, r] costs a launch-sized
        kernel plus the separate gathers; inside a CUDA graph that doubled a 0.5B model's decode step)."""
        A_k = self._expert_A().index_select(0, index)  # [B, r, d_a]
        h = (x * A_k).sum(-1)  # [B, 1, d_a] * [B, r, d_a] -> [B, r]
        if self.residual:
            h = F.leaky_relu(h, self.leaky_slope)
        B_k = self.lora_B.index_select(0, index) * self.scaling.index_select(0, index).view(-1, 1, 1)  # [B, d_out, r]
        return y + (h.unsqueeze(1) * B_k).sum(-1).unsqueeze(1)  # [B, 1, d_out]

    def _gathered(self, route: Route) -> tuple[Tensor, Tensor]:
        """Each row's expert, ready for bmm: A_g [B, d_a, r] ([d_a, r] when A is shared), B_g [B, r, d_out]
        with the expert's scaling folded in. Reused from `route.cache` while autograd is off and the
        weights are unchanged (their version counters), so decode steps skip the gathers. Not cached
        under torch.compile, which traces the gathers into its graph instead, nor while a CUDA graph is being
        captured (graph_decode): the graph must gather from the expert buffer it replays with, not read a gather
        made for the experts of the warm-up."""
        cacheable = not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
                         or (route.index.is_cuda and torch.cuda.is_current_stream_capturing()))
        if cacheable:
            key = (self.lora_A._version, self.lora_B._version, self.scaling._version)
            hit = route.cache.get(id(self))
            if hit is not None and hit[0] == key:
                return hit[1], hit[2]
        index = route.index
        A = self._expert_A()
        A_g = A[0].t() if self.shared_a else A.index_select(0, index).transpose(1, 2)
        B_g = (self.lora_B.index_select(0, index) * self.scaling.index_select(0, index).view(-1, 1, 1)).transpose(1, 2)
        if cacheable:
            route.cache[id(self)] = (key, A_g, B_g)
        return A_g, B_g

    def _gated(self, x: Tensor, gates: Tensor) -> Tensor:
        """Token-level mixture: x [B, T, d_a], gates [B, T, E] -> delta [B, T, d_out]."""
        E, d_out, r = self.lora_B.shape
        A = self._expert_A()
        if self.shared_a:
            h = (x @ A[0].t()).unsqueeze(-2).expand(*x.shape[:-1], E, r)  # [B, T, E, r]
        else:
            h = (x @ A.reshape(E * r, -1).t()).view(*x.shape[:-1], E, r)  # [B, T, E, r]
        h = self._act(h) * (gates * self.scaling).unsqueeze(-1)
        B_cat = self.lora_B.permute(1, 0, 2).reshape(d_out, E * r)  # [d_out, E*r]
        return h.reshape(*x.shape[:-1], E * r) @ B_cat.t()

    # ---------------------------------------------------------------------------------------- experts
    @torch.no_grad()
    def load_expert(self, k: int, A: Tensor, B: Tensor, scaling: float) -> None:
        """Copy one LoRA (A [r_k, d_a], B [d_out, r_k]) into slot k; ranks below r are zero-padded."""
        r_k = A.shape[0]
        if r_k > self.r:
            raise ValueError(f"expert rank {r_k} exceeds the mixture rank {self.r}")
        if self.shared_a:
            raise ValueError("experts with a shared A cannot load separate LoRA A matrices")
        # in place on the parameters (not .data), so that their version counters record the change
        self.lora_A[k].zero_()
        self.lora_A[k, :r_k].copy_(A)
        self.lora_B[k].zero_()
        self.lora_B[k, :, :r_k].copy_(B)
        self.scaling[k] = scaling

    @torch.no_grad()
    def add_expert(self) -> int:
        """Append one freshly initialised expert; existing experts' tensors are copied bit-for-bit."""
        if self.shared_a:
            new_A = self.lora_A.data
        else:
            a = torch.empty(1, *self.lora_A.shape[1:], device=self.lora_A.device, dtype=self.lora_A.dtype)
            nn.init.kaiming_uniform_(a[0], a=math.sqrt(5))
            new_A = torch.cat([self.lora_A.data, a])
        new_B = torch.cat([self.lora_B.data, torch.zeros_like(self.lora_B.data[:1])])
        self.lora_A = nn.Parameter(new_A, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(new_B, requires_grad=self.lora_B.requires_grad)
        self.scaling = torch.cat([self.scaling, self.scaling[-1:].clone()])
        self.num_experts += 1
        return self.num_experts - 1

    def extra_repr(self) -> str:
        kind = "residual" if self.residual else "parallel"
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, r={self.r}, "
            f"shared_a={self.shared_a}, {kind}, universal_r={0 if self.universal_A is None else self.universal_A.shape[0]}"
        )
