"""Where a training step's time goes: one MoA pass (N experts, N x --batch mixed rows) against one PEFT job given
the same rows (bench_training.py's `moa` and `peft_one`), under torch.profiler.

After --warmup steps, --steps steps of each variant run under the profiler (CPU and CUDA activities), the variants
one after the other. Printed per variant: wall ms per step (synchronised), GPU busy ms per step (the sum of kernel
durations: a wall time far above it means the step waits on the host), kernels per step, host-side aten operators
per step, then the top host-side operators by self CPU time (where a host-bound step's time goes) and the top
kernels by GPU time. The step is bench_training's: forward with labels (HF's loss), backward,
gradient clipping, AdamW (moa_core.train.train_loop's order).

Example:  python bench/profile_training.py --shape qwen0.5b --device cuda --experts 8 --batch 8 --seq-len 128
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: I001
    SHAPES, build_base, clone, machine_info, one_shape_args, pick_device, pick_dtype, sync, write_json,  # noqa: E402
)
from bench_training import make_rows, moa_batches, moa_clip, moa_pass, peft_job  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = one_shape_args(__doc__, experts=8)
    ap.add_argument("--batch", default=8, type=int, help="rows per expert per step")
    ap.add_argument("--seq-len", default=128, type=int)
    ap.add_argument("--warmup", default=3, type=int)
    ap.add_argument("--steps", default=3, type=int, help="profiled steps per variant")
    ap.add_argument("--variants", default="moa,peft_one", type=lambda s: s.split(","))
    ap.add_argument("--top", default=12, type=int, help="rows of the host-operator and kernel tables (0: none)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.variants) - {"moa", "peft_one"}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}: choose from moa, peft_one")
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    base = build_base(args.shape, device, dtype, seed=0)
    N, B, T = args.experts, args.batch, args.seq_len
    n_steps = args.warmup + args.steps
    batches = moa_batches(make_rows(N, n_steps * B, T, SHAPES[args.shape]["vocab_size"], device), n_steps, B, device)
    records = []
    for name in args.variants:
        if name == "moa":
            model, params, step_fn = moa_pass(clone(base), base, N)
            clip = moa_clip(model, params)
        else:
            model, params, step_fn = peft_job(clone(base))
            clip = lambda b, ps=list(params.values()): torch.nn.utils.clip_grad_norm_(ps, 1.0)  # noqa: E731
        opt = torch.optim.AdamW(list(params.values()), lr=1e-4)

        def step(b: dict) -> None:
            loss, _ = step_fn(b if name == "moa" else {k: v for k, v in b.items() if k != "expert"})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip(b)
            opt.step()

        for b in batches[: args.warmup]:
            step(b)
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for b in batches[args.warmup:]:
                step(b)
            sync(device)
            wall = (time.perf_counter() - t0) * 1e3 / args.steps
        events = prof.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.device_time for e in kernels) / 1e3 / args.steps
        aten = sum(1 for e in events if e.name.startswith("aten::") and e.device_type == torch.autograd.DeviceType.CPU)
        print(f"{name}: wall {wall:.1f} ms/step, GPU busy {gpu:.1f} ms/step ({gpu / wall:.0%}), "
              f"{len(kernels) / args.steps:.0f} kernels/step, {aten / args.steps:.0f} aten calls/step (nested calls "
              f"counted)", flush=True)
        records.append({"variant": name, "wall_ms_per_step": wall, "gpu_busy_ms_per_step": gpu,
                        "kernels_per_step": len(kernels) / args.steps, "aten_ops_per_step": aten / args.steps,
                        "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None})
        if args.top:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        if args.top and device.type == "cuda":
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))
        del model, params, opt, prof
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    write_json(args.json, {"benchmark": "profile_training", "shape": args.shape, "experts": N, "batch": B,
                           "seq_len": T, "machine": machine_info(device), "results": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
