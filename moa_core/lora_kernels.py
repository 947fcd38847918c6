"""Fused routed LoRA for sequence-level routing (MoA inference): one kernel per group of projections.

The reference path (`ExpertMixtureLinear._indexed`) runs, per wrapped projection and forward, a gather of
each row's A and s*B plus two batched matmuls (or, under torch.compile, gather-multiply-sum kernels). Under
CUDA graphs those small kernels, about eight per layer, are what keeps routed decoding above the base
model's time. This module computes the same function with one kernel per *group* of projections that read
the same input (q/k/v; gate/up; o and down alone):

    h   = x @ A_cat[e]^T            A_cat [E, R, K]: the members' A stacked along the rank (R = sum of ranks)
    out = h @ B_bd[e]^T (+ y)       B_bd  [E, N, R]: the members' s_k B_k block-diagonal (N = sum of d_out)

for each row b with expert e = index[b] ([B], the only routing metadata: a fixed-shape tensor, so a
CUDA graph captured once replays correctly for any assignment of experts to rows). The shrink is done
once for the group (q's call computes q/k/v's deltas; k and v take theirs from `LoraGroup.stash`), each
program reads its row's expert A and B (experts not in the batch are never read), and the kernel adds the
base output y itself when the group has one member.

`routed_lora_torch` is the same formulation in torch (what runs on the CPU, and the oracle of the kernel);
`routed_lora_triton` is the Triton kernel, used on CUDA when triton is importable. A decode step (one token per
row) has two kernel layouts, chosen by `DECODE_SPLIT`: one kernel per group (each program shrinks its row, then
expands a span of columns in a loop) or a shrink kernel and an expand kernel, each one short pass over a grid
of many small programs (two launches, no sequential loop over the columns). Under torch.compile both
are reached through the custom op `moa::routed_lora`, which stays one opaque call in the graph.
Only inference uses this path (no autograd, eval mode, MoA-style experts: no shared A, no universal
expert); training keeps the reference path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # experts.py imports nothing from here: the hook there is one attribute
    from .experts import ExpertMixtureLinear

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the torch formulation serves
    HAVE_TRITON = False

# Projections of one layer that HF decoders call on the same input tensor, in call order.
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)

# Decode-step kernel layout (see the module docstring): False = one kernel per group, True = shrink + expand.
# True since it measured 10-12 % faster in the projection stack at every batch (1-32) and expert count (8-64)
# and ~5 % in the full model under CUDA graphs (H200, BENCHMARKS.md). Read where torch.compile traces
# (`run_group`), so a change recompiles and re-captures instead of replaying the other layout's CUDA graph.
DECODE_SPLIT = True


# ------------------------------------------------------------------------------------------ formulation
def routed_lora_torch(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """x [Bsz, T, K], A [E, R, K], B [E, N, R] (scaling folded in), index [Bsz] -> [Bsz, T, N]:
    row b's x @ A[e]^T @ B[e]^T with e = index[b], plus y [Bsz, T, N] when given."""
    h = torch.bmm(x, A.index_select(0, index).transpose(1, 2))  # [Bsz, T, R]
    Bg = B.index_select(0, index).transpose(1, 2)  # [Bsz, R, N]
    return torch.bmm(h, Bg) if y is None else torch.baddbmm(y, h, Bg)


if HAVE_TRITON:

    @triton.jit
    def _routed_lora_kernel(
        x_ptr, a_ptr, b_ptr, idx_ptr, y_ptr, out_ptr,
        T, K, R, N, n_per_prog,
        sxb, sxt, sxk, sae, sar, sak, sbe, sbn, sbr, syb, syt, syn, sob, sot, son,
        HAS_Y: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (row b and a tile of its tokens, a span of output columns): shrink over all of K, then
        expand over the span. Every token of the program uses the same expert (sequence routing)."""
        t_tiles = tl.cdiv(T, BLOCK_T)
        b = tl.program_id(0) // t_tiles
        t0 = (tl.program_id(0) % t_tiles) * BLOCK_T
        e = tl.load(idx_ptr + b).to(tl.int64)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_r = tl.arange(0, R_PAD)
        t_ok = offs_t < T
        r_ok = offs_r < R
        h = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xk = tl.load(x_ptr + b * sxb + offs_t[:, None] * sxt + offs_k[None, :] * sxk,
                         mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
            ak = tl.load(a_ptr + e * sae + offs_r[None, :] * sar + offs_k[:, None] * sak,
                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, R_PAD]
            if IEEE:
                h += tl.dot(xk, ak, input_precision="ieee")
            else:
                h += tl.dot(xk, ak)
        h_lo = h.to(x_ptr.dtype.element_ty)  # the reference rounds the shrink to the activation dtype too
        n_start = tl.program_id(1) * n_per_prog
        for n0 in range(n_start, n_start + n_per_prog, BLOCK_N):  # the last span's tiles past N are masked
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            bt = tl.load(b_ptr + e * sbe + offs_n[None, :] * sbn + offs_r[:, None] * sbr,
                         mask=n_ok[None, :] & r_ok[:, None], other=0.0)  # [R_PAD, BLOCK_N]
            if IEEE:
                d = tl.dot(h_lo, bt, input_precision="ieee")
            else:
                d = tl.dot(h_lo, bt)
            mask = t_ok[:, None] & n_ok[None, :]
            if HAS_Y:
                d += tl.load(y_ptr + b * syb + offs_t[:, None] * syt + offs_n[None, :] * syn, mask=mask,
                             other=0.0).to(tl.float32)
            tl.store(out_ptr + b * sob + offs_t[:, None] * sot + offs_n[None, :] * son,
                     d.to(out_ptr.dtype.element_ty), mask=mask)


if HAVE_TRITON:

    @triton.jit
    def _expand_decode_tile(h, b_ptr, y_ptr, out_ptr, b, e, offs_n, offs_r, r_ok, N,
                            sbe, sbn, sbr, syb, syn, sob, son, HAS_Y: tl.constexpr):
        """One decode row's expand over the columns offs_n: out[b, offs_n] = B[e][offs_n] . h (+ y[b, offs_n]),
        h [R_PAD] fp32; both decode layouts end with it."""
        n_ok = offs_n < N
        bt = tl.load(b_ptr + e * sbe + offs_n[:, None] * sbn + offs_r[None, :] * sbr,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, R_PAD]
        d = tl.sum(bt * h[None, :], axis=1)  # [BLOCK_N]
        if HAS_Y:
            d += tl.load(y_ptr + b * syb + offs_n * syn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * sob + offs_n * son, d.to(out_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _routed_lora_decode_kernel(
        x_ptr, a_ptr, b_ptr, idx_ptr, y_ptr, out_ptr,
        K, R, N, n_per_prog,
        sxb, sxk, sae, sar, sak, sbe, sbn, sbr, syb, syn, sob, son,
        HAS_Y: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One token per row (a decode step): program (row b, a span of output columns). Multiply-and-sum on
        the CUDA cores rather than tl.dot, which would need 16 rows; wide K blocks keep the loop short."""
        b = tl.program_id(0)
        e = tl.load(idx_ptr + b).to(tl.int64)
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        h = tl.zeros((R_PAD,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xk = tl.load(x_ptr + b * sxb + offs_k * sxk, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            ak = tl.load(a_ptr + e * sae + offs_r[:, None] * sar + offs_k[None, :] * sak,
                         mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [R_PAD, BLOCK_K]
            h += tl.sum(ak * xk[None, :], axis=1)
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds the shrink to the activation dtype
        n_start = tl.program_id(1) * n_per_prog
        for n0 in range(n_start, n_start + n_per_prog, BLOCK_N):  # the last span's tiles past N are masked
            _expand_decode_tile(h, b_ptr, y_ptr, out_ptr, b, e, n0 + tl.arange(0, BLOCK_N), offs_r, r_ok, N,
                                sbe, sbn, sbr, syb, syn, sob, son, HAS_Y)


if HAVE_TRITON:

    @triton.jit
    def _routed_shrink_decode_kernel(
        x_ptr, a_ptr, idx_ptr, h_ptr, K,
        sxb, sxk, sae, sar, sak, shb, shr,
        BLOCK_K: tl.constexpr,
    ):
        """Program (row b, rank r): h[b, r] = x[b] . A[index[b], r], rounded to the activation dtype."""
        b = tl.program_id(0)
        r = tl.program_id(1)
        e = tl.load(idx_ptr + b).to(tl.int64)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xk = tl.load(x_ptr + b * sxb + offs_k * sxk, mask=k_ok, other=0.0).to(tl.float32)
            ak = tl.load(a_ptr + e * sae + r * sar + offs_k * sak, mask=k_ok, other=0.0).to(tl.float32)
            acc += xk * ak
        tl.store(h_ptr + b * shb + r * shr, tl.sum(acc, axis=0).to(h_ptr.dtype.element_ty))

    @triton.jit
    def _routed_expand_decode_kernel(
        h_ptr, b_ptr, idx_ptr, y_ptr, out_ptr, R, N,
        shb, shr, sbe, sbn, sbr, syb, syn, sob, son,
        HAS_Y: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (row b, a tile of BLOCK_N output columns): out = h[b] @ B[index[b]]^T (+ y)."""
        b = tl.program_id(0)
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        e = tl.load(idx_ptr + b).to(tl.int64)
        h = tl.load(h_ptr + b * shb + offs_r * shr, mask=r_ok, other=0.0).to(tl.float32)  # [R_PAD]
        _expand_decode_tile(h, b_ptr, y_ptr, out_ptr, b, e, tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N),
                            offs_r, r_ok, N, sbe, sbn, sbr, syb, syn, sob, son, HAS_Y)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def routed_lora_triton(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None,
                       split: bool = False) -> Tensor:
    """The Triton kernel behind `routed_lora_torch` (same arguments and result); split: a decode step's
    layout (`DECODE_SPLIT`)."""
    Bsz, T, K = x.shape
    E, N, R = B.shape
    out = torch.empty(Bsz, T, N, device=x.device, dtype=x.dtype)
    if T == 1:
        return (_launch_decode_split if split else _launch_decode)(x, A, B, index, y, out)
    BLOCK_T = 16 if T <= 16 else 64  # tl.dot needs 16 rows; a decode step (T = 1) masks the other 15
    BLOCK_K = min(128, _pow2_at_least(K, 16))
    R_PAD = _pow2_at_least(R, 16)
    BLOCK_N = 128 if R_PAD <= 32 else 64
    rows = Bsz * triton.cdiv(T, BLOCK_T)
    n_tiles = triton.cdiv(N, BLOCK_N)
    # about two programs per SM: each span of columns re-reads the row's A (from L2), so no more spans than needed
    n_split = max(1, min(n_tiles, triton.cdiv(264, rows)))
    n_per_prog = triton.cdiv(n_tiles, n_split) * BLOCK_N
    n_split = triton.cdiv(N, n_per_prog)
    ys = y.stride() if y is not None else (0, 0, 0)
    _routed_lora_kernel[(rows, n_split)](
        x, A, B, index, y if y is not None else out, out,
        T, K, R, N, n_per_prog,
        *x.stride(), *A.stride(), *B.stride(), *ys, *out.stride(),
        HAS_Y=y is not None, IEEE=x.dtype == torch.float32,
        BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, R_PAD=R_PAD, BLOCK_N=BLOCK_N,
    )
    return out


def _routed_lora_impl(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None,
                      split: bool = False) -> Tensor:
    if x.is_cuda and HAVE_TRITON:
        return routed_lora_triton(x, A, B, index, y, split)
    return routed_lora_torch(x, A, B, index, y)


def _launch_decode(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor], out: Tensor) -> Tensor:
    Bsz, _, K = x.shape
    _, N, R = B.shape
    R_PAD = _pow2_at_least(R, 1)
    BLOCK_K = min(_pow2_at_least(K, 16), max(64, 8192 // R_PAD))  # the [R_PAD, BLOCK_K] tile stays ~32 regs/thread
    BLOCK_N = 128
    n_tiles = triton.cdiv(N, BLOCK_N)
    n_split = max(1, min(n_tiles, triton.cdiv(264, Bsz)))  # about two programs per SM
    n_per_prog = triton.cdiv(n_tiles, n_split) * BLOCK_N
    n_split = triton.cdiv(N, n_per_prog)
    ys = (y.stride(0), y.stride(2)) if y is not None else (0, 0)
    _routed_lora_decode_kernel[(Bsz, n_split)](
        x, A, B, index, y if y is not None else out, out,
        K, R, N, n_per_prog,
        x.stride(0), x.stride(2), *A.stride(), *B.stride(), *ys, out.stride(0), out.stride(2),
        HAS_Y=y is not None, BLOCK_K=BLOCK_K, R_PAD=R_PAD, BLOCK_N=BLOCK_N, num_warps=8,
    )
    return out


def _launch_decode_split(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor], out: Tensor) -> Tensor:
    Bsz, _, K = x.shape
    _, N, R = B.shape
    h = torch.empty(Bsz, R, device=x.device, dtype=x.dtype)  # the shrink, in the activation dtype (as the reference)
    BLOCK_K = min(_pow2_at_least(K, 16), 2048)
    _routed_shrink_decode_kernel[(Bsz, R)](
        x, A, index, h, K, x.stride(0), x.stride(2), *A.stride(), *h.stride(), BLOCK_K=BLOCK_K, num_warps=4)
    R_PAD = _pow2_at_least(R, 1)
    BLOCK_N = 128
    ys = (y.stride(0), y.stride(2)) if y is not None else (0, 0)
    _routed_expand_decode_kernel[(Bsz, triton.cdiv(N, BLOCK_N))](
        h, B, index, y if y is not None else out, out, R, N,
        *h.stride(), *B.stride(), *ys, out.stride(0), out.stride(2),
        HAS_Y=y is not None, R_PAD=R_PAD, BLOCK_N=BLOCK_N, num_warps=4)
    return out


@torch.library.custom_op("moa::routed_lora", mutates_args=())
def routed_lora(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None,
                split: bool = False) -> Tensor:
    """One routed LoRA group (see `routed_lora_torch`): the Triton kernel on CUDA, else the torch formulation."""
    return _routed_lora_impl(x, A, B, index, y, split)


@routed_lora.register_fake
def _(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None, split: bool = False) -> Tensor:
    return x.new_empty(*x.shape[:-1], B.shape[1])


def run_group(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """The custom op where torch.compile traces (it stays one opaque call in the graph); eagerly its body,
    since the op dispatcher's host time would be paid on every projection group of every decode step."""
    if torch.compiler.is_compiling():
        return routed_lora(x, A, B, index, y, DECODE_SPLIT)
    return _routed_lora_impl(x, A, B, index, y, DECODE_SPLIT)


# ------------------------------------------------------------------------------------------------ groups
class LoraGroup:
    """Wrapped projections of one layer that read the same input, with their experts stacked for the kernel.

    A [E, R, K] and B [E, N, R] are rebuilt by `refresh()` (outside any compiled region) when a member's
    weights changed, in place where the shapes allow, and marked as static addresses so that CUDA graphs
    neither copy them per replay nor re-record."""

    def __init__(self, members: list["ExpertMixtureLinear"]) -> None:
        self.members = members
        self.rank_slices: list[slice] = []
        self.out_slices: list[slice] = []
        r0 = n0 = 0
        for m in members:
            self.rank_slices.append(slice(r0, r0 + m.r))
            self.out_slices.append(slice(n0, n0 + m.out_features))
            r0, n0 = r0 + m.r, n0 + m.out_features
        self.position = {id(m): i for i, m in enumerate(members)}
        self.A: Tensor | None = None
        self.B: Tensor | None = None
        self._key: tuple | None = None
        # (input, index, deltas [Bsz, T, N], members still to take theirs): the shrink of q serves k and v
        self.stash: tuple | None = None

    def _weights_key(self) -> tuple:
        return tuple((id(p), p._version, p.device, p.dtype, tuple(p.shape))
                     for m in self.members for p in (m.lora_A, m.lora_B, m.scaling))

    @torch.no_grad()
    def refresh(self) -> None:
        key = self._weights_key()
        if key == self._key:
            return
        ms = self.members
        A = torch.cat([m.lora_A for m in ms], dim=1)  # [E, R, K]
        E = A.shape[0]
        B = A.new_zeros(E, self.out_slices[-1].stop, self.rank_slices[-1].stop)  # [E, N, R]
        for m, rs, ns in zip(ms, self.rank_slices, self.out_slices):
            B[:, ns, rs] = m.lora_B * m.scaling.view(-1, 1, 1)
        if self.A is not None and self.A.shape == A.shape and self.A.device == A.device and self.A.dtype == A.dtype \
                and self.B.shape == B.shape:
            self.A.copy_(A)
            self.B.copy_(B)
        else:
            self.A, self.B = A, B
            if A.is_cuda:
                torch._dynamo.mark_static_address(self.A)
                torch._dynamo.mark_static_address(self.B)
        self.stash = None
        self._key = key

    def apply(self, member: "ExpertMixtureLinear", x: Tensor, index: Tensor, y: Tensor) -> Tensor:
        """member's y + its LoRA delta; x [Bsz, T, K], index [Bsz], y [Bsz, T, d_out]."""
        if len(self.members) == 1:
            return run_group(x, self.A, self.B, index, y)
        i = self.position[id(member)]
        st = self.stash
        if st is not None and st[0] is x and st[1] is index:
            deltas = st[2]
            self.stash = None if st[3] == 1 else (x, index, deltas, st[3] - 1)
        else:  # the first member called on this input computes the whole group's deltas
            deltas = run_group(x, self.A, self.B, index, None)
            self.stash = (x, index, deltas, len(self.members) - 1)
        return y + deltas[..., self.out_slices[i]]


class LoraFusion:
    """The fused path of one MixtureModel: its groups, and whether it is on.

    enabled: None (default) = on where it pays, on CUDA with triton importable; True = on everywhere (the
    torch formulation on the CPU, used by the tests); False = off (the reference path everywhere)."""

    def __init__(self, wrapped: dict[str, "ExpertMixtureLinear"]) -> None:
        self.enabled: bool | None = None
        self.groups: list[LoraGroup] = []
        eligible = {n: w for n, w in wrapped.items() if not w.shared_a and not w.residual}
        taken: set[str] = set()
        for name in eligible:
            if name in taken:
                continue
            parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            sibs = next((s for s in SIBLINGS if leaf in s), (leaf,))
            names = [f"{parent}.{s}" if parent else s for s in sibs]
            members = [n for n in names if n in eligible and n not in taken]
            if leaf not in sibs or len({eligible[n].lora_A.shape[2] for n in members}) != 1:
                members = [name]
            group = LoraGroup([eligible[n] for n in members])
            for n in members:
                eligible[n].fused_group = group
                taken.add(n)
            self.groups.append(group)

    def ready(self) -> bool:
        """Whether this forward may use the fused path; refreshes the stacked weights when it may."""
        if not self.groups or self.enabled is False:
            return False
        if self.enabled is None:
            w = self.groups[0].members[0].lora_A
            if not (w.is_cuda and HAVE_TRITON):
                return False
        for g in self.groups:
            g.refresh()
        return True
