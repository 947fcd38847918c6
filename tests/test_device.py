"""The recipes on the machine's accelerator (CUDA when present, else CPU): a mixture built on a model that
lives on the device trains, routes, generates and evaluates there. Also runnable without pytest
(`python tests/test_device.py`) on a GPU machine that has only torch, transformers, peft and pydantic."""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

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
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE)
    for method in ("moa", "mosld", "modula-res"):
        mm = build_mixture(cfg, method, base if method == "moa" else
                           AutoModelForCausalLM.from_pretrained(model_dir).to(DEVICE), "tiny")
        assert all(p.device.type == DEVICE.type for p in mm.parameters()), method
        recs = toy_records(n=8)
        res = train_mixture(mm, tok, recs, cfg, steps=2, lr=1e-2, train_experts=True, train_routers=True,
                            route="gold" if method == "moa" else "learned", eta=0.1)
        assert math.isfinite(res.final_loss), (method, res.final_loss)
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


def test_mixture_trains_and_evaluates_on_the_device(tiny_model_dir: Path) -> None:
    check_mixture_trains_and_evaluates_on_the_device(tiny_model_dir)


def test_routing_cache_reuse_on_the_device(tiny_model_dir: Path) -> None:
    check_routing_cache_reuse_on_the_device(tiny_model_dir)


if __name__ == "__main__":
    from moa_core.base_model import build_tiny_model

    with tempfile.TemporaryDirectory() as d:
        tiny = build_tiny_model(Path(d) / "tiny")
        check_mixture_trains_and_evaluates_on_the_device(tiny)
        check_routing_cache_reuse_on_the_device(tiny)
    print(f"device test passed on {DEVICE} ({torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'cpu'})")
