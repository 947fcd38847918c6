"""Where one training step spends its host and GPU time: MoA's one pass in expert-major blocks (bench_training's
`moa`) against one PEFT job given the same rows (`peft_one`), both eager, as bench_training.py runs them.

Per variant: after --warmup steps (kernels, cuBLAS handles, the stacked base weights), --steps steps of
`moa_core.train.train_loop` (forward, backward, gradient clip, AdamW) run under torch.profiler (CPU and CUDA
activities). Printed per variant: wall ms per step, GPU kernel ms per step (sum of kernel durations: the GPU's busy
time when one stream runs), kernels per step, and the GPU's busy share; then the top host-side operators by self CPU
time and the top kernels by GPU time. A wall time far above the GPU time means the step waits on the host; equal
GPU times with unequal walls put the gap in host work.

Example:  python bench/profile_training.py --shape qwen0.5b --device cuda --experts 8 --batch 8 --seq-len 128
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clone, machine_info, one_shape_args, setup_shape, sync, write_json  # noqa: E402,I001
from bench_training import make_rows, moa_batches, moa_clip, moa_pass, peft_job, run_loop  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

VARIANTS = ("moa", "peft_one")


def setup(v: str, base: torch.nn.Module, n: int):
    """-> (trainable params, step_fn, clip or None) of bench_training's variant `v` on a fresh copy of `base`."""
    if v == "moa":
        mm, params, step_fn = moa_pass(clone(base), base, n)
        return params, step_fn, moa_clip(mm, params)
    _, params, step_fn = peft_job(clone(base))
    return params, step_fn, None


def main(argv: list[str] | None = None) -> int:
    ap = one_shape_args(__doc__, experts=8)
    ap.add_argument("--batch", type=int, default=8, help="rows per expert per step (MoA's step: experts x batch rows)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="unprofiled steps per variant before them")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda t: t.split(","))
    ap.add_argument("--top", default=15, type=int, help="rows of each operator table (0: none)")
    args = ap.parse_args(argv)
    if unknown := set(args.variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    device, dtype, base, V = setup_shape(args)
    n, S = args.experts, args.warmup + args.steps
    batches = moa_batches(make_rows(n, S * args.batch, args.seq_len, V, device), S, args.batch, device)
    records = []
    for v in args.variants:
        params, step_fn, clip = setup(v, base, n)
        rows = batches if v == "moa" else [{k: t for k, t in b.items() if k != "expert"} for b in batches]
        run_loop(params, rows[:args.warmup], step_fn, args.lr, clip=clip)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            res = run_loop(params, rows[args.warmup:], step_fn, args.lr, clip=clip)
            sync(device)
            wall = (time.perf_counter() - t0) * 1e3 / args.steps
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.device_time for e in kernels) / 1e3 / args.steps
        rec = {"variant": v, "wall_ms_per_step": wall, "gpu_kernel_ms_per_step": gpu,
               "kernels_per_step": len(kernels) / args.steps, "gpu_busy": gpu / wall, "tokens": res.tokens}
        records.append(rec)
        print(f"{v}: wall {wall:.1f} ms/step, GPU kernels {gpu:.1f} ms/step ({gpu / wall:.0%} busy), "
              f"{len(kernels) / args.steps:.0f} kernels/step", flush=True)
        if args.top:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
            if kernels:
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.top))
        del params, step_fn, clip, prof
    write_json(args.json, {"benchmark": "profile_training", "shape": args.shape, "experts": n, "batch": args.batch,
                           "seq_len": args.seq_len, "steps": args.steps, "machine": machine_info(device),
                           "results": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
