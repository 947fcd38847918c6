"""The training batch sources: balanced (each domain equally often) and natural (the pooled rows)."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import torch

from moa_core.batching import balanced_batches, natural_batches


def _domains(sizes: list[int]) -> list[list[dict[str, list[int]]]]:
    """Domain k's row i is the one-token sequence [1000 k + i], so a batch says which rows it holds."""
    return [[{"input_ids": [1000 * k + i], "labels": [1000 * k + i]} for i in range(n)] for k, n in enumerate(sizes)]


def _rows(batches) -> list[int]:
    return [int(t) for b in batches for t in b["input_ids"][:, 0]]


def test_natural_batches_pass_every_pooled_row_once_per_epoch():
    data = _domains([30, 10])  # 40 rows: 5 batches of 8 are exactly one epoch
    epoch = list(islice(natural_batches(data, 8, seed=0, pad_id=0), 5))
    assert sorted(_rows(epoch)) == sorted(r["input_ids"][0] for d in data for r in d)
    counts = Counter(int(e) for b in epoch for e in b["expert"])
    assert counts == {0: 30, 1: 10}  # each domain in proportion to its size
    assert all((b["expert"] == b["input_ids"][:, 0] // 1000).all() for b in epoch)


def test_balanced_batches_give_every_domain_the_same_share_of_each_batch():
    for b in islice(balanced_batches(_domains([30, 10]), 8, seed=0, pad_id=0), 12):
        assert Counter(b["expert"].tolist()) == {0: 4, 1: 4}


def test_one_domain_gets_the_same_batches_either_way_and_both_resume_at_a_step():
    one = _domains([13])
    for a, b in zip(islice(natural_batches(one, 4, 7, 0), 9), islice(balanced_batches(one, 4, 7, 0), 9)):
        assert torch.equal(a["input_ids"], b["input_ids"])
    two = _domains([13, 5])
    for source in (natural_batches, balanced_batches):
        fresh = list(islice(source(two, 4, 3, 0), 8))
        resumed = list(islice(source(two, 4, 3, 0, start_step=5), 3))
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(fresh[5:], resumed))


def test_lora_mixed_trains_on_the_sampling_params_yaml_names(tiny_model_dir, tiny_tok, tiny_cfg, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import toy_records
    from moa_core.train import train_peft_lora

    recs = toy_records(2, 12)
    recs[1] = recs[1][:2]  # unequal domains: the two samplings draw different rows
    weights = {}
    for sampling in ("balanced", "natural"):
        cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"mixed_sampling": sampling})})
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        train_peft_lora(base, tiny_tok, recs, cfg, 3, tmp_path / sampling)
        weights[sampling] = load_file(tmp_path / sampling / "adapter_model.safetensors")
    assert any(not torch.equal(weights["balanced"][k], weights["natural"][k]) for k in weights["balanced"])
