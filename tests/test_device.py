"""The recipes on the machine's accelerator (CUDA when present, else CPU): a mixture built on a model that
lives on the device trains, routes, generates and evaluates there. Also runnable without pytest
(`python tests/test_device.py`) on a GPU machine that has only torch, transformers, peft and pydantic."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_raw_params, toy_records  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
try:
    import rouge_score  # noqa: F401
    import sacrebleu  # noqa: F401

    HAVE_TEXT_METRICS = True
except ImportError:
    HAVE_TEXT_METRICS = False


def check_mixture_trains_and_evaluates_on_the_device(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa_core.config import parse_config
    from moa_core.evaluate import evaluate_system
    from moa_core.methods import build_mixture
    from moa_core.train import train_mixture

    raw = tiny_raw_params(model_dir)
    raw["domains"] = {d: {"source": {"kind": "builtin", "name": "humaneval"}} for d in ("alpha", "beta", "gamma")}
    cfg = parse_config(raw, profile="quick")
    # 3 domains x 2 rows: MoA's gold-routed batches come in expert-major blocks (the groups' blocked path, its layout
    # asserted on the device)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 6})})
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE)
    import moa_core.lora_kernels as lk

    real_group, grouped = lk.blocked_group, []
    for method in ("moa", "mosld", "modula-res"):
        mm = build_mixture(cfg, method, base if method == "moa" else
                           AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE), "tiny")
        assert all(p.device.type == DEVICE.type for p in mm.parameters()), method
        recs = toy_records(n=8)
        grouped.clear()
        lk.blocked_group = lambda *a: grouped.append(a[0].device) or real_group(*a)
        try:
            res = train_mixture(mm, tok, recs, cfg, steps=2, lr=1e-2, train_experts=True, train_routers=True,
                                route="gold" if method == "moa" else "learned", eta=0.1)
        finally:
            lk.blocked_group = real_group
        assert math.isfinite(res.final_loss), (method, res.final_loss)
        assert bool(grouped) == (method == "moa") and all(d.type == DEVICE.type for d in grouped), method
        ids = tok(["alpha question 1", "beta question 2"], return_tensors="pt", padding=True).to(DEVICE)
        seqs, expert = mm.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=4, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
        assert seqs.device.type == DEVICE.type and seqs.shape[1] == ids["input_ids"].shape[1] + 4, method
        if HAVE_TEXT_METRICS:  # the GPU image lacks sacrebleu/rouge-score; the CPU install has them
            test = {d: [{"instruction": r["instruction"], "response": r["response"]} for r in rs[:3]]
                    for d, rs in zip(("alpha", "beta", "gamma"), recs)}
            ev = evaluate_system(mm, tok, test, cfg, "router" if method == "moa" else "token")
            assert all(math.isfinite(v["ppl"]) for v in ev.per_domain.values()), (method, ev.per_domain)


def check_routing_cache_reuse_on_the_device(model_dir: Path) -> None:
    """MoA generate with the routing pass's cache as the prompt cache (dynamic and static) gives the tokens and
    scores of routing followed by a full prefill, on the device, with left padding and with rows run again."""
    from transformers import AutoModelForCausalLM

    from moa_core.config import parse_config
    from moa_core.methods import build_mixture

    raw = tiny_raw_params(model_dir)
    raw["domains"] = {d: {"source": {"kind": "builtin", "name": "humaneval"}} for d in ("alpha", "beta", "gamma")}
    torch.manual_seed(0)
    mm = build_mixture(parse_config(raw, profile="quick"), "moa",
                       AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE), "tiny")
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.normal_(std=0.2)
    ids = torch.randint(3, 250, (8, 12), device=DEVICE)
    mask = torch.ones_like(ids)
    ids[:3, :4], mask[:3, :4] = 0, 0
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    fresh, _ = mm.generate(ids, mask, reuse_routing_cache=False, **gen)
    for extra in ({}, {"cache_implementation": "static"}):
        reused, _ = mm.generate(ids, mask, **gen, **extra)
        assert torch.equal(reused.sequences, fresh.sequences), extra
        for a, b in zip(reused.scores, fresh.scores):
            finite = torch.isfinite(b)
            assert torch.allclose(a[finite], b[finite], atol=1e-4), (extra, float((a[finite] - b[finite]).abs().max()))


def check_routed_generation_under_cuda_graphs(model_dir: Path, fused: bool | None = None,
                                              compile_mode: str = "reduce-overhead", layout: str = "fused",
                                              merged_cublas: bool = False, decoder: bool = False,
                                              prompt_shapes: int = 0, fold: bool = False) -> None:
    """Routed MoA generation with HF's compiled decode step (`reduce-overhead`: CUDA graphs, captured at the first
    call) gives, token for token, what eager generation gives with each row's expert given, also when the batch
    then holds another number of distinct experts (3 at capture, then 1, 8, 3): the expert per row is graph
    input, not captured state. fp32, experts far apart, routers fitted so that each row's domain decides its
    expert. fused: None = the fused kernels where they apply (CUDA with triton), False = the reference path.
    layout: the graphed calls' decode layout (`lora_kernels.DECODE_LAYOUT`); the eager ones always run the one-kernel
    layout ("fused"), so the "split", "merged" and "augmented" cases also say that those layouts generate the same
    tokens.
    merged_cublas: the merged layout's groups all take its cuBLAS path (on the tiny model they all take the Triton
    GEMM by default: their weights are small). decoder: the graphed calls are `generate_greedy` (moa_core.graph_decode:
    the whole step captured once, replayed for every later call) instead of HF's compiled generate; prompt_shapes:
    the decoder's, its routing pass also captured once (every batch here has one shape) and replayed. fold: with the
    decoder, `fold_single_expert` on: the batch of one expert decodes with it folded into the weights (a second
    decode graph), the others routed."""
    from transformers import AutoModelForCausalLM, CompileConfig

    from moa_core import lora_kernels

    from moa_core.config import parse_config
    from moa_core.methods import build_mixture

    raw = tiny_raw_params(model_dir)
    raw["domains"] = {f"d{k}": {"source": {"kind": "builtin", "name": "humaneval"}} for k in range(8)}
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    mm = build_mixture(parse_config(raw, profile="quick"), "moa", base, "tiny")
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.normal_(std=0.3)
    V = base.config.vocab_size - 3  # each domain's prompts draw from its own 24 token ids
    vocab = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:8 * 24].view(8, 24) + 3

    def prompts(domains: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(len(domains) * 7 + sum(domains))
        d = torch.tensor(domains)
        ids = vocab[d].gather(1, torch.randint(0, 24, (len(domains), 10), generator=g)).to(DEVICE)
        return ids, torch.ones_like(ids)

    batches = {3: [0, 1, 2, 0, 1, 2, 0, 1], 1: [5] * 8, 8: list(range(8)), -3: [7, 3, 3, 6, 7, 6, 3, 7]}
    # MoA stage 2 with the experts frozen, on these very prompts: every layer's router learns each prompt's domain
    ids = torch.cat([prompts(d)[0] for d in batches.values()])
    gold = torch.tensor([k for d in batches.values() for k in d], device=DEVICE)
    mask = torch.ones_like(ids)
    params = mm.set_trainable(routers=True)
    opt = torch.optim.Adam(params, lr=3e-2)
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        mm(ids, mask, expert=gold, eta=1.0, pool_mask=mask).aux_loss.backward()
        opt.step()
    mm.set_trainable()
    mm.eval()
    cc = CompileConfig(mode=compile_mode, fullgraph=True)
    cc._compile_all_devices = True
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
               return_dict_in_generate=True)
    mm.lora_fusion.enabled = fused
    merged_config = dict(lora_kernels.MERGED_CONFIG)
    if merged_cublas:  # every group of the merged layout on its other path: cuBLAS over the stacked weight + split kernels
        lora_kernels.MERGED_CONFIG["max_fused_weight"] = 0
    if decoder:
        from moa_core.graph_decode import GraphDecoder

        mm.graph_decoder = GraphDecoder(mm.model, prompt_shapes=prompt_shapes)
        mm.fold_single_expert = fold
    try:
        _generate_and_compare(mm, batches, prompts, cc, gen, fused, layout, decoder)
    finally:
        lora_kernels.MERGED_CONFIG.update(merged_config)


def _generate_and_compare(mm, batches, prompts, cc, gen, fused, layout, decoder) -> None:
    from moa_core import lora_kernels

    graphs = set()  # the decoder's graph per call: one, captured at the first and replayed by the others
    for name, domains in batches.items():
        ids, mask = prompts(domains)
        before = lora_kernels.DECODE_LAYOUT
        try:
            lora_kernels.DECODE_LAYOUT = layout
            if decoder:
                # the config's eos (the tiny model emits it: GPU runs 1-2 of this case did at row 0), where HF's
                # min_new_tokens would mask it: the reference below is plain greedy with the same eos
                graphed, chosen = mm.generate_greedy(ids, mask, gen["max_new_tokens"], pad_token_id=0)
                key, _, buf = mm.graph_decoder._kept
                assert buf.graph is not None, "generate_greedy did not capture its step"
                graphs.add(id(buf.graph))
                assert ("folded" in key[4]) == (mm.fold_single_expert and abs(name) == 1), (name, "folded or not")
                if mm.graph_decoder.prompt_shapes:  # the routing pass's graph: also one, for every call
                    (prompt,) = mm.graph_decoder._prompts.values()
                    assert prompt.graph is not None, "generate_greedy did not capture its routing pass"
                    graphs.add(id(prompt.graph))
                captured = (list(batches).index(name) >= 1) * mm.fold_single_expert  # the folded step's graph
                assert len(graphs) == 1 + bool(mm.graph_decoder.prompt_shapes) + captured, "a call captured anew"
            else:
                graphed, chosen = mm.generate(ids, mask, cache_implementation="static", compile_config=cc, **gen)
            assert torch.equal(chosen.cpu(), torch.tensor(domains)), (name, chosen, "the routers were not fitted")
            assert torch.unique(chosen).numel() == abs(name)
            lora_kernels.DECODE_LAYOUT = "fused"
            plain = {k: v for k, v in gen.items() if k != "min_new_tokens"} if decoder else gen
            eager, _ = mm.generate(ids, mask, expert=chosen, **plain)
        finally:
            lora_kernels.DECODE_LAYOUT = before
        if decoder:
            assert graphed.shape == eager.sequences.shape, (name, graphed.shape, eager.sequences.shape)
        same = (graphed if decoder else graphed.sequences) == eager.sequences
        if not bool(same.all()):
            row = int((~same).any(1).nonzero()[0])
            pytest.fail(f"fused={fused}, layout={layout}, decoder={decoder}, {abs(name)} distinct experts: graph "
                        f"replay differs from eager at {(~same).nonzero().tolist()[:5]}; row {row}: "
                        f"{(graphed if decoder else graphed.sequences)[row].tolist()} vs "
                        f"{eager.sequences[row].tolist()}")
        if decoder:
            continue  # generate_greedy returns tokens only
        for a, b in zip(graphed.scores, eager.scores):
            finite = torch.isfinite(b)
            assert torch.allclose(a[finite], b[finite], atol=1e-3), float((a[finite] - b[finite]).abs().max())


def check_graph_decoder_replays_padded_prompts_and_eos(model_dir: Path, prompt_shapes: int = 0) -> None:
    """moa_core.graph_decode on a plain model under real capture: left-padded prompts, a shorter prompt in the same
    cache (the same graph replayed), and an eos id that ends one row early give HF's greedy tokens. fp32, weights
    drawn wide so that the tiny model's tokens vary. prompt_shapes: the prompt pass captured too, one graph per
    prompt length (10, then 8 captured, and 8 replayed)."""
    from transformers import AutoModelForCausalLM

    from moa_core.graph_decode import GraphDecoder

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    dec = GraphDecoder(base, prompt_shapes=prompt_shapes)
    graphs = set()
    prompt_graphs = []
    eos = None
    for T in (10, 8, 8):
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(3, 250, (4, T), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :2] = mask[3, :1] = 0
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
        ref = base.generate(input_ids=ids, attention_mask=mask, **({"min_new_tokens": 6} if eos is None else {}), **gen)
        out = dec.generate(ids, mask, 6, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out, ref), (T, eos, out, ref)
        graphs.add(id(dec._kept[2].graph))
        if prompt_shapes:
            prompt_graphs.append(next(reversed(dec._prompts.values())).graph)
        eos = int(ref[0, T + 2])  # the next call: row 0's third token of this prompt length ends rows
    assert len(graphs) == 1 and None not in graphs
    if prompt_shapes:
        assert None not in prompt_graphs and prompt_graphs[0] is not prompt_graphs[1] is prompt_graphs[2]


def test_mixture_trains_and_evaluates_on_the_device(tiny_model_dir: Path) -> None:
    check_mixture_trains_and_evaluates_on_the_device(tiny_model_dir)


def test_routing_cache_reuse_on_the_device(tiny_model_dir: Path) -> None:
    check_routing_cache_reuse_on_the_device(tiny_model_dir)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("prompt_shapes", [0, 2])
def test_graph_decoder_replays_padded_prompts_and_eos(tiny_model_dir: Path, prompt_shapes: int) -> None:
    check_graph_decoder_replays_padded_prompts_and_eos(tiny_model_dir, prompt_shapes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("path", ["kernels", "kernels-split", "kernels-merged", "kernels-merged-cublas", "reference",
                                  "kernels-augmented", "decoder-kernels-merged", "decoder-reference",
                                  "decoder-prompts-kernels-merged", "decoder-folded-prompts-kernels-merged",
                                  "decoder-kernels-augmented", "decoder-prompts-kernels-augmented"])
def test_routed_generation_under_cuda_graphs_equals_eager(tiny_model_dir: Path, path: str) -> None:
    decoder = path.startswith("decoder-")
    path = path.removeprefix("decoder-")
    fold = path.startswith("folded-")
    path = path.removeprefix("folded-")
    prompt_shapes = int(path.startswith("prompts-"))
    path = path.removeprefix("prompts-")
    check_routed_generation_under_cuda_graphs(tiny_model_dir, fused=False if path == "reference" else None,
                                              layout="fused" if path in ("kernels", "reference") else path.split("-")[1],
                                              merged_cublas=path.endswith("cublas"), decoder=decoder,
                                              prompt_shapes=prompt_shapes, fold=fold)


if __name__ == "__main__":
    from moa_core.base_model import build_tiny_model

    with tempfile.TemporaryDirectory() as d:
        tiny = build_tiny_model(Path(d) / "tiny")
        check_mixture_trains_and_evaluates_on_the_device(tiny)
        check_routing_cache_reuse_on_the_device(tiny)
        if DEVICE.type == "cuda":
            check_routed_generation_under_cuda_graphs(tiny, fused=None)
            check_routed_generation_under_cuda_graphs(tiny, fused=False)
            check_routed_generation_under_cuda_graphs(tiny, fused=None, layout="merged", decoder=True)
            check_graph_decoder_replays_padded_prompts_and_eos(tiny)
    print(f"device test passed on {DEVICE} ({torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'cpu'})")
