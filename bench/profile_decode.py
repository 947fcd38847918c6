"""Where compiled MoA generation spends its time against the base model: kernels launched and GPU busy time.

For the base model and moa_core's MoA (expert per row given, and routed) on one mixed-domain batch, one
warmed-up greedy `generate` with HF's static cache and its automatic torch.compile of the decode step is
run under torch.profiler. Compile mode `default` (no CUDA graphs), so that every kernel is visible to the
profiler; the wall times of the CUDA-graph mode are bench_inference.py's `*_c` variants.

Printed per variant: wall ms, kernels launched, GPU busy ms (sum of kernel durations), and the same per
generated token; then the ratios against the base. If MoA's extra kernels cost far more wall time than
their GPU busy time, the decode step is bound by kernel count (launch latency), not by the LoRA math.

Example:  python bench/profile_decode.py --shape qwen0.5b --device cuda --experts 8
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, run_shapes, setup_shape, shape_args, timed  # noqa: E402,I001
from bench_inference import build_moa, build_peft, domain_prompts, fit_routers, generation_args  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def run_shape(args) -> dict:
    device, dtype, base, V = setup_shape(args)
    from transformers import CompileConfig

    n, B, P, G = args.experts[0], args.batch, args.prompt_len, args.new_tokens
    rows = torch.arange(B, device=device) % n
    ids, mask = domain_prompts(B, P, n, V, device), torch.ones(B, P, dtype=torch.long, device=device)
    mm = build_moa(base, build_peft(base, n, seed=n), n, seed=n)
    routing = fit_routers(mm, ids, mask, rows, 60)
    cc = CompileConfig(mode="default", fullgraph=True)
    cc._compile_all_devices = True
    gen = dict(max_new_tokens=G, min_new_tokens=G, do_sample=False, pad_token_id=0, cache_implementation="static",
               compile_config=cc)
    calls = {
        "base": lambda: base.generate(input_ids=ids, attention_mask=mask, **gen),
        "moa_forced": lambda: mm.generate(ids, mask, expert=rows, **gen)[0],
        "moa": lambda: mm.generate(ids, mask, **gen)[0],
    }
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict[str, dict] = {}
    for name, fn in calls.items():
        with torch.inference_mode():
            for _ in range(2):  # compile, then one more so no first-launch cost is profiled
                timed(fn, device)
            wall, _ = timed(fn, device)
            with profile(activities=acts) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"] if device.type == "cuda" else []
        names = Counter(e.name for e in kernels)
        out[name] = {"wall_ms": wall * 1e3, "kernels": len(kernels),
                     "gpu_busy_ms": sum(e.device_time for e in kernels) / 1e3,
                     "top_kernels": names.most_common(8)}
        print(f"  {name}: {out[name]['wall_ms']:.1f} ms, {len(kernels)} kernels", file=sys.stderr, flush=True)
    return {"shape": args.shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "experts": n,
            "batch": B, "prompt_len": P, "new_tokens": G, **routing, "results": out}


def render(p: dict) -> str:
    r, G = p["results"], p["new_tokens"]
    head = (f"### Profile: shape `{p['shape']}`, {p['device']} {p['dtype']}, {p['experts']} experts, batch {p['batch']}, "
            f"prompt {p['prompt_len']}, {G} new tokens, compiled decode (no CUDA graphs)\n")
    rows = [[v, d["wall_ms"], d["kernels"], d["gpu_busy_ms"], d["kernels"] / G, d["gpu_busy_ms"] / G,
             d["wall_ms"] / r["base"]["wall_ms"], d["kernels"] / max(1, r["base"]["kernels"]),
             d["gpu_busy_ms"] / max(1e-9, r["base"]["gpu_busy_ms"])] for v, d in r.items()]
    table = markdown_table(["variant", "wall ms", "kernels", "GPU busy ms", "kernels/token", "GPU ms/token",
                            "wall / base", "kernels / base", "GPU busy / base"], rows)
    tops = "\n".join(f"- {v}: " + ", ".join(f"{k[:60]} x{c}" for k, c in d["top_kernels"]) for v, d in r.items())
    return head + "\n" + table + "\n\nMost launched kernels:\n" + tops + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = generation_args(shape_args(__doc__, experts="8"))
    return run_shapes(ap.parse_args(argv), "profile", run_shape, render)


if __name__ == "__main__":
    raise SystemExit(main())
