"""Guards dynamo checks before every call of the compiled decode step: the base model against MoA (the fused path in
a decode layout), counted by kind. Each guard costs host time on every generated token (BENCHMARKS.md), and on a
GPU that time is not hidden behind the CUDA graph's replay.

One greedy generate call per model with HF's static cache and a compile config (inductor's default mode, so that it
runs on the CPU too) is run in a child process with TORCH_LOGS=guards; the last guard tree it prints is the decode
step's (the routing pass, if compiled, comes first). The counts are deterministic for a given torch version.

Example:  python bench/count_guards.py --shape tiny24 --layout merged
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

KINDS = ("TENSOR_MATCH", "TYPE_MATCH", "ID_MATCH", "EQUALS_MATCH", "NONE_MATCH", "NO_TENSOR_ALIASING")


def child(shape: str, which: str, layout: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _common import SHAPES, build_base
    from bench_inference import build_moa, build_peft, domain_prompts, fit_routers
    from transformers import CompileConfig

    from moa_core import lora_kernels

    torch.set_num_threads(1)
    base = build_base(shape, torch.device("cpu"), torch.float32, seed=0)
    B, P, n = 4, 8, 4
    ids = domain_prompts(B, P, n, SHAPES[shape]["vocab_size"], torch.device("cpu"))
    mask = torch.ones_like(ids)
    cc = CompileConfig(mode="default", fullgraph=True)
    cc._compile_all_devices = True
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static",
               compile_config=cc)
    if which == "base":
        with torch.inference_mode():
            base.generate(input_ids=ids, attention_mask=mask, **gen)
        return
    mm = build_moa(base, build_peft(base, n, seed=n), n, seed=n)
    fit_routers(mm, ids, mask, torch.arange(B) % n, 40)  # rows whose layers agree: no re-run, no recompile
    mm.lora_fusion.enabled = True  # the fused path's torch formulation: the same Python, so the same guards
    lora_kernels.DECODE_LAYOUT = layout
    with torch.inference_mode():
        mm.generate(ids, mask, **gen)


def count(shape: str, which: str, layout: str) -> Counter:
    env = {**os.environ, "TORCH_LOGS": "guards"}
    out = subprocess.run([sys.executable, __file__, "--child", which, "--shape", shape, "--layout", layout],
                         env=env, capture_output=True, text=True, check=True)
    last = out.stderr.split("TREE_GUARD_MANAGER")[-1]
    return Counter(re.findall("|".join(KINDS) + "|GuardManager", last))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny24")
    ap.add_argument("--layout", default="merged", choices=("fused", "split", "merged"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.shape, args.child, args.layout)
        return 0
    counts = {which: count(args.shape, which, args.layout) for which in ("base", "moa")}
    print(f"guards of the compiled decode step, shape {args.shape}, MoA layout {args.layout}:")
    for kind in ("GuardManager", *KINDS):
        print(f"  {kind:20s} base {counts['base'][kind]:6d}   moa {counts['moa'][kind]:6d}")
    print(f"  {'all':20s} base {sum(counts['base'].values()):6d}   moa {sum(counts['moa'].values()):6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
