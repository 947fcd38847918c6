"""The routed (index) path of `ExpertMixtureLinear` as it was before the bench work (git ed046f7), kept so
that one bench run can time the old and the new path side by side (variant `moa_v0`).

Old path per wrapped projection and forward: gather A_k ([B, r, d_in]), bmm, gather B_k, bmm, gather
s_k, multiply the [B, T, d_out] delta, add it to W0 x: 8 kernels, gathers repeated every decode step.
New path (moa_core/experts.py): gather A_k and s_k*B_k once per route (cached while autograd is off),
bmm, baddbmm into W0 x: 3 kernels per decode step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from moa_core.experts import ExpertMixtureLinear


def _legacy_forward(self: ExpertMixtureLinear, x: Tensor) -> Tensor:
    y = self.base(x)
    if self.slot.adapters_off:
        return y
    xd = self.dropout(x)
    if self.residual:
        h = (xd @ self.universal_A.t()) @ self.universal_B.t() * self.universal_scaling
        y = y + h
        xd = h
    route = self.slot.route
    if route.index is not None:
        return y + _legacy_indexed(self, xd, route.index)
    if route.gates is not None:
        return y + self._gated(xd, route.gates)
    return y


def _legacy_indexed(self: ExpertMixtureLinear, x: Tensor, index: Tensor) -> Tensor:
    A = self._expert_A()
    if self.shared_a:
        h = x @ A[0].t()
    else:
        h = torch.bmm(x, A.index_select(0, index).transpose(1, 2))
    h = self._act(h)
    delta = torch.bmm(h, self.lora_B.index_select(0, index).transpose(1, 2))
    return delta * self.scaling.index_select(0, index).view(-1, 1, 1)


@contextlib.contextmanager
def legacy_routed_path() -> Iterator[None]:
    """Swap the old index path in for the duration (class-wide; single-threaded bench use only)."""
    new = ExpertMixtureLinear.forward
    ExpertMixtureLinear.forward = _legacy_forward
    try:
        yield
    finally:
        ExpertMixtureLinear.forward = new
