"""Mixed-domain batched generation: base model vs PEFT mixed batches vs moa_core's routed MoA layer.

For each N in --experts, one batch whose rows belong to N domains (row i -> domain i % N) is generated
greedily (prompt --prompt-len tokens, exactly --new-tokens new tokens) by

  (a) base      the model without adapters (the limit);
  (b) peft      one PeftModel holding N LoRA adapters (random non-zero B, kept in the base's dtype: bf16
                on the GPU, not PEFT's default float32 upcast), `generate(adapter_names=...)` (mixed batch);
      peft_split  the same PeftModel, one batch per adapter (`set_adapter`, then generate on that adapter's
                rows), N generate calls: PEFT's plain multi-adapter mode;
  (c) moa       moa_core's MixtureModel (method moa, N experts holding the same N LoRAs), router
                included: `mm.generate(...)` with expert=None, so it routes from the prompt first.

and, to attribute the cost of (c):

  moa_norc      (c) without reusing the routing pass's KV cache as the prompt cache: route, then a full
                prefill with the chosen experts (moa_core's generate before that reuse);
  moa_off       the same MixtureModel with adapters_off=True (wrappers and hooks, no LoRA math);
  moa_forced    `mm.generate(expert=row_domain)` (no routing pass; same rows->experts as (b));
  moa_ref       (c) through the reference routed-LoRA path (ExpertMixtureLinear's gathers and bmm) instead
                of the fused kernels of moa_core.lora_kernels (which moa uses on CUDA with triton);
  *_c           (opt-in: --variants base_c,moa_c,moa_forced_c,moa_ref_c) base / moa / ... with HF's static
                KV cache and its automatic torch.compile of the decode step (`cache_implementation="static"`,
                CompileConfig(mode=--compile-mode, fullgraph=True); reduce-overhead = CUDA graphs). The
                prompt (and MoA's routing pass) run eagerly, as HF does. The warm-up call compiles; its
                time is reported as `warmup_s`. PEFT's adapter_names path is not compiled.
  moa_split_c   moa_c with a decode step's routed LoRA as a shrink kernel and an expand kernel
                (lora_kernels.DECODE_LAYOUT "split") instead of one kernel per projection group; compiled
                separately.
  moa_eager_route_c  moa_merged_c with the routing pass run eagerly (MixtureModel.compile_routing_pass = False,
                the library's default since 2026-12-04): its compile time and prompt pass against moa_merged_c's,
                which compiles the routing pass too (as the other *_c variants do)
  moa_merged_c  moa_c with a decode step's projection groups as a shrink kernel and one GEMM each that computes
                the base projections and the LoRA together (DECODE_LAYOUT "merged"). moa_c always runs the
                one-kernel layout ("fused"), moa_split_c and moa_merged_c theirs; the other *_c variants run
                the library's default (lora_kernels.DECODE_LAYOUT)
  *_c_sg        (base_c_sg, moa_eager_route_c_sg, moa_merged_c_sg) the same call under
                torch.compiler.set_stance(skip_guard_eval_unsafe=True): dynamo runs the compiled step without
                checking its guards first (only those that tell its compiled versions apart). Warmed up after
                the variant they wrap (whose compiled step they reuse); what the guard checks cost per call, on
                both sides alike. `same_as_plain` records whether each output equals the plain variant's
  base_g, moa_g  greedy generation through moa_core.graph_decode: the prompt (MoA: its routing pass, eager) run
                eagerly into a kept static cache, then every decode step replayed from one CUDA graph captured at the
                warm-up (GraphDecoder for the base, `mm.generate_greedy` for MoA): no generate loop, dynamo guard
                check or host sync per token. The step's kernels are the eager ones (MoA: its fused Triton path)
  base_gc, moa_gc  the same with the step's model call compiled first (GraphDecoder(compile=True): inductor's
                kernels, captured by the same graph); compiled and captured at the warm-up
  moa_gcr       moa_gc with its routing pass compiled too (MixtureModel.compile_routing_pass; the base's prompt
                stays eager, as in base_gc: what compiling MoA's prompt pass alone buys). Shares moa_gc's decoder
  base_gcp, moa_gcp  base_gc and moa_gc with the prompt pass captured too (GraphDecoder(prompt_shapes=1): the
                prefill, MoA's routing pass, eager kernels replayed from one CUDA graph per prompt shape, captured at
                the warm-up): both sides' whole call replayed from graphs. Share base_gc's and moa_gc's decoders
  moa_gcpm      moa_gcp with the prompt's LoRA in the merged prompt layout (lora_kernels.PROMPT_LAYOUT = "merged":
                cuBLAS, each group's base projections as one GEMM, the expands added in place) instead of the group
                kernel. Shares moa_gc's decoder
  moa_gca, moa_gcpa  moa_gc and moa_gcp with the decode step in the augmented layout (lora_kernels.DECODE_LAYOUT
                "augmented": per projection group, one kernel builds [x | each row's shrink in its expert's slot]
                and one cuBLAS GEMM runs over [W | every expert's B]) instead of the library's default. Share
                moa_gc's decoder (the layout is part of its key: a graph each)
  moa_gcf       moa_gc with `MixtureModel.fold_single_expert`: a batch whose rows all use one expert (batch 1
                always) decodes with its LoRA folded into a copy of the base weights (no LoRA kernels in the step);
                a mixed batch decodes as moa_gc. Shares moa_gc's decoder (two decode graphs kept). The calls repeat
                one prompt batch, so after the warm-up the fold is never redone: `fold_s` (median [min-max] of 5
                folds alternating two experts) is what a call pays when its expert differs from the last call's
  moa_gcpf      moa_gcp with `fold_single_expert` (the prompt's routing pass captured, the decode step folded): at
                batch 1, MoA's whole call with both of its passes replayed from graphs, against base_gcp's
  moa_v0        (c) with the routed path moa_core had before this benchmark (bench/_legacy.py): gathers
                and the scaling multiply every decode step instead of once per generate call.

Prompts carry their domain (row i draws its tokens from domain i % N's own 64 token ids) and,
with --routers fit (the default), the routers are fitted on them first as in MoA stage 2 (routers only,
cross-entropy on the domain, gold expert in every layer), so routing behaves like a trained MoA: the
table reports the router's accuracy and the share of rows whose layers all agreed with the final
expert (those rows' routing-pass cache is reused as is; the others are run again). --routers random
keeps the untrained routers (near-random decisions: the worst case for that reuse).

Every variant is warmed up once, then the variants are timed in turn, --repeats times, interleaved (A B C,
C B A, A B C, ...: clock drift and the position in a round hit them alike); each time is the median, with
min and max beside it, and each ratio X/Y is also computed per round (the two calls of one round ran
back to back) and reported as median [min, max] of those paired ratios. CUDA is synchronised around
each timed call.
`match` is the share of generated tokens where moa_forced equals peft (same LoRA weights, same
assignment): 1.0 expected in fp32, close to 1 in bf16 (greedy decoding can flip on near-ties).

Example:  python bench/bench_inference.py --shape smollm2 --device cpu --experts 1,4,16 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: I001
    run_shapes, setup_shape, shape_args,  # noqa: E402  (first: puts the repo root on sys.path for moa_core)
    LORA_ALPHA, LORA_R, TARGETS, build_base, clone, machine_info, markdown_table, median, moa_spec,
    pick_device, pick_dtype, timed, write_json,
)
from _legacy import legacy_routed_path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moa_core import lora_kernels  # noqa: E402

VARIANTS = ["base", "peft", "peft_split", "moa", "moa_ref", "moa_norc", "moa_v0", "moa_off", "moa_forced", "base_c",
            "moa_c", "moa_split_c", "moa_merged_c", "moa_eager_route_c", "moa_ref_c", "moa_norc_c", "moa_forced_c",
            "base_c_sg", "moa_merged_c_sg", "moa_eager_route_c_sg", "base_g", "moa_g", "base_gc", "moa_gc", "moa_gcr",
            "base_gcp", "moa_gcp", "moa_gcpm", "moa_gcf", "moa_gcpf", "moa_gca", "moa_gcpa"]
# moa_core.graph_decode's decoder
GRAPHED = ("base_g", "moa_g", "base_gc", "moa_gc", "moa_gcr", "base_gcp", "moa_gcp", "moa_gcpm", "moa_gcf", "moa_gcpf",
           "moa_gca", "moa_gcpa")
AUGMENTED = ("moa_gca", "moa_gcpa")  # the graphed variants whose decode step runs DECODE_LAYOUT "augmented"
# no eos: every row runs all G steps, as HF's generate with min_new_tokens=G (the same work and comparable tokens)
GREEDY_TO_THE_END = dict(eos_token_id=[], pad_token_id=0)
# the variants that fold a batch of one expert (fold_single_expert), each with its routed twin (the same function)
FOLDED_TWINS = {"moa_gcf": "moa_gc", "moa_gcpf": "moa_gcp"}
GRAPHED_TWINS = [(g, hf) for g in GRAPHED for hf in ("base_c", "base", "moa_eager_route_c", "moa")
                 if g.split("_")[0] == hf.split("_")[0]]  # each against HF's generate of the same model
SKIP_GUARDS = "_sg"  # suffix: the wrapped variant with dynamo's guard checks skipped


def compiled(variant: str) -> bool:
    """Whether the variant runs HF's compiled decode step (the *_c variants and their *_c_sg twins)."""
    return variant.removesuffix(SKIP_GUARDS).endswith("_c")


def warmed(variant: str) -> bool:
    """Whether the variant's first call compiles or captures (at least one warm-up call, reported as `warmup_s`)."""
    return compiled(variant) or variant in GRAPHED
DEFAULT_VARIANTS = ["base", "peft", "moa", "moa_norc", "moa_off", "moa_forced"]


def build_peft(base: nn.Module, n: int, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.05, target_modules=list(TARGETS),
                     task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    pm = get_peft_model(clone(base), cfg, adapter_name="d0")
    for k in range(1, n):
        pm.add_adapter(f"d{k}", cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)  # random non-zero B: every adapter changes the output
    # PEFT upcasts bf16/fp16 adapters to float32 by default (autocast_adapter_dtype); for inference its faster
    # mode keeps them in the base model's dtype, as moa_core does
    pm.to(dtype=next(base.parameters()).dtype)
    pm.eval()
    return pm


def build_moa(base: nn.Module, pm: nn.Module, n: int, seed: int):
    """A MoA MixtureModel with N experts holding exactly the PEFT model's N adapters."""
    from moa_core.model import MixtureModel

    torch.manual_seed(seed)
    mm = MixtureModel(clone(base), moa_spec(base, n, dropout=0.05))
    mm.routers.to(base.device)  # a no-op since MixtureModel builds its routers on the base's device
    loaded = 0
    for name, mod in pm.named_modules():
        if isinstance(getattr(mod, "lora_A", None), nn.ModuleDict) and "d0" in mod.lora_A:
            key = name.removeprefix("base_model.model.")
            w = mm.wrapped[key]
            for k in range(n):
                a = f"d{k}"
                w.load_expert(k, mod.lora_A[a].weight.data, mod.lora_B[a].weight.data, float(mod.scaling[a]))
            loaded += 1
    assert loaded == len(mm.wrapped), f"loaded {loaded} of {len(mm.wrapped)} projections"
    mm.eval()
    return mm


def domain_prompts(B: int, P: int, n: int, vocab: int, device: torch.device) -> torch.Tensor:
    """[B, P] prompts; row i draws from domain (i % n)'s own token ids (64, fewer in a tiny vocabulary;
    disjoint across up to 16 domains)."""
    g = torch.Generator().manual_seed(1)
    w = min(64, (vocab - 3) // 16)
    words = torch.randperm(vocab - 3, generator=g)[: w * 16].view(16, w) + 3  # [domain, word]
    pick = torch.randint(0, w, (B, P), generator=g)
    return words[torch.arange(B) % n % 16].gather(1, pick).to(device)


def fit_routers(mm, ids: torch.Tensor, mask: torch.Tensor, gold: torch.Tensor, steps: int) -> dict:
    """MoA stage 2 with the LoRAs frozen: every layer's router learns the domain from the prompt (gold expert
    in every layer, cross-entropy); -> router accuracy and the share of rows whose layers all agree."""
    params = mm.set_trainable(routers=True)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        mm(ids, mask, expert=gold, eta=1.0, pool_mask=mask).aux_loss.backward()
        opt.step()
    mm.set_trainable()
    mm.eval()
    with torch.no_grad():
        chosen, logits = mm.route(ids, mask)
    return {"router_accuracy": float((chosen == gold).float().mean()),
            "layers_agree": float((logits.argmax(-1) == chosen).all(0).float().mean())}


# the ratios reported per round: (numerator, denominator)
RATIOS = [("moa", "base"), ("moa_ref", "base"), ("moa_forced", "base"), ("peft", "moa"), ("peft_split", "moa"),
          ("moa_ref", "moa"), ("moa_c", "base_c"), ("moa_split_c", "base_c"), ("moa_split_c", "moa_c"), ("moa_merged_c", "base_c"), ("moa_merged_c", "moa_split_c"), ("moa_eager_route_c", "base_c"),
          ("moa_eager_route_c", "moa_merged_c"), ("moa_ref_c", "base_c"), ("moa_forced_c", "base_c"),
          ("moa_ref_c", "moa_c"), ("peft", "moa_c"), ("peft_split", "moa_c"), ("moa_merged_c_sg", "base_c_sg"),
          ("moa_eager_route_c_sg", "base_c_sg"), ("base_c_sg", "base_c"), ("moa_merged_c_sg", "moa_merged_c"),
          ("moa_eager_route_c_sg", "moa_eager_route_c"), ("moa_g", "base_g"), ("moa_gc", "base_gc"),
          ("base_g", "base_c"), ("base_gc", "base_c"), ("moa_g", "base_c"), ("moa_gc", "base_c"),
          ("moa_gc", "moa_eager_route_c"), ("moa_gcr", "base_gc"), ("moa_gcr", "moa_gc"), ("moa_gcp", "base_gcp"),
          ("base_gcp", "base_gc"), ("moa_gcp", "moa_gc"), ("moa_gcpm", "base_gcp"), ("moa_gcpm", "moa_gcp"),
          ("moa_gcf", "base_gc"), ("moa_gcf", "moa_gc"), ("moa_gcpf", "base_gcp"), ("moa_gcpf", "moa_gcp"),
          ("moa_gca", "base_gc"), ("moa_gca", "moa_gc"), ("moa_gcpa", "base_gcp"), ("moa_gcpa", "moa_gcp")]


# variants that pin a decode layout
LAYOUT_OF = {"moa_c": "fused", "moa_split_c": "split", "moa_merged_c": "merged", "moa_eager_route_c": "merged"}
FUSED = {"auto": None, "on": True, "off": False}  # --fused -> LoraFusion.enabled of the moa variants


def spread(xs: list[float]) -> dict[str, float]:
    """median, min, max and the number of samples."""
    return {"median": median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def fold_times(mm, device: torch.device, rounds: int = 5) -> list[float]:
    """Seconds per `lora_fusion.fold(e)` that has work to do (e alternating between experts 0 and 1): what a
    `fold_single_expert` call pays when its expert is not the last call's. The expert last folded is put back."""
    last = mm.lora_fusion.groups[0].folded_expert
    first = 1 if last == 0 else 0  # the first fold has work to do too
    out = []
    with torch.inference_mode():
        for i in range(rounds):
            out.append(timed(lambda: mm.lora_fusion.fold(first if i % 2 == 0 else 1 - first), device)[0])
        if last is not None:
            mm.lora_fusion.fold(last)
    return out


def run_shape(args: argparse.Namespace) -> dict:
    device, dtype, base, V = setup_shape(args)
    B, P, G = args.batch, args.prompt_len, args.new_tokens
    mask = torch.ones(B, P, dtype=torch.long, device=device)
    gen = dict(max_new_tokens=G, min_new_tokens=G, do_sample=False, pad_token_id=0)
    results = []
    for n in args.experts:
        rows = torch.arange(B, device=device) % n
        ids = domain_prompts(B, P, n, V, device)
        names = [f"d{int(k)}" for k in rows]
        pm = build_peft(base, n, seed=n)
        mm = build_moa(base, pm, n, seed=n)
        mm.compile_routing_pass = True  # the *_c variants compile generate's routing pass, except moa_eager_route_c
        routing = fit_routers(mm, ids, mask, rows, args.router_steps) if args.routers == "fit" else {}
        outs: dict[str, torch.Tensor] = {}
        chosen: list[torch.Tensor] = []

        cc = None
        if any(compiled(v) for v in args.variants):
            from torch import _dynamo
            from transformers import CompileConfig

            _dynamo.reset()  # each N has its own models: start from an empty compile cache
            mode = args.compile_mode if args.compile_mode != "auto" else ("reduce-overhead" if device.type == "cuda" else "default")
            cc = CompileConfig(mode=mode, fullgraph=True)
            cc._compile_all_devices = True  # HF compiles on CUDA by itself; this lets the CPU runs compile too
        static = dict(cache_implementation="static", compile_config=cc)
        decoders = {}  # graph_decode.GraphDecoder per *_g variant, made at its warm-up (each its own captures)

        def graph_decoder(v: str, model: nn.Module):
            from moa_core.graph_decode import GraphDecoder

            # moa_gcr, moa_gcf, *_gcp, moa_gcpm, moa_gcpf decode with *_gc's decoder (the same step, one graph);
            # *_gcp* also capture the prompt (three kept: moa_gcp's, moa_gcpm's and moa_gcpa's prompt graphs, one
            # per layout, alternate)
            prompt_shapes = 3 if "_gcp" in v else 0
            v = v[: v.index("_gc") + 3] if "_gc" in v else v
            if v not in decoders:
                decoders[v] = GraphDecoder(model, compile=v.endswith("_gc"))
            decoders[v].prompt_shapes = prompt_shapes
            return decoders[v]

        def call(v: str):
            if v.endswith(SKIP_GUARDS):
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return call(v.removesuffix(SKIP_GUARDS))
            mm.lora_fusion.enabled = False if v in ("moa_ref", "moa_ref_c") else FUSED[args.fused]
            with torch.inference_mode():
                if v in ("base_g", "base_gc", "base_gcp"):
                    return graph_decoder(v, base).generate(ids, mask, gen["max_new_tokens"], **GREEDY_TO_THE_END)
                if v in ("moa_g", "moa_gc", "moa_gcr", "moa_gcp", "moa_gcpm", "moa_gcf", "moa_gcpf", *AUGMENTED):
                    mm.graph_decoder = graph_decoder(v, mm.model)
                    # eager, as base_g's prompt (moa_gcr: compiled)
                    routing_before, mm.compile_routing_pass = mm.compile_routing_pass, v == "moa_gcr"
                    layout_before = lora_kernels.PROMPT_LAYOUT
                    lora_kernels.PROMPT_LAYOUT = "merged" if v == "moa_gcpm" else "fused"
                    decode_before = lora_kernels.DECODE_LAYOUT
                    if v in AUGMENTED:
                        lora_kernels.DECODE_LAYOUT = "augmented"
                    mm.fold_single_expert = v in FOLDED_TWINS
                    try:
                        return mm.generate_greedy(ids, mask, gen["max_new_tokens"], **GREEDY_TO_THE_END)[0]
                    finally:
                        mm.compile_routing_pass = routing_before
                        lora_kernels.PROMPT_LAYOUT = layout_before
                        lora_kernels.DECODE_LAYOUT = decode_before
                        mm.fold_single_expert = False
                if v == "base_c":
                    return base.generate(input_ids=ids, attention_mask=mask, **static, **gen)
                if v in LAYOUT_OF:
                    before = lora_kernels.DECODE_LAYOUT  # a guard of the compiled step: each layout its own capture
                    lora_kernels.DECODE_LAYOUT = LAYOUT_OF[v]
                    routing_before, mm.compile_routing_pass = mm.compile_routing_pass, v != "moa_eager_route_c"
                    try:
                        return mm.generate(ids, mask, **static, **gen)[0]
                    finally:
                        lora_kernels.DECODE_LAYOUT = before
                        mm.compile_routing_pass = routing_before
                if v == "moa_norc_c":
                    return mm.generate(ids, mask, reuse_routing_cache=False, **static, **gen)[0]
                if v == "moa_forced_c":
                    return mm.generate(ids, mask, expert=rows, **static, **gen)[0]
                if v == "base":
                    return base.generate(input_ids=ids, attention_mask=mask, **gen)
                if v == "peft":
                    return pm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen)
                if v == "peft_split":
                    out = torch.empty(B, P + G, dtype=ids.dtype, device=device)
                    for k in range(n):
                        sel = (rows == k).nonzero().squeeze(1)
                        pm.set_adapter(f"d{k}")
                        out[sel] = pm.generate(input_ids=ids[sel], attention_mask=mask[sel], **gen)
                    pm.set_adapter("d0")
                    return out
                if v == "moa_ref":
                    return mm.generate(ids, mask, **gen)[0]
                if v == "moa_ref_c":
                    return mm.generate(ids, mask, **static, **gen)[0]
                if v == "moa":
                    seqs, exp = mm.generate(ids, mask, **gen)
                    chosen.append(exp)
                    return seqs
                if v == "moa_norc":
                    return mm.generate(ids, mask, reuse_routing_cache=False, **gen)[0]
                if v == "moa_v0":
                    with legacy_routed_path():
                        return mm.generate(ids, mask, reuse_routing_cache=False, **gen)[0]
                if v == "moa_off":
                    return mm.generate(ids, mask, adapters_off=True, **gen)[0]
                if v == "moa_forced":
                    return mm.generate(ids, mask, expert=rows, **gen)[0]
            raise ValueError(v)

        variants = list(args.variants) if args.given_order else [v for v in VARIANTS if v in args.variants]
        if any(v in AUGMENTED for v in variants) and FUSED[args.fused] is not False:
            # Wa first: it re-homes the base weights, so that the other variants' graphs read them where they stay
            before, lora_kernels.DECODE_LAYOUT = lora_kernels.DECODE_LAYOUT, "augmented"
            mm.lora_fusion.enabled = FUSED[args.fused]
            mm.lora_fusion.ready()
            lora_kernels.DECODE_LAYOUT = before
        warm: dict[str, float] = {}
        for v in variants:  # warm-up (allocator, cuBLAS handles, kernels' first launches, compilation)
            for _ in range(max(1, args.warmup) if warmed(v) else args.warmup):
                t, outs[v] = timed(lambda: call(v), device)
                warm.setdefault(v, t)
                print(f"  N={n}: warm-up {v} {t:.1f} s", file=sys.stderr, flush=True)  # a compile time, if cut short
        times: dict[str, list[float]] = {v: [] for v in variants}
        last: dict[str, torch.Tensor] = {}  # each variant's output in the last round
        for i in range(args.repeats):
            for v in (variants if i % 2 == 0 else variants[::-1]):  # ABC CBA ABC ...
                t, out = timed(lambda: call(v), device)
                times[v].append(t)
                last[v] = out
                assert out.shape == (B, P + G), f"{v}: generated {tuple(out.shape)}, expected {(B, P + G)}"
        prefill: dict[str, list[float]] = {v: [] for v in variants}
        if args.prefill_rounds:  # the same calls generating one token: the prompt pass (and routing) alone
            gen.update(max_new_tokens=1, min_new_tokens=1)
            for i in range(args.prefill_rounds):
                for v in (variants if i % 2 == 0 else variants[::-1]):
                    prefill[v].append(timed(lambda: call(v), device)[0])
            gen.update(max_new_tokens=G, min_new_tokens=G)
        med = {v: median(ts) for v, ts in times.items()}
        rec = {"experts": n, "median_s": med, "min_s": {v: min(ts) for v, ts in times.items()},
               "max_s": {v: max(ts) for v, ts in times.items()}, "all_s": times, "warmup_s": warm, **routing,
               "gen_tokens_per_s": {v: B * G / s for v, s in med.items()},
               **({"prefill_s": prefill, "decode_step_s": {v: (med[v] - median(prefill[v])) / max(1, G - 1)
                                                          for v in variants}} if args.prefill_rounds else {}),
               "paired_ratios": {f"{a}/{b}": spread([x / y for x, y in zip(times[a], times[b])])
                                 for a, b in RATIOS if a in times and b in times}}
        same = {v: bool(torch.equal(last[v], outs[v.removesuffix(SKIP_GUARDS)])) for v in variants
                if v.endswith(SKIP_GUARDS) and v.removesuffix(SKIP_GUARDS) in outs and v in last}
        if same:  # the last round's call against the plain warm-up's: a step run where its guards would fail shows
            rec["same_as_plain"] = same
        for g, hf in GRAPHED_TWINS:  # the decoder's tokens against HF's generate of the same model (greedy)
            if g in outs and hf in outs:
                rec[f"match_{g}_vs_{hf}"] = float((outs[g][:, P:] == outs[hf][:, P:]).float().mean())
        for folded, routed in FOLDED_TWINS.items():  # folded weights against the routed step: the same function
            if folded in outs and routed in outs:
                rec[f"match_{folded}_vs_{routed}"] = float((outs[folded][:, P:] == outs[routed][:, P:]).float().mean())
        mm.lora_fusion.enabled = FUSED[args.fused]
        if n > 1 and FOLDED_TWINS.keys() & set(variants) and mm.lora_fusion.ready():  # only the fused path folds
            rec["fold_s"] = spread(fold_times(mm, device))
        if "peft" in outs and "moa_forced" in outs:
            rec["match_moa_forced_vs_peft"] = float((outs["peft"][:, P:] == outs["moa_forced"][:, P:]).float().mean())
        if "peft" in variants and "moa" in variants:  # same LoRAs, same rows->experts: prompt logits agree?
            with torch.inference_mode():
                lp = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float()
                lm = mm(ids, mask, expert=rows).logits.float()
                lb = base(input_ids=ids, attention_mask=mask).logits.float()
            rec["logits_relerr_moa_vs_peft"] = float((lp - lm).norm() / lp.norm())
            rec["logits_reldiff_peft_vs_base"] = float((lp - lb).norm() / lp.norm())  # the adapters' own effect
        if "moa" in outs and "moa_v0" in outs:
            rec["match_moa_vs_moa_v0"] = float((outs["moa"] == outs["moa_v0"]).float().mean())
        if chosen:
            rec["routed_distinct_experts"] = int(torch.unique(chosen[-1]).numel())
        if "base" in med and "moa" in med:
            rec["moa_over_base"] = med["moa"] / med["base"]
        if "base_c" in med and "moa_c" in med:
            rec["moa_c_over_base_c"] = med["moa_c"] / med["base_c"]
        if "peft" in med and "moa_c" in med:
            rec["peft_over_moa_c"] = med["peft"] / med["moa_c"]
        if "moa_norc" in outs and "moa" in outs:
            rec["match_moa_vs_moa_norc"] = float((outs["moa"] == outs["moa_norc"]).float().mean())
        if "moa_c" in outs and "moa" in outs:
            rec["match_moa_c_vs_moa"] = float((outs["moa"] == outs["moa_c"]).float().mean())
        for v in ("moa_split_c", "moa_merged_c"):  # the decode layouts compute the same function
            if "moa_c" in outs and v in outs:
                rec[f"match_{v}_vs_moa_c"] = float((outs["moa_c"] == outs[v]).float().mean())
        if "peft" in med and "moa" in med:
            rec["peft_over_moa"] = med["peft"] / med["moa"]
        if "moa_v0" in med and "moa" in med:
            rec["moa_v0_over_moa"] = med["moa_v0"] / med["moa"]
        results.append(rec)
        print(f"  N={n}: " + ", ".join(f"{v} {med[v] * 1e3:.1f} ms" for v in variants), file=sys.stderr, flush=True)
        del pm, mm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": args.shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "batch": B, "prompt_len": P, "new_tokens": G, "repeats": args.repeats, "warmup": args.warmup,
            "machine": machine_info(device), "results": results}


def render(payload: dict) -> str:
    """Three tables: times (median [min-max] ms) and tokens/s; ratios per round; consistency checks."""
    variants = [v for v in VARIANTS if v in payload["results"][0]["median_s"]]
    head = (f"### Inference: shape `{payload['shape']}`, {payload['device']} {payload['dtype']}, batch {payload['batch']}, "
            f"prompt {payload['prompt_len']}, {payload['new_tokens']} new tokens, {payload['repeats']} interleaved rounds\n")

    def ms(ts: list[float]) -> str:
        return f"{median(ts) * 1e3:,.1f} [{min(ts) * 1e3:,.1f}-{max(ts) * 1e3:,.1f}]"

    times = [[r["experts"]] + [ms(r["all_s"][v]) for v in variants] + [r["gen_tokens_per_s"][v] for v in variants]
             for r in payload["results"]]
    out = [head, "Time of one generate call, ms: median [min-max]; generated tokens/s from the median.\n",
           markdown_table(["N"] + [f"{v} ms" for v in variants] + [f"{v} tok/s" for v in variants], times)]
    ratios = [(a, b) for a, b in RATIOS if a in variants and b in variants]
    if ratios:
        rows = []
        for r in payload["results"]:
            row = [r["experts"]]
            for a, b in ratios:
                q = [x / y for x, y in zip(r["all_s"][a], r["all_s"][b])]
                row.append(f"{median(q):.3g} [{min(q):.3g}-{max(q):.3g}]")
            rows.append(row)
        out += ["\nTime ratios per round (the two calls ran in the same round): median [min-max].\n",
                markdown_table(["N"] + [f"{a}/{b}" for a, b in ratios], rows)]
    if "prefill_s" in payload["results"][0]:
        rows = [[r["experts"]] + [ms(r["prefill_s"][v]) for v in variants]
                + [f"{r['decode_step_s'][v] * 1e3:.3f}" for v in variants] for r in payload["results"]]
        out += ["\nThe prompt pass alone (the same call generating one token; MoA's includes its routing), ms: median "
                "[min-max]; decode ms per step = (median whole call - median prompt pass) / (new tokens - 1).\n",
                markdown_table(["N"] + [f"{v} prompt ms" for v in variants] + [f"{v} decode ms/step" for v in variants],
                               rows)]
    checks = ["router_accuracy", "layers_agree", "routed_distinct_experts", "match_moa_forced_vs_peft",
              "match_moa_vs_moa_norc", "match_moa_c_vs_moa", "match_moa_split_c_vs_moa_c",
              "match_moa_merged_c_vs_moa_c", *(f"match_{f}_vs_{r}" for f, r in FOLDED_TWINS.items()),
              "logits_relerr_moa_vs_peft", "logits_reldiff_peft_vs_base"]
    checks += [f"match_{g}_vs_{hf}" for g, hf in GRAPHED_TWINS if f"match_{g}_vs_{hf}" in payload["results"][0]]
    rows = [[r["experts"]] + [r.get(c, "-") for c in checks] for r in payload["results"]]
    warm = [v for v in variants if v.endswith("_c") or v in GRAPHED]  # the *_sg twins reuse their plain variant's
    if warm:  # the first call of a compiled (or captured) variant compiles: its time minus the median call's
        checks += [f"{v} compile s" for v in warm]
        for row, r in zip(rows, payload["results"]):
            row += [r["warmup_s"][v] - r["median_s"][v] for v in warm]
    if any("fold_s" in r for r in payload["results"]):  # moa_gcf's fold when the expert changes
        checks.append("fold ms")
        for row, r in zip(rows, payload["results"]):
            f = r.get("fold_s")
            row.append("-" if f is None else f"{f['median'] * 1e3:.2f} [{f['min'] * 1e3:.2f}-{f['max'] * 1e3:.2f}]")
    out += ["\nChecks (see the module docstring).\n", markdown_table(["N"] + checks, rows)]
    return "\n".join(out) + "\n"


def generation_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The batch being generated: rows, prompt tokens, new tokens (shared with profile_decode.py)."""
    ap.add_argument("--batch", default=16, type=int)
    ap.add_argument("--prompt-len", default=128, type=int)
    ap.add_argument("--new-tokens", default=32, type=int)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = generation_args(shape_args(__doc__, experts="1,2,4,8,16"))
    ap.add_argument("--repeats", default=5, type=int)
    ap.add_argument("--warmup", default=1, type=int)
    ap.add_argument("--prefill-rounds", default=0, type=int,
                    help="also time each variant generating one token (the prompt pass alone), in this many "
                         "interleaved rounds, and report the decode time per step as (whole - prompt) / (tokens - 1)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), type=lambda s: s.split(","))
    ap.add_argument("--routers", default="fit", choices=["fit", "random"],
                    help="fit: routers trained on the domain-marked prompts first (as after MoA stage 2); random: untrained")
    ap.add_argument("--router-steps", default=60, type=int, help="Adam steps of the router fit")
    ap.add_argument("--fused", default="auto", choices=sorted(FUSED),
                    help="the moa variants' routed-LoRA path: auto (fused kernels on CUDA with triton), on (also on the "
                         "CPU, through the torch formulation), off (reference path; what moa_ref always uses)")
    ap.add_argument("--given-order", action="store_true",
                    help="warm up (compile) and time the variants in --variants' order, not the table's: run the two "
                         "orders in separate processes to see whether compiling first or second changes a compile time")
    ap.add_argument("--compile-mode", default="auto", help="for *_c: auto (reduce-overhead on GPU, default on CPU)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    alone = [v for v in args.variants if v.endswith(SKIP_GUARDS) and v.removesuffix(SKIP_GUARDS) not in args.variants]
    if alone:  # the twin must find its step compiled, with its guards, by the plain variant's warm-up
        ap.error(f"{', '.join(alone)} need their plain variant in --variants too (add "
                 f"{', '.join(v.removesuffix(SKIP_GUARDS) for v in alone)})")
    return run_shapes(args, "inference", run_shape, render)


if __name__ == "__main__":
    raise SystemExit(main())
