"""GPU time of one projection group of a decode step, per kernel choice: what the merged layout's launch
configuration should be, and where a layout's time goes (cuBLAS base GEMMs, the shrink, the group GEMM).

For each group of the Qwen2-0.5B shape (q/k/v: 896 -> 896+128+128; gate/up: 896 -> 2 x 4864; o: 896 -> 896;
down: 4864 -> 896), E experts of rank r, and each batch (one token per row), times:

  cublas       the members' base projections as HF runs them (one F.linear per member);
  cublas_cat   one F.linear over the members' weights stacked (what merging q/k/v gives cuBLAS);
  shrink       the routed shrink kernel alone (h = x A[e]^T, the split and merged layouts' first kernel);
  split        cublas + the split layout's routed LoRA (shrink, expand adding into the base output);
  cat_split    cublas_cat + the split layout's routed LoRA;
  merged:<cfg> the merged layout (shrink + one GEMM with the routed expand) with launch configuration cfg.

Each figure is the GPU time of one call: a CUDA graph of 24 dependent-free calls (the 24 layers) replayed
--replays times per sample, median [min-max] over --rounds interleaved rounds, divided by 24. CUDA only.

Example:  python bench/tune_merged.py --batch 1,8,32 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, parse_int_list, write_json  # noqa: E402,I001

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moa_core import lora_kernels as lk  # noqa: E402

GROUPS = {"qkv": (896, (896, 128, 128)), "gate_up": (896, (4864, 4864)), "o": (896, (896,)), "down": (4864, (896,))}
CALLS = 24


def configs(sweep: str) -> list[dict]:
    """'block_n=16|32|64,block_k=64|128|256,num_warps=4,num_stages=3|5' -> every combination."""
    keys, values = [], []
    for kv in sweep.split(","):
        k, v = kv.split("=")
        keys.append(k)
        values.append([int(x) for x in v.split("|")])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def graphed(fn) -> torch.cuda.CUDAGraph:
    fn()  # warm-up: Triton JIT
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    return g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,32", type=parse_int_list)
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--experts", default=8, type=int)
    ap.add_argument("--r", default=8, type=int)
    ap.add_argument("--sweep", default="block_n=16|32|64,block_k=64|128|256,num_warps=2|4,num_stages=3")
    ap.add_argument("--rounds", default=5, type=int)
    ap.add_argument("--replays", default=10, type=int)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() and lk.HAVE_TRITON):
        ap.error("needs a CUDA device and triton (it times the Triton kernels under CUDA graphs); on the CPU, "
                 "bench/bench_lora_kernel.py --device cpu checks the layouts' code paths")
    dev, dt = torch.device("cuda"), torch.bfloat16
    sweep = configs(args.sweep)
    results = []
    for name in args.groups.split(","):
        K, outs = GROUPS[name]
        N, E, r = sum(outs), args.experts, args.r
        R = r * len(outs)
        torch.manual_seed(0)
        Ws = [torch.randn(n, K, device=dev, dtype=dt) / K ** 0.5 for n in outs]
        W = torch.cat(Ws)
        A = torch.randn(E, R, K, device=dev, dtype=dt) / K ** 0.5
        Bt = torch.randn(E, r, N, device=dev, dtype=dt) * 0.02
        Bbd = torch.zeros(E, N, R, device=dev, dtype=dt)
        edges = [0, *torch.tensor(outs).cumsum(0).tolist()]
        for m in range(len(outs)):
            Bbd[:, edges[m]:edges[m + 1], m * r:(m + 1) * r] = Bt[:, :, edges[m]:edges[m + 1]].transpose(1, 2)
        bounds = edges[1:-1]
        for B in args.batch:
            x = torch.randn(B, 1, K, device=dev, dtype=dt)
            index = torch.arange(B, device=dev) % E

            def shrink():
                return lk._shrink_decode(x, A, index)

            def split():
                ys = [F.linear(x, w) for w in Ws]
                y = torch.cat(ys, -1) if len(ys) > 1 else ys[0]  # (HF adds each member's slice: one add per member)
                return lk.routed_lora_triton(x, A, Bbd, index, y, True)

            fns = {"cublas": lambda: [F.linear(x, w) for w in Ws], "cublas_cat": lambda: F.linear(x, W),
                   "shrink": shrink, "split": split,
                   "cat_split": lambda: lk.routed_lora_triton(x, A, Bbd, index, F.linear(x, W), True)}
            for i, c in enumerate(sweep):
                fns[f"merged:{i}"] = (lambda c=c: lk.routed_linear_triton(x, W, None, A, Bt, index, bounds, c))
            ref = lk.routed_linear_torch(x.float(), W.float(), None, A.float(), Bt.float(), index, bounds)
            errs = {}
            graphs = {}
            with torch.inference_mode():
                for k, fn in fns.items():
                    if k.startswith("merged"):
                        try:
                            out = fn()
                        except Exception as exc:  # a configuration past the shared memory: skipped
                            print(f"  {k} {sweep[int(k.split(':')[1])]}: {type(exc).__name__}", flush=True)
                            continue
                        errs[k] = float((out.float() - ref).norm() / ref.norm())
                    graphs[k] = graphed(fn)
                times = {k: [] for k in graphs}
                order = list(graphs)
                for i in range(args.rounds):
                    for k in (order if i % 2 == 0 else order[::-1]):
                        g = graphs[k]
                        g.replay()
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        for _ in range(args.replays):
                            g.replay()
                        e.record()
                        e.synchronize()
                        times[k].append(s.elapsed_time(e) * 1e3 / args.replays / CALLS)
            med = {k: statistics.median(v) for k, v in times.items()}
            best = min((k for k in med if k.startswith("merged")), key=med.get)
            rec = {"group": name, "K": K, "outs": outs, "batch": B, "us": times, "relerr": errs, "best": best,
                   "best_config": sweep[int(best.split(":")[1])]}
            results.append(rec)
            print(f"{name} B={B}: cublas {med['cublas']:.2f} cublas_cat {med['cublas_cat']:.2f} shrink {med['shrink']:.2f} "
                  f"split {med['split']:.2f} cat_split {med['cat_split']:.2f} best merged {med[best]:.2f} {rec['best_config']} (relerr {errs[best]:.2g})",
                  flush=True)
            del graphs
    p = {"benchmark": "tune_merged", "experts": args.experts, "r": args.r, "rounds": args.rounds, "calls": CALLS,
         "sweep": sweep, "machine": machine_info(dev), "results": results}
    write_json(args.json, p)
    rows = []
    for rec in results:
        med = {k: statistics.median(v) for k, v in rec["us"].items()}
        top = sorted((k for k in med if k.startswith("merged")), key=med.get)[:3]
        rows.append([rec["group"], rec["batch"], f"{med['cublas']:.2f}", f"{med['cublas_cat']:.2f}", f"{med['shrink']:.2f}",
                     f"{med['split']:.2f}", f"{med['cat_split']:.2f}"] + [f"{med[k]:.2f} {sweep[int(k.split(':')[1])]}" for k in top])
    print(markdown_table(["group", "batch", "cublas us", "cublas_cat us", "shrink us", "split us", "cat_split us", "merged best",
                          "2nd", "3rd"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
