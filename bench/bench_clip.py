"""What the per-expert gradient clip costs per training step, against PEFT's clip_grad_norm_.

The gradients are those of one MoA pass (moa_core's stacked adapters: per layer and projection A [E, r, d_in] and
B [E, d_out, r], random values) of a model shape; the clip runs on them as train_mixture runs it after the
backward. Variants (each call synchronised; per round, --calls calls of each variant, interleaved; the figure is
the median over --repeats rounds of each round's median, with [min-max] over the rounds):
- `concat`: moa_core.train.clip_grads_per_expert as on an accelerator (one concatenation, one norm, one
  multi-tensor multiply); `loop`: as on the CPU (the norms per gradient, where each lies).
- `per_slice`: the form it replaced (until 2026-12-05): the gradients unbound into E x n expert slices, one
  multi-tensor norm and one multi-tensor multiply per expert. Kept here as the reference of that change.
- `peft`: torch.nn.utils.clip_grad_norm_ over the same gradients as one group (one PEFT job's clip has the same
  number of tensors, each E times smaller): the cost of a clip that ignores the experts.
The step this belongs to is host-bound on an accelerator (BENCHMARKS.md), so the wall time of a call is the figure.

Example:  python bench/bench_clip.py --shape qwen0.5b --device cuda --experts 8
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LORA_R, SHAPES, TARGETS, machine_info, one_shape_args, pick_device, pick_dtype, sync, write_json  # noqa: E402,I001

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from moa_core.train import clip_grads_per_expert  # noqa: E402


def stacked_grads(shape: str, E: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """Parameters with random gradients shaped as a mixture's stacked adapters of `shape` (r = LORA_R)."""
    s = SHAPES[shape]
    d, ff = s["hidden_size"], s["intermediate_size"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    io = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d), "gate_proj": (d, ff),
          "up_proj": (d, ff), "down_proj": (ff, d)}
    params = []
    for _ in range(s["num_hidden_layers"]):
        for t in TARGETS:
            d_in, d_out = io[t]
            for shp in ((E, LORA_R, d_in), (E, d_out, LORA_R)):
                p = torch.nn.Parameter(torch.zeros(shp, device=device, dtype=dtype))
                p.grad = torch.randn(shp, device=device, dtype=dtype)
                params.append(p)
    return params


def clip_per_slice(stacked: list[Tensor], max_norm: float, shares: Tensor) -> None:
    """The per-expert clip as it was before 2026-12-05 (multi-tensor ops over each expert's slices)."""
    grads = [p.grad for p in stacked]
    slices = [list(mine) for mine in zip(*(g.unbind(0) for g in grads))]  # [E][n]
    sq = torch.stack([torch.stack(torch._foreach_norm(mine, 2, dtype=torch.float32)).square().sum() for mine in slices])
    shares = shares.to(grads[0].device, torch.float32)
    own = sq.sqrt() / shares.clamp(min=1e-12)
    scale = torch.where(shares > 0, (max_norm / (own + 1e-6)).clamp(max=1.0) / shares.clamp(min=1e-12), 1.0)
    for mine, s in zip(slices, scale.to(grads[0].dtype).unbind(0)):
        torch._foreach_mul_(mine, s)


def main(argv: list[str] | None = None) -> int:
    ap = one_shape_args(__doc__, experts=8)
    ap.add_argument("--repeats", default=5, type=int, help="interleaved rounds")
    ap.add_argument("--calls", default=20, type=int, help="timed calls of each variant per round")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    stacked = stacked_grads(args.shape, args.experts, device, dtype)
    shares = torch.full((args.experts,), 1.0 / args.experts, device=device)
    variants = {"concat": lambda: clip_grads_per_expert(stacked, [], 1.0, shares, concat=True),
                "loop": lambda: clip_grads_per_expert(stacked, [], 1.0, shares, concat=False),
                "per_slice": lambda: clip_per_slice(stacked, 1.0, shares),
                "peft": lambda: torch.nn.utils.clip_grad_norm_(stacked, 1.0)}
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    for name, fn in variants.items():  # warm-up (allocator, kernels)
        for _ in range(3):
            fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times = []
            for _ in range(args.calls):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            per_round[name].append(statistics.median(times))
    print(f"per-expert gradient clip, {args.shape}, {args.experts} experts, {len(stacked)} stacked gradients, {dtype}, "
          f"{device}: ms per call, median of {args.repeats} interleaved rounds [min-max]")
    results = []
    for name, xs in per_round.items():
        med = statistics.median(xs)
        print(f"  {name:10s} {med:7.3f} [{min(xs):.3f}-{max(xs):.3f}]")
        results.append({"variant": name, "ms_median": med, "ms_min": min(xs), "ms_max": max(xs), "rounds": xs})
    write_json(args.json, {"benchmark": "clip", "shape": args.shape, "experts": args.experts, "dtype": str(dtype),
                           "tensors": len(stacked), "machine": machine_info(device), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
