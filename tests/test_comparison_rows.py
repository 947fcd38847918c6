"""The comparison table's routing rows: PEFT Arrow over the stage-1 experts (PEFT's own API), the oracle row,
and "% of oracle"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moa_core.arrow import build_arrow
from moa_core.batching import collate, encode_prompt
from moa_core.evaluate import evaluate_system
from moa_core.metrics import EvalRow
from moa_core.oracle import oracle_table_markdown, percent_of_oracle
from test_mixture import _random_peft_adapter

PROMPTS = ["What is fever?", "def add(a, b):", "Shares fell as the bank cut its forecast."]


def _fresh(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def adapters(tmp_path: Path, tiny_model_dir: Path):
    return [_random_peft_adapter(_fresh(tiny_model_dir), tmp_path / f"a{k}", seed=k, r=8, alpha=16.0)
            for k in range(3)]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_arrow_of_one_adapter_is_that_adapter_and_of_several_a_mix(adapters, tiny_model_dir, tiny_tok):
    b = collate([{"input_ids": encode_prompt(tiny_tok, p, 64)} for p in PROMPTS], tiny_tok.pad_token_id, left_pad=True)
    single = PeftModel.from_pretrained(_fresh(tiny_model_dir), str(adapters[0])).eval()
    arrow_one = build_arrow(_fresh(tiny_model_dir), adapters[:1], ["a"], top_k=3, seed=0)
    ours = arrow_one(b["input_ids"], b["attention_mask"]).logits
    torch.testing.assert_close(ours, _logits(single, b), atol=1e-5, rtol=1e-5)
    base = _logits(_fresh(tiny_model_dir), b)
    torch.testing.assert_close(arrow_one(b["input_ids"], b["attention_mask"], adapters_off=True).logits, base)

    arrow = build_arrow(_fresh(tiny_model_dir), adapters, ["a", "b", "c"], top_k=2, seed=0)
    mixed = arrow(b["input_ids"], b["attention_mask"]).logits
    for k, path in enumerate(adapters):
        alone = _logits(PeftModel.from_pretrained(_fresh(tiny_model_dir), str(path)).eval(), b)
        assert not torch.allclose(mixed, alone, atol=1e-4), f"Arrow equals adapter {k} alone"
    assert not torch.allclose(mixed, base, atol=1e-4)
    with pytest.raises(ValueError, match="routes every token itself"):
        arrow(b["input_ids"], b["attention_mask"], expert=torch.zeros(3, dtype=torch.long))


def test_arrow_is_evaluated_like_the_mixtures(adapters, tiny_model_dir, tiny_tok, tiny_cfg):
    from conftest import toy_records

    arrow = build_arrow(_fresh(tiny_model_dir), adapters, ["x", "y", "z"], top_k=2, seed=0)
    test = {name: recs[:3] for name, recs in zip(["x", "y", "z"], toy_records(3, 3))}
    ev = evaluate_system(arrow, tiny_tok, test, tiny_cfg, "token")
    assert set(ev.per_domain) == {"x", "y", "z"}
    assert all(set(v) == {"ppl", "bleu", "rougeL"} and v["ppl"] > 1 for v in ev.per_domain.values())
    assert ev.router_accuracy is None  # Arrow has no per-prompt decision to score
    base = evaluate_system(arrow, tiny_tok, test, tiny_cfg, "off")
    assert base.per_domain["x"]["ppl"] != ev.per_domain["x"]["ppl"]


def _row(name: str, ppl: float, bleu: float, rouge: float, acc: float | None = None) -> EvalRow:
    return EvalRow(name, {"d1": {"ppl": ppl, "bleu": bleu, "rougeL": rouge}, "d2": {"ppl": ppl, "bleu": bleu, "rougeL": rouge}},
                   router_accuracy=acc)


def test_percent_of_oracle_is_100_at_the_oracle_and_less_when_worse():
    rows = [_row("base", 20, 1, 5), _row("moa-oracle", 4, 20, 40), _row("moa", 5, 15, 30, 0.9),
            _row("peft-arrow", 8, 10, 20)]
    pct = percent_of_oracle(rows, "moa-oracle", ["moa", "peft-arrow"])
    assert pct["moa"] == pytest.approx({"ppl": 80.0, "bleu": 75.0, "rougeL": 75.0})
    assert pct["peft-arrow"] == pytest.approx({"ppl": 50.0, "bleu": 50.0, "rougeL": 50.0})
    assert "base" not in pct
    md = oracle_table_markdown(pct, {"moa": 0.9, "peft-arrow": None}, "moa-oracle")
    assert "| moa | 90.00 | 80.0 | 75.0 | 75.0 |" in md and "| peft-arrow | – | 50.0 |" in md
    with pytest.raises(ValueError, match="no oracle row"):
        percent_of_oracle(rows[2:], "moa-oracle", ["moa"])
