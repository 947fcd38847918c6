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
base output y itself when the group has one member, and in a prompt pass (below) for a group of several too.

`routed_lora_torch` is the same formulation in torch (what runs on the CPU, and the oracle of the kernel);
`routed_lora_triton` is the Triton kernel, used on CUDA when triton is importable. A decode step (one token per
row) has four kernel layouts, chosen by `DECODE_LAYOUT`:

- "fused": one kernel per group (each program shrinks its row, then expands a span of columns in a loop), after
  the base projections;
- "split": a shrink kernel and an expand kernel, each one short pass over a grid of many small programs, after
  the base projections;
- "merged": a shrink kernel, then one kernel that computes the whole group's output, base and LoRA together:

      out[b] = x[b] @ W_cat^T (+ bias_cat) + sum_j h[b, m(n) r + j] Bt[e, j, n]     for every column n

  where W_cat [N, K] is the members' base weights stacked (q/k/v: one GEMM instead of three; the members'
  `base.weight` become views of it, so it costs no memory) and Bt [E, r, N] each member's s B^T side by side,
  m(n) the member that owns column n. For a large weight (gate/up, down on a 0.5B model) cuBLAS's GEMM over W_cat
  and the split layout's kernels serve instead (`MERGED_CONFIG`: Triton's GEMM was slower there). A decode
  step of a Qwen2-0.5B layer then runs 10 kernels for its 7 projections (q/k/v and o: a shrink and the GEMM;
  gate/up and down: cuBLAS, a shrink, an expand) where the base model runs 7 GEMMs.
- "augmented" (the default): the routed expand folded into the base GEMM's reduction, by concatenation:

      out = [x | s_0 | ... | s_{E-1}] @ Wa^T (+ bias_cat),   Wa = [W_cat | B_bd[0] | ... | B_bd[E-1]]  [N, K + E R]

  where s_e = h = x A[e]^T in row b's slot e = index[b] and zero in the others (`augment_torch`; on CUDA one kernel,
  `augment_triton`, writes x, the row's shrink and the zeros). One cuBLAS GEMM then does base and LoRA together at
  cuBLAS's bandwidth, for the price of reading E R more columns of weights: a layer's decode step runs 8 kernels
  (a pack and a GEMM per group). The members' base weights and W_cat are views of Wa's first K columns (no second
  copy); a group whose E R N exceeds `AUGMENT_MAX_EXTRA` runs the merged layout instead.

A prompt pass (many tokens per row) has two layouts, chosen by `PROMPT_LAYOUT`: "fused" (the group kernel above;
for q/k/v and gate/up after one base GEMM over W_cat, whose output the kernel reads as y, so that base and delta
leave in one pass and each member's output is a view of its columns: no delta tensor and no add per member; on an
H100 at batch 32 x 128 tokens, strided elementwise kernels, 7 per layer with those adds, had taken 3.8 ms of the
prompt pass's 22.7 ms of kernels) and "merged" (`merged_prompt`: cuBLAS throughout, the group's base projections as
one GEMM over W_cat, one shrink, then each member's expand added into its columns of that result in place).

Under torch.compile the kernels are reached through the custom ops `moa::routed_lora` and
`moa::routed_linear`, each one opaque call in the graph.
Only inference uses these kernels (no autograd, eval mode, MoA-style experts: no shared A, no universal
expert). A training step whose rows come in expert-major blocks (`Route.blocks`) uses the groups too, through
`blocked_group` (torch, with autograd): one base GEMM and one shrink for the group, each member's own dropout mask
and expand (a whole step's LoRA work: 24.6 operators per wrapped projection against 30.8 with each member apart,
`bench/count_training_ops.py`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

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

# Decode-step kernel layout (see the module docstring): "fused", "split", "merged" or "augmented". On the H200
# (BENCHMARKS.md) "split" was 10-12 % faster than "fused" in the projection stack, and "merged" 17-24 % faster than
# "split" at every batch (1-32) and expert count (8-64) (1.17-1.37x the base projections' time against 1.49-1.68x).
# On an H100 the batch-32 call under CUDA graphs took 1.09x the base's time with every group "augmented", 1.17-1.20x
# with o and down alone (a bug kept q/k/v and gate/up merged until d323612) and 1.24x all "merged"
# (bench/results/gpu_h100_aug_*). Read where torch.compile traces
# (`LoraGroup.takes_whole`, `run_group`), so a change recompiles and re-captures instead of replaying another
# layout's CUDA graph.
DECODE_LAYOUTS = ("fused", "split", "merged", "augmented")
DECODE_LAYOUT = "augmented"
# The augmented layout's reach: a group takes it while its experts' extra columns, E R N elements of Wa, are at most
# this many (each replay reads them all, whichever experts the batch holds; 2^22 bf16 elements is 8 MiB, ~3 us of an
# H100's bandwidth); a larger group (on Qwen2-0.5B at rank 8: gate/up from 32 experts on) runs the merged layout.
AUGMENT_MAX_EXTRA = 2 ** 22
# Prompt-pass layout (see the module docstring): "fused" or "merged"; read as DECODE_LAYOUT is.
PROMPT_LAYOUTS = ("fused", "merged")
PROMPT_LAYOUT = "fused"


# ------------------------------------------------------------------------------------------ formulation
def routed_lora_torch(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None) -> Tensor:
    """x [Bsz, T, K], A [E, R, K], B [E, N, R] (scaling folded in), index [Bsz] -> [Bsz, T, N]:
    row b's x @ A[e]^T @ B[e]^T with e = index[b], plus y [Bsz, T, N] when given."""
    h = torch.bmm(x, A.index_select(0, index).transpose(1, 2))  # [Bsz, T, R]
    Bg = B.index_select(0, index).transpose(1, 2)  # [Bsz, R, N]
    return torch.bmm(h, Bg) if y is None else torch.baddbmm(y, h, Bg)


def merged_prompt(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, Bt: Tensor, index: Tensor,
                  bounds: list[int]) -> Tensor:
    """`routed_linear_torch`'s function for a prompt pass (any T), in as few passes over the output as cuBLAS allows:
    out = x W^T + bias (one GEMM for the group), h = x A[e]^T (one shrink), then each member's h_m Bt[e][:, its
    columns] added into its columns of out in place (a batched GEMM that reads and writes only those columns).
    x [Bsz, T, K] -> [Bsz, T, N]."""
    out = torch.nn.functional.linear(x, W, bias)  # [Bsz, T, N]
    # the out's dtype: under autocast the out-of-place ops give bf16 while the in-place one would not cast the experts
    h = torch.bmm(x, A.index_select(0, index).transpose(1, 2)).to(out.dtype)  # [Bsz, T, R]
    Bg = Bt.index_select(0, index).to(out.dtype)  # [Bsz, r, N]
    r = Bt.shape[1]
    edges = [0, *bounds, W.shape[0]]
    for m, (n0, n1) in enumerate(zip(edges, edges[1:])):
        out[..., n0:n1].baddbmm_(h[..., m * r:(m + 1) * r], Bg[..., n0:n1])
    return out


def augment_torch(x: Tensor, A: Tensor, index: Tensor) -> Tensor:
    """The augmented layout's input: x [Bsz, T, K], A [E, R, K], index [Bsz] -> xa [Bsz, T, K + E R], x followed by
    E slots of R columns, all zero but row b's expert's slot, which holds h = x A[e]^T (rounded to x's dtype, as the
    reference rounds it). `F.linear(xa, Wa)` with Wa = [W | B_bd[0] | ... | B_bd[E-1]] ([N, K + E R]) is then the
    group's base projections plus each row's routed LoRA delta, in one GEMM."""
    Bsz, T, _ = x.shape
    E, R, _ = A.shape
    h = torch.bmm(x, A.index_select(0, index).transpose(1, 2))  # [Bsz, T, R]
    slots = torch.nn.functional.one_hot(index, E).to(x.dtype)  # [Bsz, E]
    return torch.cat([x, (slots.view(Bsz, 1, E, 1) * h.view(Bsz, T, 1, R)).view(Bsz, T, E * R)], dim=-1)


def routed_linear_torch(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, Bt: Tensor, index: Tensor,
                        bounds: list[int]) -> Tensor:
    """The merged layout's function: x [Bsz, T, K], W [N, K] (the members' base weights stacked), bias [N] or None,
    A [E, R, K] (R = members x r), Bt [E, r, N] (each member's s B^T side by side), index [Bsz], bounds: the
    first column of each member after the first -> [Bsz, T, N]: x W^T + bias + the LoRA delta of the member owning
    each column, h[..., m r:(m+1) r] @ Bt[e][:, its columns], with h = x A[e]^T."""
    h = torch.bmm(x, A.index_select(0, index).transpose(1, 2))  # [Bsz, T, R]
    Bg = Bt.index_select(0, index)  # [Bsz, r, N]
    r = Bt.shape[1]
    edges = [0, *bounds, W.shape[0]]
    delta = torch.cat([torch.bmm(h[..., m * r:(m + 1) * r], Bg[..., n0:n1])
                       for m, (n0, n1) in enumerate(zip(edges, edges[1:]))], dim=-1)
    return torch.nn.functional.linear(x, W, bias) + delta


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
    def _shrink_one(x_ptr, a_ptr, b, e, r, K, sxb, sxk, sae, sar, sak, BLOCK_K: tl.constexpr):
        """x[b] . A[e, r] over K in blocks of BLOCK_K, accumulated in fp32 (one token per row) -> a scalar."""
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xk = tl.load(x_ptr + b * sxb + offs_k * sxk, mask=k_ok, other=0.0).to(tl.float32)
            ak = tl.load(a_ptr + e * sae + r * sar + offs_k * sak, mask=k_ok, other=0.0).to(tl.float32)
            acc += xk * ak
        return tl.sum(acc, axis=0)

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
        h = _shrink_one(x_ptr, a_ptr, b, e, r, K, sxb, sxk, sae, sar, sak, BLOCK_K)
        tl.store(h_ptr + b * shb + r * shr, h.to(h_ptr.dtype.element_ty))

    @triton.jit
    def _routed_augment_decode_kernel(
        x_ptr, a_ptr, idx_ptr, xa_ptr, K, R, C,
        sxb, sxk, sae, sar, sak, sab,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Program (row b, j): j < R: xa[b, K + e R + j] = x[b] . A[e, j] with e = index[b] (the shrink, written into
        row b's slot); j >= R: a span of BLOCK_C columns of xa [Bsz, C] (C = K + E R), x[b] where they are x's,
        zero in the other experts' slots (row b's own slot is left to the shrink's programs)."""
        b = tl.program_id(0)
        j = tl.program_id(1)
        e = tl.load(idx_ptr + b).to(tl.int64)
        if j < R:
            h = _shrink_one(x_ptr, a_ptr, b, e, j, K, sxb, sxk, sae, sar, sak, BLOCK_K)
            tl.store(xa_ptr + b * sab + K + e * R + j, h.to(xa_ptr.dtype.element_ty))
        else:
            offs = (j - R) * BLOCK_C + tl.arange(0, BLOCK_C)
            xv = tl.load(x_ptr + b * sxb + offs * sxk, mask=offs < K, other=0.0)
            own = (offs >= K + e * R) & (offs < K + (e + 1) * R)
            tl.store(xa_ptr + b * sab + offs, xv.to(xa_ptr.dtype.element_ty), mask=(offs < C) & ~own)

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


if HAVE_TRITON:

    @triton.jit
    def _routed_linear_decode_kernel(
        x_ptr, w_ptr, bias_ptr, h_ptr, bt_ptr, idx_ptr, out_ptr,
        M, K, N, S0, S1,
        sxm, sxk, swn, shm, shr, sbe, sbr, som, son,
        RM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Program (a tile of BLOCK_N output columns, a tile of BLOCK_M rows; one token per row): the base GEMM
        x W^T on the tensor cores, then each row's expert's rank-RM expand of its column's member's part of h.
        W is K-contiguous, Bt N-contiguous; S0, S1: where the second and third members' columns start (N if none)."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            xk = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)  # [BLOCK_M, BLOCK_K]
            wk = tl.load(w_ptr + offs_n[None, :] * swn + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_N]
            if IEEE:
                acc += tl.dot(xk, wk, input_precision="ieee")
            else:
                acc += tl.dot(xk, wk)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        e = tl.load(idx_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        r0 = ((offs_n >= S0).to(tl.int32) + (offs_n >= S1).to(tl.int32)) * RM  # [BLOCK_N] first rank of n's member
        mask = m_ok[:, None] & n_ok[None, :]
        for j in tl.static_range(RM):  # unrolled: the rank's loads are issued together, not one latency each
            hj = tl.load(h_ptr + offs_m[:, None] * shm + (r0[None, :] + j) * shr, mask=mask, other=0.0)
            bj = tl.load(bt_ptr + e[:, None] * sbe + j * sbr + offs_n[None, :], mask=mask, other=0.0)
            acc += hj.to(tl.float32) * bj.to(tl.float32)
        tl.store(out_ptr + offs_m[:, None] * som + offs_n[None, :] * son, acc.to(out_ptr.dtype.element_ty), mask=mask)


def blocked_group(x: Tensor, W: Tensor, bias: Optional[Tensor], A: list[Tensor], B: list[Tensor],
                  scaling: list[Tensor], p: float, sizes: list[int]) -> tuple[Tensor, ...]:
    """The training forward of a group's members at once, rows in E expert-major blocks (block k through expert k).

    x [Bsz, T, K] (Bsz = E b); W [N, K] and bias [N] (or None): the members' base weights stacked (N = sum of
    sizes); per member i: A[i] [E, r, K], B[i] [E, n_i, r], scaling[i] [E]; p: the experts' dropout on the LoRA
    input (a mask per member, as each member's own LoRA draws one). -> each member's output [Bsz, T, n_i], equal to
    base_i(x) + s_i[e] B_i[e] A_i[e] dropout_i(x) on block e.

    One GEMM for the base projections and one batched matmul for every member's shrink; the split and the unbind
    keep each backward to one kernel (a cat, a stack) where slicing would zero-fill per member."""
    m, E = len(A), A[0].shape[0]
    Bsz, T, K = x.shape
    ys = torch.nn.functional.linear(x, W, bias).split(sizes, dim=-1)  # m x [Bsz, T, n_i]
    xb = x.reshape(E, 1, -1, K)  # [E, 1, b*T, K]
    if p > 0:  # each member its own mask: m dropped copies of the blocks
        xb = torch.nn.functional.dropout(xb.expand(E, m, xb.shape[2], K), p, training=True)  # [E, m, bT, K]
    A_all = torch.stack(A, dim=1)  # [E, m, r, K]
    h = torch.matmul(xb, A_all.transpose(-1, -2))  # [E, m, bT, r]
    h = h * torch.stack(scaling, dim=1).view(E, m, 1, 1)
    return tuple(torch.baddbmm(y.reshape(E, -1, n), h_i, B_i.transpose(1, 2)).view(Bsz, T, n)
                 for y, h_i, B_i, n in zip(ys, h.unbind(1), B, sizes))


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(1, n)))))


def routed_lora_triton(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor] = None,
                       split: bool = False) -> Tensor:
    """The Triton kernel behind `routed_lora_torch` (same arguments and result); split: a decode step in the
    split layout (`DECODE_LAYOUT`), else the one-kernel ("fused") layout."""
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


def _shrink_decode(x: Tensor, A: Tensor, index: Tensor) -> Tensor:
    """A decode step's routed shrink, x [Bsz, 1, K], A [E, R, K] -> h [Bsz, R] = x A[index]^T, in the activation
    dtype (as the reference rounds it); the split and merged layouts' first kernel."""
    Bsz, _, K = x.shape
    R = A.shape[1]
    h = torch.empty(Bsz, R, device=x.device, dtype=x.dtype)
    _routed_shrink_decode_kernel[(Bsz, R)](
        x, A, index, h, K, x.stride(0), x.stride(2), *A.stride(), *h.stride(),
        BLOCK_K=min(_pow2_at_least(K, 16), 2048), num_warps=4)
    return h


def augment_triton(x: Tensor, A: Tensor, index: Tensor) -> Tensor:
    """`augment_torch` for a decode step (one token per row) in one kernel: x [Bsz, 1, K] -> xa [Bsz, 1, K + E R]."""
    Bsz, T, K = x.shape
    if T != 1:
        raise ValueError(f"the augmented layout serves decode steps (one token per row), got {T} tokens per row")
    E, R, _ = A.shape
    C = K + E * R
    xa = torch.empty(Bsz, 1, C, device=x.device, dtype=x.dtype)
    BLOCK_C = min(_pow2_at_least(C, 16), 1024)
    _routed_augment_decode_kernel[(Bsz, R + triton.cdiv(C, BLOCK_C))](
        x, A, index, xa, K, R, C, x.stride(0), x.stride(2), *A.stride(), xa.stride(0),
        BLOCK_K=min(_pow2_at_least(K, 16), 2048), BLOCK_C=BLOCK_C, num_warps=4)
    return xa


def _launch_decode_split(x: Tensor, A: Tensor, B: Tensor, index: Tensor, y: Optional[Tensor], out: Tensor) -> Tensor:
    Bsz = x.shape[0]
    _, N, R = B.shape
    h = _shrink_decode(x, A, index)
    R_PAD = _pow2_at_least(R, 1)
    BLOCK_N = 128
    ys = (y.stride(0), y.stride(2)) if y is not None else (0, 0)
    _routed_expand_decode_kernel[(Bsz, triton.cdiv(N, BLOCK_N))](
        h, B, index, y if y is not None else out, out, R, N,
        *h.stride(), *B.stride(), *ys, out.stride(0), out.stride(2),
        HAS_Y=y is not None, R_PAD=R_PAD, BLOCK_N=BLOCK_N, num_warps=4)
    return out


# The merged layout's choices, from bench/tune_merged.py on the H200 (BENCHMARKS.md). A group whose stacked weight
# has at most `max_fused_weight` elements (q/k/v, o on the Qwen2-0.5B shape) runs the Triton GEMM with the expand
# fused, with these launch parameters (a decode step's M = batch rows is small: the grid is spread over columns,
# BLOCK_N of them per program); a larger one (gate/up, down) runs cuBLAS over the stacked weight and the split
# layout's LoRA kernels, which were faster there (the Triton GEMM reached about half cuBLAS's bandwidth).
MERGED_CONFIG = {"max_fused_weight": 2 ** 21, "block_n": 16, "block_k": 128, "num_warps": 4, "num_stages": 3}


def routed_linear_triton(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, Bt: Tensor, index: Tensor,
                         bounds: list[int], config: Optional[dict] = None) -> Tensor:
    """The merged layout's kernels behind `routed_linear_torch` (same arguments and result), one token per row:
    the shrink h = x A[e]^T ([Bsz, R], the split layout's shrink kernel), then the group's GEMM with the expand.
    config: launch parameters over `MERGED_CONFIG` (benchmarks)."""
    Bsz, T, K = x.shape
    if T != 1:
        raise ValueError(f"the merged layout serves decode steps (one token per row), got {T} tokens per row")
    N, RM = W.shape[0], Bt.shape[1]
    if W.stride(1) != 1 or Bt.stride(2) != 1:
        raise ValueError("the merged layout needs W contiguous along K and Bt along N")
    cfg = {**MERGED_CONFIG, **(config or {})}
    h = _shrink_decode(x, A, index)
    out = torch.empty(Bsz, 1, N, device=x.device, dtype=x.dtype)
    BLOCK_M = min(64, _pow2_at_least(Bsz, 16))  # tl.dot needs 16 rows; smaller batches mask the rest
    m_tiles = triton.cdiv(Bsz, BLOCK_M)
    BLOCK_N = cfg["block_n"]
    S0, S1 = ([*bounds, N, N])[:2]
    _routed_linear_decode_kernel[(triton.cdiv(N, BLOCK_N), m_tiles)](
        x, W, bias if bias is not None else W, h, Bt, index, out,
        Bsz, K, N, S0, S1,
        x.stride(0), x.stride(2), W.stride(0), *h.stride(), Bt.stride(0), Bt.stride(1), out.stride(0), out.stride(2),
        RM=RM, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=min(cfg["block_k"], _pow2_at_least(K, 16)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _routed_linear_impl(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, index: Tensor,
                        bounds: list[int], fused_gemm: bool) -> Tensor:
    if fused_gemm:  # B is Bt [E, r, N]
        if x.is_cuda and HAVE_TRITON and x.shape[1] == 1:
            return routed_linear_triton(x, W, bias, A, B, index, bounds)
        return routed_linear_torch(x, W, bias, A, B, index, bounds)
    y = torch.nn.functional.linear(x, W, bias)  # B is the block-diagonal [E, N, R]
    if x.is_cuda and HAVE_TRITON:
        return routed_lora_triton(x, A, B, index, y, split=x.shape[1] == 1)
    return routed_lora_torch(x, A, B, index, y)


@torch.library.custom_op("moa::routed_linear", mutates_args=())
def routed_linear(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, index: Tensor,
                  bounds: list[int], fused_gemm: bool) -> Tensor:
    """One group's whole output in the merged layout, x W^T (+ bias) + each row's routed LoRA. fused_gemm: the Triton
    GEMM with the expand fused, B = Bt [E, r, N] (`routed_linear_torch`); else cuBLAS's GEMM and the split layout's
    kernels, B = the block-diagonal [E, N, R] (`routed_lora_torch`). The torch formulations off CUDA."""
    return _routed_linear_impl(x, W, bias, A, B, index, bounds, fused_gemm)


@routed_linear.register_fake
def _(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, index: Tensor, bounds: list[int],
      fused_gemm: bool) -> Tensor:
    return x.new_empty(*x.shape[:-1], W.shape[0])


def run_linear(x: Tensor, W: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, index: Tensor,
               bounds: list[int], fused_gemm: bool) -> Tensor:
    """`routed_linear` where torch.compile traces, eagerly its body (as `run_group`)."""
    if torch.compiler.is_compiling():
        return routed_linear(x, W, bias, A, B, index, bounds, fused_gemm)
    return _routed_linear_impl(x, W, bias, A, B, index, bounds, fused_gemm)


def _augment_impl(x: Tensor, A: Tensor, index: Tensor) -> Tensor:
    if x.is_cuda and HAVE_TRITON and x.shape[1] == 1:
        return augment_triton(x, A, index)
    return augment_torch(x, A, index)


@torch.library.custom_op("moa::routed_augment", mutates_args=())
def routed_augment(x: Tensor, A: Tensor, index: Tensor) -> Tensor:
    """The augmented layout's input (`augment_torch`): the Triton kernel on CUDA for a decode step, else torch."""
    return _augment_impl(x, A, index)


@routed_augment.register_fake
def _(x: Tensor, A: Tensor, index: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] + A.shape[0] * A.shape[1])


def run_augment(x: Tensor, A: Tensor, index: Tensor) -> Tensor:
    """`routed_augment` where torch.compile traces, eagerly its body (as `run_group`)."""
    if torch.compiler.is_compiling():
        return routed_augment(x, A, index)
    return _augment_impl(x, A, index)


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
    split = DECODE_LAYOUT == "split"
    if torch.compiler.is_compiling():
        return routed_lora(x, A, B, index, y, split)
    return _routed_lora_impl(x, A, B, index, y, split)


# ------------------------------------------------------------------------------------------------ groups
def _keep_address(old: Optional[Tensor], new: Optional[Tensor]) -> Optional[Tensor]:
    """A stacked weight after a refresh: `new`'s values copied into `old` when they fit (same shape, device and
    dtype), so a captured CUDA graph keeps reading the same address; else `new` itself, marked as a static input on
    CUDA (a new address: the compiled step re-captures)."""
    if new is None:
        return None
    if old is not None and old.shape == new.shape and old.device == new.device and old.dtype == new.dtype:
        return old.copy_(new)
    if new.is_cuda:
        torch._dynamo.mark_static_address(new)
    return new


class LoraGroup:
    """Wrapped projections of one layer that read the same input, with their experts stacked for the kernels.

    A [E, R, K], B [E, N, R] (block-diagonal) and Bt [E, r, N] are rebuilt by `refresh()` (outside any compiled
    region) when a member's weights changed, in place where the shapes allow, and marked as static addresses so
    that CUDA graphs neither copy them per replay nor re-record. W [N, K] is the members' base weights stacked for
    the merged layouts and the fused prompt pass: the members' `base.weight` are made views of it (once), so it
    costs no memory; None when a member's base is not a plain nn.Linear. Under the augmented decode layout, Wa
    [N, K + E R] holds W in its first K columns (W and the members' weights are then views of it) and each expert's
    block-diagonal s B after them (`augments`)."""

    def __init__(self, members: list["ExpertMixtureLinear"]) -> None:
        self.members = members
        self.rank_slices: list[slice] = []
        self.out_slices: list[slice] = []
        r0 = n0 = 0
        for m in members:
            self.rank_slices.append(slice(r0, r0 + m.r))
            self.out_slices.append(slice(n0, n0 + m.out_features))
            r0, n0 = r0 + m.r, n0 + m.out_features
        self.bounds = [s.start for s in self.out_slices[1:]]  # where each member's columns start, after the first
        for m, ns in zip(members, self.out_slices):
            m.fused_columns = (ns.start, ns.stop)  # its columns of the group's result (plain ints: cheap guards)
        self.dtype: torch.dtype | None = None  # the stacked weights' (a plain attribute: no tensor guard per member)
        self.A: Tensor | None = None
        self.B: Tensor | None = None
        self.Bt: Tensor | None = None
        self.W: Tensor | None = None
        self.bias: Tensor | None = None
        # [N, K + E R]: W followed by each expert's block-diagonal s B (the augmented layout); W is then a view of its
        # first K columns. None unless that layout is chosen and the group is within AUGMENT_MAX_EXTRA
        self.Wa: Tensor | None = None
        self._key: tuple | None = None
        # (input, index, the group's result [Bsz, T, N], members still to take theirs): the first member called on
        # an input computes the whole group's result (one shrink for q/k/v), the others take their columns
        self.stash: tuple | None = None
        # W [N, K] with one expert's LoRA folded in (`fold`), allocated at the first fold and rewritten in place; the
        # expert it holds, None when it is stale (a refresh: some weight changed)
        self.W_folded: Tensor | None = None
        self.folded_expert: int | None = None
        self._base_key_seen: list | None = None  # `_base_key()` when W was stacked for the blocked training path

    def _weights_key(self) -> tuple:
        """What `refresh` compares: each weight's identity, in-place version and storage. A new dtype, device or
        shape means new storage (`Module.to` and `p.data = ...` both swap it), so those need no entries of their
        own; reading them doubled the cost of the check, which runs on every generate call for every group. The
        weights are read from the modules' parameter and buffer dicts: `Module.__getattr__` took half of the
        check's time (~100 groups x 5 tensors per call)."""
        key = []
        for m in self.members:
            base = m._modules["base"]._parameters  # an nn.Linear's (ExpertMixtureLinear wraps nothing else)
            for p in (m._parameters["lora_A"], m._parameters["lora_B"], m._buffers["scaling"], base["weight"],
                      base.get("bias")):
                key.append(None if p is None else (id(p), p._version, p.data_ptr()))
        return tuple(key)

    def _augment_columns(self, E: int) -> int:
        """E R, the columns the augmented layout appends to W for E experts, when this group takes that layout
        (`DECODE_LAYOUT`, `AUGMENT_MAX_EXTRA`); else 0."""
        extra = E * self.rank_slices[-1].stop
        return extra if DECODE_LAYOUT == "augmented" and extra * self.out_slices[-1].stop <= AUGMENT_MAX_EXTRA else 0

    def augments(self) -> bool:
        """Whether a decode step runs this group in the augmented layout (Wa built, the layout chosen, within reach).
        Read where torch.compile traces: the layout and the reach are guards of the compiled step."""
        return self.Wa is not None and self._augment_columns(self.A.shape[0]) > 0  # A and Wa are rebuilt together

    def refresh(self) -> None:
        """Rebuild the stacked weights when a member's changed, or when the augmented layout wants Wa and there is
        none. Wa stays while another layout runs (a switch back replays the graphs captured over it); a rebuild under
        another layout drops it, since its experts' columns would be stale. (No no_grad decorator: entering and
        leaving it was a third of the check's host time, paid per group on every generate call; the rebuild has
        its own.)"""
        key = self._weights_key()
        if key == self._key and (self.Wa is not None or self.W is None  # (None: the bases cannot be stacked)
                                 or not self._augment_columns(self.A.shape[0])):
            return
        # normal tensors, which a later refresh outside inference mode may write (inference_mode(False) alone would
        # turn autograd back on)
        with torch.inference_mode(False), torch.no_grad():
            self._rebuild()

    def _rebuild(self) -> None:
        ms = self.members
        A = torch.cat([m.lora_A for m in ms], dim=1)  # [E, R, K]
        E = A.shape[0]
        scaled = [m.lora_B * m.scaling.view(-1, 1, 1) for m in ms]  # each member's s B [E, d_out, r]
        B = A.new_zeros(E, self.out_slices[-1].stop, self.rank_slices[-1].stop)  # [E, N, R]
        for sb, rs, ns in zip(scaled, self.rank_slices, self.out_slices):
            B[:, ns, rs] = sb
        same_rank = len({m.r for m in ms}) == 1
        Bt = torch.cat([sb.transpose(1, 2) for sb in scaled], dim=2).contiguous() if same_rank else None  # [E, r, N]
        self.A, self.B, self.Bt = _keep_address(self.A, A), _keep_address(self.B, B), _keep_address(self.Bt, Bt)
        self._merge_base_weights(augment=True)
        self.dtype = A.dtype
        self.stash = None
        self.folded_expert = None
        self._key = self._weights_key()

    def _merge_base_weights(self, augment: bool = False) -> None:
        """W [N, K] and bias [N] for the group's one base GEMM (see the class). Several members: their weights are
        copied once into one tensor and each member's `base.weight` becomes a view of its rows (same values, no
        second copy); their biases are stacked into a copy (zeros for a member without one). augment (a refresh for
        the augmented layout, B rebuilt): that tensor is Wa [N, K + E R] instead, W its first K columns, and B's
        current values are written into the rest."""
        ms = self.members
        if any(type(m.base) is not nn.Linear or m.base.weight.stride(1) != 1 for m in ms) \
                or len({(m.base.weight.device, m.base.weight.dtype) for m in ms}) != 1:
            self.W = self.bias = self.Wa = None
            return
        weights = [m.base.weight for m in ms]
        extra = self._augment_columns(self.A.shape[0]) if augment else 0
        if extra:
            N, K = self.out_slices[-1].stop, weights[0].shape[1]
            if not (self.Wa is not None and self.Wa.shape == (N, K + extra) and self._members_view(self.Wa)):
                with torch.inference_mode(False):
                    Wa = torch.empty(N, K + extra, device=weights[0].device, dtype=weights[0].dtype)
                    for m, w, ns in zip(ms, weights, self.out_slices):
                        Wa[ns, :K] = w.detach()
                        m.base.weight = nn.Parameter(Wa[ns, :K], requires_grad=w.requires_grad)
                self.Wa = Wa
            self.Wa[:, K:] = self.B.permute(1, 0, 2).reshape(N, extra)  # [N, E R]: expert e's s B in columns e R...
            self.W = self.Wa[:, :K]
            if self.Wa.is_cuda:
                torch._dynamo.mark_static_address(self.Wa)
        elif len(ms) == 1:
            self.W = weights[0]
        elif not (self.W is not None and self.W.device == weights[0].device and self.W.dtype == weights[0].dtype
                  and self._members_view(self.W)):
            with torch.inference_mode(False):  # normal tensors: the model may train or be versioned later
                self.W = torch.cat([w.detach() for w in weights])
                for m, w, ns in zip(ms, weights, self.out_slices):
                    m.base.weight = nn.Parameter(self.W[ns], requires_grad=w.requires_grad)
        if augment and not extra:
            self.Wa = None  # the members' weights may stay views of it (W too): their memory, not a second copy
        bias = torch.cat([m.base.bias.detach() if m.base.bias is not None else self.W.new_zeros(m.out_features)
                          for m in ms]) if any(m.base.bias is not None for m in ms) else None
        self.bias = _keep_address(self.bias, bias)
        if self.W.is_cuda:
            torch._dynamo.mark_static_address(self.W)

    def _members_view(self, W: Tensor) -> bool:
        """Whether every member's base weight is (still) the view of its rows of W (W [N, K], or Wa's first K
        columns)."""
        K = self.members[0].base.weight.shape[1]
        for m, ns in zip(self.members, self.out_slices):
            w, rows = m.base.weight, W[ns, :K]
            if w.data_ptr() != rows.data_ptr() or w.shape != rows.shape or w.stride() != rows.stride():
                return False
        return True

    def _shared(self, x: Tensor, index: Optional[Tensor], compute):
        """The group's result on input x, computed (`compute()`) by the first member called, kept for the others."""
        st = self.stash
        if st is not None and st[0] is x and st[1] is index:
            full = st[2]
            self.stash = None if st[3] == 1 else (x, index, full, st[3] - 1)
        else:
            full = compute()
            self.stash = (x, index, full, len(self.members) - 1)
        return full

    def _member_part(self, member: "ExpertMixtureLinear", x: Tensor, index: Optional[Tensor], compute) -> Tensor:
        """member's columns of the group's result on input x (see `_shared`)."""
        start, stop = member.fused_columns
        return self._shared(x, index, compute)[..., start:stop]

    def trains_blocked(self) -> bool:
        """Whether a training step in expert-major blocks may run this group's members together (`blocked`): two
        or more members over stacked base weights, with one rank and one dropout rate."""
        ms = self.members
        return (len(ms) > 1 and self.W is not None and len({m.r for m in ms}) == 1
                and len({_dropout_p(m) for m in ms}) == 1)

    def blocked(self, member: "ExpertMixtureLinear", x: Tensor, index: Tensor) -> Tensor:
        """member's output in a training step whose rows are in expert-major blocks (`blocked_group`, computed once
        for the group by the first member called on x); x [Bsz, T, K] -> [Bsz, T, d_out]."""
        ms = self.members

        def compute() -> tuple[Tensor, ...]:
            p = _dropout_p(ms[0]) if ms[0].training else 0.0
            return blocked_group(x, self.W, self.bias, [m._expert_A() for m in ms], [m.lora_B for m in ms],
                                 [m.scaling for m in ms], p, [m.out_features for m in ms])
        return self._shared(x, index, compute)[ms.index(member)]

    def _base_key(self) -> list:
        """What `stack_base` compares: each member's base weight and bias, by address and in-place version."""
        return [(b.weight.data_ptr(), b.weight._version,
                 None if b.bias is None else (b.bias.data_ptr(), b.bias._version)) for b in (m.base for m in self.members)]

    def stack_base(self) -> None:
        """Make sure W and bias stack the members' current base weights and biases (after a move to another device
        or dtype, or a bias loaded in place, too); a check of their addresses and versions when they do."""
        if len(self.members) > 1 and (self.W is None or self._base_key_seen != self._base_key()):
            with torch.no_grad():
                self._merge_base_weights()
            self._base_key_seen = self._base_key() if self.W is not None else None

    def release_if_stale(self) -> None:
        """Drop the stacked copies (W, Wa, bias, A, B, Bt, the folded weights) once the members' tensors they copy have
        moved or changed (`Module.to`, a cast): stale, they would hold their old memory until the next refresh. The
        members' weights keep W's storage alive where they are still views of it; the next forward that needs the
        copies makes them anew."""
        stale = ((self._key is not None and self._key != self._weights_key())
                 or (self._base_key_seen is not None and self._base_key_seen != self._base_key())
                 or (self.W is not None and not self._members_view(self.W)))
        if stale:
            self.A = self.B = self.Bt = self.W = self.Wa = self.bias = self.W_folded = None
            self.folded_expert = self._key = self._base_key_seen = self.dtype = None
            self.stash = None

    def apply(self, member: "ExpertMixtureLinear", x: Tensor, index: Tensor, y: Tensor) -> Tensor:
        """member's y + its LoRA delta; x [Bsz, T, K], index [Bsz], y [Bsz, T, d_out]."""
        if len(self.members) == 1:
            return run_group(x, self.A, self.B, index, y)
        return y + self._member_part(member, x, index, lambda: run_group(x, self.A, self.B, index, None))

    def takes_whole(self, x: Tensor) -> bool:
        """Whether member calls on x go to `whole`, skipping their base linear: the merged and augmented layouts (a
        decode step under DECODE_LAYOUT, a prompt pass under PROMPT_LAYOUT), and a prompt pass in the fused layout of a group
        of several members over stacked base weights."""
        if self.W is None:
            return False
        if x.shape[1] == 1:
            return self.augments() or (DECODE_LAYOUT in ("merged", "augmented") and self.Bt is not None)
        if PROMPT_LAYOUT == "merged":
            return self.Bt is not None
        return len(self.members) > 1

    def whole(self, member: "ExpertMixtureLinear", x: Tensor, index: Tensor) -> Tensor:
        """member's whole output, base and LoRA delta (see `takes_whole`); x [Bsz, T, K], index [Bsz]. Only the
        tensors the chosen path reads enter the compiled graph (each one is a guard checked on every decode step)."""
        def compute() -> Tensor:
            if x.shape[1] > 1:
                if PROMPT_LAYOUT == "merged":
                    return merged_prompt(x, self.W, self.bias, self.A, self.Bt, index, self.bounds)
                # fused: the group's one base GEMM, then the group kernel adds the delta as it copies
                return run_group(x, self.A, self.B, index, torch.nn.functional.linear(x, self.W, self.bias))
            if self.augments():  # one cuBLAS GEMM over [x | the routed shrink in the row's expert's slot]
                return torch.nn.functional.linear(run_augment(x, self.A, index), self.Wa, self.bias)
            fused_gemm = self.W.numel() <= MERGED_CONFIG["max_fused_weight"]
            return run_linear(x, self.W, self.bias, self.A, self.Bt if fused_gemm else self.B, index, self.bounds,
                              fused_gemm)
        if len(self.members) == 1:
            return compute()
        return self._member_part(member, x, index, compute)

    @torch.no_grad()
    def fold(self, e: int) -> None:
        """W_folded = W + B_bd[e] A[e]: the group's base weights with expert e's LoRA added, every member's s B A in
        its own rows (B is block-diagonal), summed in fp32 and rounded once. In place, so that a captured step keeps
        its address; nothing to do while it already holds e and no weight changed since (`refresh`)."""
        if self.folded_expert == e:
            return
        folded = torch.addmm(self.W.float(), self.B[e].float(), self.A[e].float()).to(self.W.dtype)  # [N,R] @ [R,K]
        if self.W_folded is None or (self.W_folded.shape, self.W_folded.device, self.W_folded.dtype) != (
                folded.shape, folded.device, folded.dtype):
            with torch.inference_mode(False):  # a normal tensor, written in place by later folds
                self.W_folded = folded.clone()
            if self.W_folded.is_cuda:
                torch._dynamo.mark_static_address(self.W_folded)
        else:
            self.W_folded.copy_(folded)
        self.folded_expert = e

    def folded(self, member: "ExpertMixtureLinear", x: Tensor) -> Tensor:
        """member's output with the folded expert's LoRA in its weights (`fold`): the group's one GEMM, x [Bsz, T, K]
        -> [Bsz, T, d_out], no LoRA kernel at all."""
        def compute() -> Tensor:
            return torch.nn.functional.linear(x, self.W_folded, self.bias)
        if len(self.members) == 1:
            return compute()
        return self._member_part(member, x, None, compute)


def _dropout_p(m: "ExpertMixtureLinear") -> float:
    return m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0


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

    def foldable(self, wrapped: int) -> bool:
        """Whether `fold` can stand in for all `wrapped` projections of the model: every one is in a group whose base
        weights are stacked (plain nn.Linear) and whose experts share a rank. Call after `ready()`."""
        return (sum(len(g.members) for g in self.groups) == wrapped
                and all(g.W is not None and g.Bt is not None for g in self.groups))

    def release_stale(self) -> None:
        """Every group's stale stacked copies dropped (`LoraGroup.release_if_stale`)."""
        for g in self.groups:
            g.release_if_stale()

    def stack_bases(self) -> None:
        """Every group's base weights stacked (`LoraGroup.stack_base`), for the blocked training path."""
        for g in self.groups:
            g.stack_base()

    def unfold(self) -> None:
        """Free the folded weights (`fold` makes them again when next asked)."""
        for g in self.groups:
            g.W_folded = g.folded_expert = None

    def fold(self, e: int) -> list[Tensor]:
        """Expert e's LoRA folded into a copy of every group's base weights (`LoraGroup.fold`), for forwards where
        every row uses e (the merged weights of a single adapter: the base model's GEMMs, no LoRA kernels) ->
        the folded weights, whose addresses a captured step reads. Costs one more copy of the wrapped projections'
        weights, kept."""
        for g in self.groups:
            g.fold(e)
        return [g.W_folded for g in self.groups]
