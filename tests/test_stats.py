"""Confidence intervals: BLEU from summed statistics, bootstrap intervals with a known answer, paired differences."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from moa_core import metrics
from moa_core.stats import RowStats, bleu_from_counts, estimate, paired_difference


def test_bleu_from_summed_row_statistics_equals_sacrebleu_corpus_bleu():
    rng = random.Random(0)
    words = "the cat sat on a mat dog ran fast slow red blue".split()
    for _ in range(100):
        n = rng.randint(1, 6)
        preds = [" ".join(rng.choices(words, k=rng.randint(0, 8))) for _ in range(n)]
        refs = [" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(n)]
        summed = np.asarray(metrics.bleu_statistics(preds, refs)).sum(0)
        assert float(bleu_from_counts(summed)) == pytest.approx(metrics.bleu(preds, refs), abs=1e-9)


def _rows(rouge: list[float], nll_per_token: float = 1.0) -> RowStats:
    return RowStats(nll=[nll_per_token * 4] * len(rouge), tokens=[4] * len(rouge), bleu=[[1, 1, 1, 0, 0, 0, 1, 0, 0, 0]] * len(rouge),
                    rougeL=list(rouge), routed_ok=[1.0] * len(rouge))


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory_width():
    gen = np.random.default_rng(1)
    values = gen.normal(50.0, 10.0, size=400).tolist()
    est = estimate([{"d": _rows(values)}], ["d"], "rougeL", n_boot=4000, seed=0)["d"]
    se = np.std(values) / math.sqrt(len(values))
    assert est.value == pytest.approx(np.mean(values))
    assert est.low < est.value < est.high
    # the 95 % percentile interval of a mean is about +-1.96 standard errors
    assert (est.high - est.low) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_perplexity_interval_is_exact_when_every_token_has_the_same_loss():
    est = estimate([{"d": _rows([1.0] * 50, nll_per_token=math.log(7.0))}], ["d"], "ppl", n_boot=200)["d"]
    assert (est.value, est.low, est.high) == pytest.approx((7.0, 7.0, 7.0))


def test_seed_mean_and_per_seed_values():
    seeds = [{"d": _rows([10.0] * 20)}, {"d": _rows([20.0] * 20)}, {"d": _rows([30.0] * 20)}]
    est = estimate(seeds, ["d"], "rougeL", n_boot=200)
    assert est["d"].value == pytest.approx(20.0)
    assert est["d"].per_seed == pytest.approx((10.0, 20.0, 30.0))
    assert est["avg"].value == pytest.approx(20.0)


def test_paired_difference_cancels_row_difficulty():
    gen = np.random.default_rng(2)
    hard = gen.normal(40.0, 15.0, size=200)  # rows differ a lot in difficulty ...
    a = [{"d": _rows((hard + 0.5).tolist())}]  # ... but A is 0.5 better on every row
    b = [{"d": _rows(hard.tolist())}]
    diff = paired_difference(a, b, ["d"], "rougeL", n_boot=500)
    assert diff.value == pytest.approx(0.5)
    assert (diff.low, diff.high) == pytest.approx((0.5, 0.5))
    assert diff.verdict == "ahead"
    # the unpaired intervals overlap widely: only the paired test can see this difference
    ea, eb = estimate(a, ["d"], "rougeL")["d"], estimate(b, ["d"], "rougeL")["d"]
    assert ea.low < eb.high
    same = paired_difference(b, b, ["d"], "rougeL", n_boot=200)
    assert same.verdict == "within noise" and same.value == 0.0


def test_lower_perplexity_is_ahead():
    a = [{"d": _rows([1.0] * 30, nll_per_token=1.0)}]
    b = [{"d": _rows([1.0] * 30, nll_per_token=1.2)}]
    assert paired_difference(a, b, ["d"], "ppl", n_boot=200).verdict == "ahead"
    assert paired_difference(b, a, ["d"], "ppl", n_boot=200).verdict == "behind"


def test_average_router_accuracy_is_pooled_over_rows_like_the_results_table():
    # 1 row routed wrong in a 2-row domain, 8 right in an 8-row domain: 9 / 10 = 90 %, not (50 + 100) / 2 = 75 %
    small = RowStats(nll=[1.0] * 2, tokens=[1] * 2, routed_ok=[0.0, 1.0])
    large = RowStats(nll=[1.0] * 8, tokens=[1] * 8, routed_ok=[1.0] * 8)
    est = estimate([{"s": small, "l": large}], ["s", "l"], "router_acc", n_boot=200)
    assert est["avg"].value == pytest.approx(90.0)
    assert est["s"].value == pytest.approx(50.0) and est["l"].value == pytest.approx(100.0)
