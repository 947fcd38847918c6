"""Where one compiled generate call spends its host and GPU time: the base model against routed MoA, both with HF's
static cache and CUDA graphs (`reduce-overhead`), as bench_inference.py's base_c and moa_c variants run them.

After two warm-up calls (compilation, graph capture) one call per variant runs under torch.profiler (CPU and CUDA
activities). Printed per variant and per phase (the whole call; the prompt pass alone = the same call generating
one token): wall ms, GPU kernel time (sum of kernel durations, graph replays included), kernels launched and the
host time of dynamo's cache lookups (the guard checks run before every compiled call); then
MoA's top host-side operators by self CPU time. A wall time far above the GPU time means the call waits on the host.

Example:  python bench/profile_generate.py --shape qwen0.5b --device cuda --experts 8 --batch 8 --new-tokens 16
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, setup_shape, shape_args, write_json  # noqa: E402,I001
from bench_inference import (  # noqa: E402
    FUSED, GREEDY_TO_THE_END, build_moa, build_peft, domain_prompts, fit_routers, generation_args,
)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from moa_core import lora_kernels  # noqa: E402


VARIANTS = ("base_c", "moa_c", "base_gcp", "moa_gcp")


def main(argv: list[str] | None = None) -> int:
    ap = generation_args(shape_args(__doc__, experts="8"))
    ap.add_argument("--layout", default=lora_kernels.DECODE_LAYOUT, choices=lora_kernels.DECODE_LAYOUTS)
    ap.add_argument("--fused", default="auto", choices=sorted(FUSED),
                    help="MoA's fused routed-LoRA path: auto = on CUDA; on = also on the CPU (its torch formulation, "
                         "to count a CUDA step's guards there)")
    ap.add_argument("--variants", default="base_c,moa_c", type=lambda t: t.split(","),
                    help="of base_c, moa_c (HF's generate, reduce-overhead) and base_gcp, moa_gcp (moa_core's "
                         "GraphDecoder: the compiled step and the prompt pass replayed from CUDA graphs, as "
                         "bench_inference.py's variants of those names)")
    ap.add_argument("--top", default=20, type=int, help="rows of the profiler's operator table (0: none)")
    ap.add_argument("--gpu-top", default=0, type=int,
                    help="rows of a second table, by GPU time, for each whole call and prompt pass (0: none): which "
                         "kernels a call spends its time in")
    ap.add_argument("--routing-pass", default="compiled", choices=["compiled", "eager"],
                    help="MoA's routing pass: compiled (bench_inference's moa_c) or eager (the library's default, "
                         "moa_eager_route_c)")
    args = ap.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:  # before any model is built
        ap.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.render:
        ap.error("--render is not supported here: the figures are printed, and written with --json")
    from transformers import CompileConfig

    lora_kernels.DECODE_LAYOUT = args.layout
    device, dtype, base, V = setup_shape(args)
    n, B, P, G = args.experts[0], args.batch, args.prompt_len, args.new_tokens
    rows = torch.arange(B, device=device) % n
    ids, mask = domain_prompts(B, P, n, V, device), torch.ones(B, P, dtype=torch.long, device=device)
    mm = build_moa(base, build_peft(base, n, seed=n), n, seed=n)
    fit_routers(mm, ids, mask, rows, 40)
    mm.lora_fusion.enabled = FUSED[args.fused]
    mm.compile_routing_pass = args.routing_pass == "compiled"
    cc = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default", fullgraph=True)
    cc._compile_all_devices = True
    decoders = {}  # one GraphDecoder per model, as bench_inference's *_gcp variants (prompt graphs kept: 1 shape)

    def graphed(model: torch.nn.Module):
        from moa_core.graph_decode import GraphDecoder

        if id(model) not in decoders:
            decoders[id(model)] = GraphDecoder(model, compile=True)
            decoders[id(model)].prompt_shapes = 1
        return decoders[id(model)]

    def moa_gcp(tokens: int) -> torch.Tensor:
        mm.graph_decoder = graphed(mm.model)
        routing_before, mm.compile_routing_pass = mm.compile_routing_pass, False  # moa_gcp's routing pass is eager
        try:
            return mm.generate_greedy(ids, mask, tokens, **GREEDY_TO_THE_END)[0]
        finally:
            mm.compile_routing_pass = routing_before

    calls = {"base_c": lambda t: base.generate(input_ids=ids, attention_mask=mask, **gen(t)),
             "moa_c": lambda t: mm.generate(ids, mask, **gen(t))[0],
             "base_gcp": lambda t: graphed(base).generate(ids, mask, t, **GREEDY_TO_THE_END),
             "moa_gcp": moa_gcp}
    calls = {v: calls[v] for v in args.variants}

    def gen(tokens: int) -> dict:
        return dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                    cache_implementation="static", compile_config=cc)

    records = []
    with torch.inference_mode():
        for name, call in calls.items():
            for tokens in (G, G, 1, 1):
                call(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        for name, call in calls.items():
            for tokens in (G, 1):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    t0 = time.perf_counter()
                    call(tokens)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    wall = (time.perf_counter() - t0) * 1e3
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
                gpu = sum(e.device_time for e in kernels) / 1e3
                phase = "whole call" if tokens == G else "prompt pass"
                lookups = [e for e in prof.events() if e.name == "TorchDynamo Cache Lookup"]
                guards = sum(e.cpu_time_total for e in lookups) / max(1, len(lookups)) / 1e3
                print(f"{name} {phase} ({tokens} new tokens): wall {wall:.1f} ms, GPU kernels {gpu:.1f} ms, "
                      f"{len(kernels)} kernels; dynamo cache lookups (guard checks) {len(lookups)} x {guards:.3f} ms",
                      flush=True)
                records.append({"variant": name, "new_tokens": tokens, "wall_ms": wall, "gpu_kernel_ms": gpu,
                                "kernels": len(kernels), "guard_checks": len(lookups), "guard_check_ms": guards})
                if args.top:
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
                if args.gpu_top:  # the prompt pass too: at batch 32 it is most of MoA's extra time under graphs
                    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.gpu_top))
    write_json(args.json, {"benchmark": "profile_generate", "shape": args.shape, "layout": args.layout, "batch": B,
                           "prompt_len": P, "new_tokens": G, "machine": machine_info(device), "results": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
