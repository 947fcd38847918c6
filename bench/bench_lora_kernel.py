"""GPU time of the projections of one decode step: base linears alone, + the fused routed LoRA, + the reference path.

A stack of --layers transformer layers' projections (Qwen2-0.5B shapes: q, k, v, o = d -> d, d -> kv, d -> kv,
d -> d; gate, up = d -> ff; down = ff -> d), each wrapped in moa_core's ExpertMixtureLinear with E experts,
called on one token per row (a decode step; --tokens for a prefill) in HF's order (q, k, v on one input;
gate and up on one input, down on their product). Rows are spread over the experts round-robin (distinct
experts = min(batch, E)). Variants:

  base      the base projections only (adapters off);
  fused     + the routed LoRA through moa_core.lora_kernels (one kernel per group of projections);
  split     the same with a decode step's shrink and expand as two kernels (lora_kernels.DECODE_LAYOUT "split");
  merged    a decode step's group as a shrink kernel and one GEMM computing base and LoRA together (the members'
            base linears skipped: DECODE_LAYOUT "merged"); with --merged-configs also merged:<i>, the same with
            the i-th launch configuration (lora_kernels.MERGED_CONFIG keys, e.g. "block_n=32,block_k=256");
  augmented a decode step's group as one kernel building [x | the row's shrink in its expert's slot] and one cuBLAS
            GEMM over [W | each expert's B] (DECODE_LAYOUT "augmented"; a group past lora_kernels.AUGMENT_MAX_EXTRA
            runs the merged layout's kernels);
  reference + the routed LoRA through ExpertMixtureLinear's own path (the gathered A, s*B kept on the route,
            bmm + baddbmm): its best case, gathers done once before timing.

On CUDA each variant's step is captured in a CUDA graph and its replays are timed with CUDA events (no host
overhead: the GPU time of the step); the variants are timed in interleaved rounds and each figure is the median
over rounds with [min-max]. On the CPU the same steps run eagerly (a check of the script, not a GPU figure).
Attention, norms and the LM head are not in the stack, so fused/base here is an upper bound of a full decode
step's ratio at the same batch.

Example:  python bench/bench_lora_kernel.py --device cuda --batch 1,4,8,32 --experts 8,32,64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, machine_info, parse_int_list, pick_device, write_json  # noqa: E402,I001

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moa_core.experts import ExpertMixtureLinear, LayerSlot, Route  # noqa: E402
from moa_core import lora_kernels  # noqa: E402
from moa_core.lora_kernels import LoraFusion  # noqa: E402


def build_stack(layers: int, d: int, kv: int, ff: int, E: int, r: int, device, dtype):
    """-> (slots, per-layer dict of wrapped projections, LoraFusion over all of them)."""
    torch.manual_seed(0)
    slots, stack, wrapped = [], [], {}
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    for i in range(layers):
        slot = LayerSlot(i)
        layer = {}
        for name, (din, dout) in shapes.items():
            lin = nn.Linear(din, dout, bias=False, device=device, dtype=dtype)
            w = ExpertMixtureLinear(lin, slot, E, r, 2.0).eval()
            with torch.no_grad():
                w.lora_B.normal_(std=0.02)
            layer[name] = w
            wrapped[f"layers.{i}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"] = w
        slots.append(slot)
        stack.append(layer)
    return slots, stack, LoraFusion(wrapped)


def step(stack, x):
    """One pass over the stack's projections in HF's call pattern (plus the elementwise ops that join them, as
    in a layer: product, sums, an RMS norm); returns a tensor to compare between variants."""
    acc = x
    for p in stack:
        q, k, v = p["q_proj"](acc), p["k_proj"](acc), p["v_proj"](acc)
        o = p["o_proj"](q)
        g, u = p["gate_proj"](o), p["up_proj"](o)
        acc = p["down_proj"](g * u) + k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True)
        acc = acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + 1e-6)  # keeps 24 layers finite (an RMS norm)
    return acc


def measure(args) -> dict:
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default_merged = dict(lora_kernels.MERGED_CONFIG)
    merged_configs = {f"merged:{i}": {**default_merged, **{k: int(v) for k, v in (kv.split("=") for kv in c.split(","))}}
                      for i, c in enumerate(args.merged_configs)}
    results = []
    for E in args.experts:
        slots, stack, fusion = build_stack(args.layers, args.hidden, args.kv, args.ff, E, args.r, device, dtype)
        fusion.enabled = True
        if args.tokens == 1:  # Wa first: it re-homes the base weights, which the graphs captured below read
            lora_kernels.DECODE_LAYOUT = "augmented"
            assert fusion.ready()
        for B in args.batch:
            x = torch.randn(B, args.tokens, args.hidden, device=device, dtype=dtype) * 0.1
            index = torch.arange(B, device=device) % E
            route = Route(index=index)
            runs = {}
            outs = {}

            def configure(v: str) -> None:
                layout = v.split(":")[0]
                for s in slots:
                    s.route = route
                    s.adapters_off = v == "base"
                    s.fused = layout in lora_kernels.DECODE_LAYOUTS
                if layout in lora_kernels.DECODE_LAYOUTS:  # read when the step runs: each capture keeps its own
                    lora_kernels.DECODE_LAYOUT = layout
                lora_kernels.MERGED_CONFIG = merged_configs.get(v, default_merged)

            # the layouts differ only in a decode step (one token per row)
            variants = ["base", "fused", "split", "merged", *merged_configs, "augmented", "reference"] \
                if args.tokens == 1 \
                else ["base", "fused", "reference"]
            for v in variants:
                configure(v)
                if v != "base" and v != "reference":
                    assert fusion.ready()
                with torch.inference_mode():
                    outs[v] = step(stack, x).float()  # warm-up: Triton JIT, the reference path's gathers
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            out = step(stack, x)
                        runs[v] = (g, out)
                    else:
                        runs[v] = (None, None)
            times: dict[str, list[float]] = {v: [] for v in runs}
            order = list(runs)
            for i in range(args.rounds):
                for v in (order if i % 2 == 0 else order[::-1]):
                    configure(v)
                    g, _ = runs[v]
                    with torch.inference_mode():
                        if g is not None:
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            g.replay()
                            start.record()
                            for _ in range(args.replays):
                                g.replay()
                            end.record()
                            end.synchronize()
                            times[v].append(start.elapsed_time(end) / args.replays * 1e3)  # us per step
                        else:
                            t0 = time.perf_counter()
                            step(stack, x)
                            times[v].append((time.perf_counter() - t0) * 1e6)
            configure("fused")
            ref = outs["reference"]
            rel = float((outs["fused"] - ref).norm() / ref.norm())
            rec = {"experts": E, "batch": B, "tokens": args.tokens, "distinct_experts": min(B, E), "us": times,
                   "fused_vs_reference_relerr": rel}
            for v in variants:
                if v not in ("base", "fused", "reference"):
                    rec[f"{v}_vs_reference_relerr"] = float((outs[v] - ref).norm() / ref.norm())
            results.append(rec)
            med = {v: statistics.median(ts) for v, ts in times.items()}
            print(f"  E={E} B={B}: " + ", ".join(f"{v} {m:.1f} us" for v, m in med.items()) + f", relerr {rel:.2g}",
                  file=sys.stderr, flush=True)
        del stack, fusion
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"benchmark": "lora_kernel", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "layers": args.layers, "hidden": args.hidden, "kv": args.kv, "ff": args.ff, "r": args.r,
            "rounds": args.rounds, "replays": args.replays, "graphs": device.type == "cuda",
            "merged_config": default_merged, "merged_configs": merged_configs,
            "machine": machine_info(device), "results": results}


def render(p: dict) -> str:
    def cell(ts: list[float]) -> str:
        return f"{statistics.median(ts):,.1f} [{min(ts):,.1f}-{max(ts):,.1f}]"

    def ratio(a: list[float], b: list[float]) -> str:
        q = [x / y for x, y in zip(a, b)]
        return f"{statistics.median(q):.3g} [{min(q):.3g}-{max(q):.3g}]"

    mode = "CUDA graph replay, GPU time per step" if p["graphs"] else "eager, CPU (script check only)"
    head = (f"### Projection stack of one step: {p['layers']} layers (d {p['hidden']}, kv {p['kv']}, ff {p['ff']}), "
            f"r={p['r']}, {p['device']} {p['dtype']}, {mode}; median [min-max] of {p['rounds']} interleaved rounds\n")
    def us(r: dict, v: str) -> str:  # results written before a layout existed lack its column
        return cell(r["us"][v]) if v in r["us"] else "-"

    def over_base(r: dict, v: str) -> str:
        return ratio(r["us"][v], r["us"]["base"]) if v in r["us"] else "-"

    variants = [v for v in ("fused", "split", "merged") if any(v in r["us"] for r in p["results"])]
    variants += sorted({v for r in p["results"] for v in r["us"] if v.startswith("merged:")})
    variants += [v for v in ("augmented",) if any(v in r["us"] for r in p["results"])] + ["reference"]
    rows = [[r["experts"], r["batch"], r["tokens"], r["distinct_experts"], us(r, "base")] + [us(r, v) for v in variants]
            + [over_base(r, v) for v in variants]
            + [f"{r[k]:.2g}" if isinstance(r.get(k := f"{v}_vs_reference_relerr"), float) else "-" for v in variants[:-1]]
            for r in p["results"]]
    configs = "".join(f"\n{v}: {c}" for v, c in p.get("merged_configs", {}).items())
    return head + configs + "\n" + markdown_table(
        ["experts", "batch", "tokens/row", "distinct", "base us"] + [f"{v} us" for v in variants]
        + [f"{v}/base" for v in variants] + [f"relerr {v}~ref" for v in variants[:-1]], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", default="1,4,8,32", type=parse_int_list)
    ap.add_argument("--experts", default="8,32,64", type=parse_int_list)
    ap.add_argument("--tokens", default=1, type=int, help="tokens per row (1 = decode step)")
    ap.add_argument("--layers", default=24, type=int)
    ap.add_argument("--hidden", default=896, type=int)
    ap.add_argument("--kv", default=128, type=int)
    ap.add_argument("--ff", default=4864, type=int)
    ap.add_argument("--r", default=8, type=int)
    ap.add_argument("--rounds", default=7, type=int)
    ap.add_argument("--replays", default=20, type=int, help="graph replays per timed sample")
    ap.add_argument("--merged-configs", default=[], type=lambda t: [c for c in t.split(";") if c],
                    help="extra launch configurations of the merged layout to time, ';'-separated, each "
                         "'key=value,...' over lora_kernels.MERGED_CONFIG (e.g. 'block_n=32;block_k=256,num_warps=2')")
    ap.add_argument("--json", default=None)
    ap.add_argument("--render", default=None)
    args = ap.parse_args(argv)
    if args.render:
        import json

        print(render(json.loads(Path(args.render).read_text())))
        return 0
    p = measure(args)
    write_json(args.json, p)
    print(render(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
