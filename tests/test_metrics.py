"""moa_core.metrics and tasks.plots: values checked against hand computations."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from matplotlib.figure import Figure

from moa_core.metrics import (
    EvalRow,
    bleu,
    confusion_matrix,
    human_count,
    perplexity,
    results_from_json,
    results_table_markdown,
    results_to_json,
    rouge_l,
    router_accuracy,
    token_nll,
)
from tasks.plots import confusion_heatmap, loss_curve, metric_bars

DOMAINS = ["code", "medicine"]


def _rows() -> list[EvalRow]:
    return [
        EvalRow(
            system="base",
            per_domain={
                "code": {"ppl": 10.0, "bleu": 5.0, "rougeL": 20.0},
                "medicine": {"ppl": 20.0, "bleu": 7.0, "rougeL": 30.0},
            },
        ),
        EvalRow(
            system="moa",
            per_domain={
                "code": {"ppl": 4.0, "bleu": 12.5, "rougeL": 40.0},
                "medicine": {"ppl": 6.0, "bleu": 8.5, "rougeL": 35.0},
            },
            router_accuracy=0.875,
            trainable_params=1_843_200,
            train_seconds=12.34,
        ),
        EvalRow(
            system="lora-mixed",
            per_domain={
                "code": {"ppl": 5.0, "bleu": 15.0, "rougeL": 30.0},
                "medicine": {"ppl": 7.0, "bleu": 9.0, "rougeL": 31.0},
            },
            trainable_params=460_800,
            train_seconds=8.0,
        ),
    ]


# ------------------------------------------------------------------------------------------- text metrics

def test_identical_predictions_score_100() -> None:
    texts = ["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b"]
    assert bleu(texts, texts) == pytest.approx(100.0)
    assert rouge_l(texts, texts) == pytest.approx(100.0)


def test_disjoint_predictions_score_zero() -> None:
    preds = ["alpha beta gamma delta epsilon"]
    refs = ["one two three four five"]
    assert bleu(preds, refs) == pytest.approx(0.0, abs=1e-9)
    assert rouge_l(preds, refs) == pytest.approx(0.0, abs=1e-9)


def test_bleu_partial_overlap_matches_hand_computation() -> None:
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1 -> BLEU = (1/12) ** (1/4).
    value = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert value == pytest.approx(100.0 * (1 / 12) ** 0.25, abs=1e-6)


def test_rouge_l_partial_overlap_matches_hand_computation() -> None:
    # LCS("the cat on a mat", "the cat sat on the mat") = "the cat on mat" = 4 tokens.
    # P = 4/5, R = 4/6, F = 2PR / (P + R) = 8/11 (all words <= 3 chars, so stemming is a no-op).
    value = rouge_l(["the cat on a mat"], ["the cat sat on the mat"])
    assert value == pytest.approx(100.0 * 8 / 11, abs=1e-9)


def test_rouge_l_averages_over_examples() -> None:
    value = rouge_l(["the cat on a mat", "same words here"], ["the cat sat on the mat", "same words here"])
    assert value == pytest.approx(100.0 * (8 / 11 + 1.0) / 2, abs=1e-9)


@pytest.mark.parametrize("metric", [bleu, rouge_l])
def test_text_metrics_reject_bad_input(metric) -> None:
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
    with pytest.raises(ValueError, match="pair up"):
        metric(["a"], ["a", "b"])


# --------------------------------------------------------------------------------------- LM metrics

def test_token_nll_matches_manual_log_softmax_and_ignores_minus_100() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen)  # [B=2, T=4, V=5]
    labels = torch.tensor([[-100, 3, 1, -100], [2, 0, -100, 4]])
    nll_sum, n_tokens = token_nll(logits, labels)

    logp = torch.log_softmax(logits, dim=-1)
    expected = torch.zeros(2)
    counts = torch.zeros(2, dtype=torch.long)
    for b in range(2):
        for t in range(1, 4):  # position t-1 predicts label t
            if labels[b, t] != -100:
                expected[b] -= logp[b, t - 1, labels[b, t]]
                counts[b] += 1
    assert nll_sum.shape == (2,) and n_tokens.shape == (2,)
    assert torch.allclose(nll_sum, expected, atol=1e-6)
    assert n_tokens.tolist() == counts.tolist() == [2, 2]


def test_token_nll_all_ignored_row_is_zero() -> None:
    nll_sum, n_tokens = token_nll(torch.randn(1, 3, 4), torch.full((1, 3), -100))
    assert nll_sum.item() == 0.0 and n_tokens.item() == 0


def test_token_nll_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        token_nll(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_perplexity_of_uniform_logits_is_vocab_size() -> None:
    vocab = 7
    labels = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(1))
    labels[0, 2] = -100
    nll_sum, n_tokens = token_nll(torch.zeros(3, 6, vocab), labels)
    assert perplexity(nll_sum.sum().item(), int(n_tokens.sum())) == pytest.approx(vocab, rel=1e-5)


def test_perplexity_guards() -> None:
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(math.log(3.0) * 4, 4) == pytest.approx(3.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="at least one scored token"):
        perplexity(1.0, 0)


# -------------------------------------------------------------------------------------------- router

def test_confusion_matrix_and_accuracy() -> None:
    labels = ["code", "medicine", "finance"]
    gold = ["code", "code", "medicine", "finance", "finance", "finance"]
    pred = ["code", "finance", "medicine", "finance", "medicine", "finance"]
    assert confusion_matrix(gold, pred, labels) == [
        [1, 0, 1],
        [0, 1, 0],
        [0, 1, 2],
    ]
    assert router_accuracy(gold, pred) == pytest.approx(4 / 6)


def test_confusion_matrix_rejects_unknown_prediction() -> None:
    with pytest.raises(ValueError, match="'law'"):
        confusion_matrix(["code"], ["law"], ["code", "medicine"])


def test_router_accuracy_rejects_empty() -> None:
    with pytest.raises(ValueError):
        router_accuracy([], [])


# ------------------------------------------------------------------------------------------- results

def test_average_is_arithmetic_mean_over_domains() -> None:
    assert _rows()[1].average == {"ppl": 5.0, "bleu": 10.5, "rougeL": 37.5}


def test_human_count() -> None:
    assert human_count(1_843_200) == "1.84M"
    assert human_count(460_800) == "460.80K"
    assert human_count(999) == "999"


def test_results_table_markdown_bolds_best_averages() -> None:
    table = results_table_markdown(_rows(), DOMAINS)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3  # header, separator, one line per system
    assert lines[0].startswith("| System | code PPL | code BLEU | code R-L | medicine PPL")
    assert "Avg PPL | Avg BLEU | Avg R-L | Router acc (%) | Trainable params | Train time (s) |" in lines[0]
    base, moa, mixed = lines[2:]
    assert base.startswith("| base |") and moa.startswith("| moa |") and mixed.startswith("| lora-mixed |")
    # best Avg: PPL 5.000 (moa, lowest), BLEU 12.00 (lora-mixed), R-L 37.50 (moa)
    assert "**5.000**" in moa and "**37.50**" in moa and "| 10.50 |" in moa
    assert "**12.00**" in mixed and "| 6.000 |" in mixed
    assert "**" not in base
    assert table.count("**") == 6
    assert "| 87.50 | 1.84M | 12.3 |" in moa
    assert "| – | – | – |" in base  # no router, params or time
    assert "| 4.000 | 12.50 | 40.00 |" in moa  # per-domain formatting: PPL 3 decimals, BLEU/R-L 2


def test_results_json_round_trip() -> None:
    rows = _rows()
    data = results_to_json(rows)
    assert data["moa"]["avg_ppl"] == 5.0
    assert data["moa"]["medicine_rougeL"] == 35.0
    assert data["moa"]["router_accuracy"] == 0.875
    assert "router_accuracy" not in data["base"]
    assert all(isinstance(v, (int, float)) for flat in data.values() for v in flat.values())
    assert results_from_json(json.loads(json.dumps(data))) == rows


def test_results_json_handles_underscored_domain() -> None:
    row = EvalRow(system="moa", per_domain={"sports_news": {"ppl": 2.0, "bleu": 1.0, "rougeL": 3.0}})
    assert results_from_json(results_to_json([row])) == [row]


def test_results_json_rejects_reserved_domain() -> None:
    row = EvalRow(system="moa", per_domain={"avg": {"ppl": 2.0, "bleu": 1.0, "rougeL": 3.0}})
    with pytest.raises(ValueError, match="reserved"):
        results_to_json([row])


# --------------------------------------------------------------------------------------------- plots

def test_loss_curve_figure() -> None:
    fig = loss_curve([0, 5, 10], [2.0, 1.5, 1.2], "expert code", extra={"router": [0.7, 0.5, 0.4]})
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2
    assert ax.get_title() == "expert code"
    fig.savefig(io.BytesIO(), format="png")
    with pytest.raises(ValueError, match="'router'"):
        loss_curve([0, 1], [1.0, 0.5], "x", extra={"router": [1.0]})


def test_confusion_heatmap_figure() -> None:
    matrix = [[3, 1], [0, 0]]
    fig = confusion_heatmap(matrix, ["code", "medicine"], "router")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # heatmap + colour bar
    ax = fig.axes[0]
    assert ax.get_xlabel() == "routed expert" and ax.get_ylabel() == "gold domain"
    assert [t.get_text() for t in ax.texts] == ["3", "1", "0", "0"]
    shares = ax.images[0].get_array()
    assert shares.tolist() == [[0.75, 0.25], [0.0, 0.0]]  # row-normalised, empty row stays 0


def test_metric_bars_figure() -> None:
    fig = metric_bars(_rows(), DOMAINS, "bleu")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.patches) == 3 * 2  # systems x domains
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["base", "moa", "lora-mixed"]
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights == sorted([5.0, 7.0, 12.5, 8.5, 15.0, 9.0])
    with pytest.raises(ValueError, match="unknown metric"):
        metric_bars(_rows(), DOMAINS, "accuracy")


def test_results_table_without_training_times_has_no_time_column() -> None:
    """The DVC-tracked report leaves wall-clock time out: no row has one, so no column (not a column of dashes)."""
    import dataclasses

    table = results_table_markdown([dataclasses.replace(r, train_seconds=None) for r in _rows()], DOMAINS)
    header, _sep, *lines = table.strip().splitlines()
    assert header.endswith("| Router acc (%) | Trainable params |") and "Train time" not in table
    assert all(line.count("|") == header.count("|") for line in lines)
