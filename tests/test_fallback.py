"""The out-of-domain fallback: routing confidence, the calibrated threshold, answers by the base model below it,
and the evaluate stage's report on packaged out-of-domain text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_raw_params
from moa_core.answer import answer
from moa_core.batching import collate, encode_prompt
from moa_core.config import ConfigError, parse_config
from moa_core.fallback import (calibrate_threshold, evaluate_fallback, fallback_report, out_of_domain_instructions,
                               prompt_confidences, resolve_threshold, routing_confidence)
from moa_core.model import save_mixture
from test_export import PROMPTS, spread_routers, trained_like_moa


def test_confidence_is_the_deciding_routers_probability_of_the_chosen_expert():
    # 2 layers, 1 prompt, 2 experts: layer 0 prefers expert 1 (p = 0.731), the last layer expert 0 (p = 0.881)
    logits = torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]]])
    chosen = torch.tensor([0])
    assert routing_confidence(logits, chosen, "last").item() == pytest.approx(0.8808, abs=1e-4)
    assert routing_confidence(logits, chosen, "vote").item() == pytest.approx((0.8808 + 0.2689) / 2, abs=1e-4)


def test_calibration_keeps_99_percent_routed():
    confs = [i / 200 for i in range(1, 201)]  # 200 prompts: at most 2 may fall below the threshold
    t = calibrate_threshold(confs)
    assert t == pytest.approx(3 / 200)
    assert sum(c >= t for c in confs) / len(confs) >= 0.99
    assert sum(c >= t + 1e-6 for c in confs) / len(confs) < 0.99  # the highest such threshold
    assert calibrate_threshold([0.7] * 10) == 0.7  # ties stay routed
    with pytest.raises(ValueError, match="no in-domain"):
        calibrate_threshold([])


def test_report_precision_recall_and_kept_accuracy():
    r = fallback_report(0.5, gold=["a", "a", "b", "b"], routed=["a", "b", "b", "b"], in_conf=[0.9, 0.9, 0.4, 0.8],
                        ood_conf=[0.1, 0.2, 0.6])
    assert (r.precision, r.recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (r.in_domain_kept, r.router_accuracy, r.router_accuracy_no_fallback) == (0.75, 0.5, 0.75)
    none_fell = fallback_report(0.05, gold=["a"], routed=["a"], in_conf=[0.9], ood_conf=[0.1])
    assert (none_fell.precision, none_fell.recall) == (None, 0.0)  # no fallback: precision is undefined, not 100 %


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (False, "off"), ("off", "off"), (0.4, 0.4), (0, 0)])
def test_threshold_setting_is_validated(tiny_model_dir, value, expected):
    raw = tiny_raw_params(tiny_model_dir)
    raw["router"]["fallback_threshold"] = value
    assert parse_config(raw).router.fallback_threshold == expected


@pytest.mark.parametrize("value", [1.5, -0.1, "sometimes", True])
def test_bad_threshold_is_refused_naming_the_key(tiny_model_dir, value):
    raw = tiny_raw_params(tiny_model_dir)
    raw["router"]["fallback_threshold"] = value
    with pytest.raises(ConfigError, match="router.fallback_threshold"):
        parse_config(raw)


def test_yaml_off_reads_as_off(tiny_model_dir, tmp_path):
    text = yaml.safe_dump(tiny_raw_params(tiny_model_dir), sort_keys=False).replace(
        "fallback_threshold: auto", "fallback_threshold: off")
    assert parse_config(yaml.safe_load(text)).router.fallback_threshold == "off"


def test_prompts_below_the_threshold_are_answered_by_the_base_model(tiny_cfg, tiny_base, tiny_tok):
    mm = trained_like_moa(tiny_cfg, tiny_base, b_std=1.0)
    spread_routers(mm, tiny_tok, PROMPTS)
    _, confs = prompt_confidences(mm, tiny_tok, PROMPTS, 64, 8)
    threshold = sorted(confs)[2]  # the two least confident prompts fall back
    got = answer(mm, tiny_tok, PROMPTS, max_length=64, max_new_tokens=5, threshold=threshold)
    routed = answer(mm, tiny_tok, PROMPTS, max_length=64, max_new_tokens=5, threshold=None)
    fell = [c < threshold for c in confs]
    assert sum(fell) == 2
    for a, r, f, c, prompt in zip(got, routed, fell, confs, PROMPTS):
        assert a.confidence == pytest.approx(c, abs=1e-6)
        if not f:
            assert (a.expert, a.text) == (r.expert, r.text)
            continue
        assert a.expert == "base"
        b = collate([{"input_ids": encode_prompt(tiny_tok, prompt, 64)}], tiny_tok.pad_token_id, left_pad=True)
        seqs, _ = mm.generate(b["input_ids"], b["attention_mask"], adapters_off=True, max_new_tokens=5,
                              do_sample=False, pad_token_id=tiny_tok.pad_token_id, eos_token_id=tiny_tok.eos_token_id)
        assert a.text == tiny_tok.decode(seqs[0, b["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert any(r.text != a.text for r, a, f in zip(routed, got, fell) if f), "the base model answers as the expert"


def test_auto_threshold_and_report_on_out_of_domain_bbc(tmp_path: Path, tiny_model_dir, tiny_cfg, tiny_base, tiny_tok):
    from moa_core.data import curate, write_curated
    from moa_core.sources import load_source
    from tasks.common import StageContext
    from tasks.fallback_eval import run_fallback_eval

    raw = tiny_raw_params(tiny_model_dir)
    raw["curate"]["max_rows"] = 40
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ctx = StageContext.load(tmp_path / "params.yaml")
    for d in ctx.cfg.domains:
        write_curated(ctx.layout.curated(d.name), curate(load_source(d.source).rows, d.name, ctx.cfg.curate), {})

    ood = out_of_domain_instructions(ctx.cfg, per_category=5)
    assert sorted(ood) == ["entertainment", "politics", "tech"]  # business and sport are domains
    assert all(len(v) == 5 and all(f"{c} news" in p for p in v) for c, v in ood.items())

    mm = trained_like_moa(tiny_cfg, tiny_base, b_std=1.0)
    spread_routers(mm, tiny_tok, PROMPTS)
    val = ctx.splits("val")
    threshold = resolve_threshold(mm, tiny_tok, val, ctx.cfg)
    _, val_conf = prompt_confidences(mm, tiny_tok, [r.instruction for v in val.values() for r in v], 128, 16)
    assert sum(c >= threshold for c in val_conf) / len(val_conf) >= 0.99
    assert resolve_threshold(mm, tiny_tok, val, ctx.cfg.model_copy(update={"router": ctx.cfg.router.model_copy(
        update={"fallback_threshold": "off"})})) is None

    mm.spec.fallback_threshold = threshold
    save_mixture(mm, ctx.layout.mixture("moa"))
    test = ctx.splits("test")
    result = run_fallback_eval(ctx, test)
    assert json.loads((ctx.layout.metrics / "fallback.json").read_text()) == result
    assert result["in_domain"] == sum(len(v) for v in test.values())
    assert result["out_of_domain"] == 3 * max(len(v) for v in test.values())
    assert result["threshold"] == threshold
    # the same numbers as routing both sets by hand
    again = evaluate_fallback(mm, tiny_tok, test, out_of_domain_instructions(ctx.cfg, max(len(v) for v in test.values())),
                              threshold, ctx.cfg)
    assert again.as_dict() == {k: v for k, v in result.items() if k not in ("out_of_domain_categories", "answered_by")}
    assert result["answered_by"] == "base model"


def _modula(cfg, base, method: str):
    """A MoDULA mixture with every expert (universal included) and router non-trivial, as after training."""
    from moa_core.methods import build_mixture

    mm = build_mixture(cfg, method, base, "tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in mm.wrapped.values():
            w.lora_B.copy_(torch.randn(w.lora_B.shape, generator=g))
            if w.universal_B is not None:
                w.universal_B.copy_(torch.randn(w.universal_B.shape, generator=g))
        for r in mm.routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.3)
    return mm


def _greedy(mm, tok, prompt: str, **route) -> str:
    b = collate([{"input_ids": encode_prompt(tok, prompt, 64)}], tok.pad_token_id, left_pad=True)
    seqs, _ = mm.generate(b["input_ids"], b["attention_mask"], max_new_tokens=5, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **route)
    return tok.decode(seqs[0, b["input_ids"].shape[1]:], skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["modula-flan", "modula-res"])
def test_modula_falls_back_to_its_universal_expert(method, tiny_cfg, tiny_base, tiny_tok):
    from moa_core.fallback import token_confidence

    mm = _modula(tiny_cfg, tiny_base, method)
    # the confidence pools over each prompt's own tokens: padding in a batch changes nothing
    alone = [prompt_confidences(mm, tiny_tok, [p], 64, 1)[1][0] for p in PROMPTS[:3]]
    _, batched = prompt_confidences(mm, tiny_tok, PROMPTS[:3], 64, 3)
    assert batched == pytest.approx(alone, abs=1e-5)
    assert all(1 / len(mm.spec.experts) < c < 1 for c in batched)
    ids = collate([{"input_ids": encode_prompt(tiny_tok, PROMPTS[0], 64)}], tiny_tok.pad_token_id)
    with torch.no_grad():
        for r in mm.routers:
            r.weight.zero_()  # uniform gates: the confidence is 1 / E exactly
        assert token_confidence(mm, ids["input_ids"], ids["attention_mask"]).item() == pytest.approx(1 / mm.routers[-1].num_experts)

    mm = _modula(tiny_cfg, tiny_base.__class__.from_pretrained(tiny_base.name_or_path).eval(), method)
    routed = answer(mm, tiny_tok, PROMPTS[:2], max_length=64, max_new_tokens=5, threshold=None)
    assert [a.expert for a in routed] == ["(token-level mixture)"] * 2 and all(a.confidence for a in routed)
    fell = answer(mm, tiny_tok, PROMPTS[:2], max_length=64, max_new_tokens=5, threshold=1.01)
    universal = {"expert": torch.tensor([0])} if method == "modula-flan" else {"experts_off": True}
    for a, r, prompt in zip(fell, routed, PROMPTS[:2]):
        assert (a.expert, a.confidence) == ("universal", r.confidence)
        assert a.text == _greedy(mm, tiny_tok, prompt, **universal)
    assert any(a.text != r.text for a, r in zip(fell, routed)), "the universal expert answers as the mixture"
    assert [a.expert for a in answer(mm, tiny_tok, PROMPTS[:1], max_length=64, max_new_tokens=2,
                                     forced=["universal"])] == ["universal"]
    with pytest.raises(ValueError, match="per token"):
        answer(mm, tiny_tok, PROMPTS[:1], max_length=64, max_new_tokens=2, forced=["medicine"])


def test_mosld_has_no_fallback(tiny_cfg, tiny_base, tiny_tok):
    from moa_core.methods import build_mixture

    mm = build_mixture(tiny_cfg, "mosld", tiny_base, "tiny")
    assert resolve_threshold(mm, tiny_tok, {"code": [{"instruction": "x"}]}, tiny_cfg) is None
    got = answer(mm, tiny_tok, PROMPTS[:1], max_length=64, max_new_tokens=2, threshold=0.5)
    assert (got[0].expert, got[0].confidence) == ("(token-level mixture)", None)
    with pytest.raises(ValueError, match="unknown expert 'universal'"):
        answer(mm, tiny_tok, PROMPTS[:1], max_length=64, max_new_tokens=2, forced=["universal"])
