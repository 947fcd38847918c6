"""Evaluation metrics and the results table.

Text metrics come from maintained libraries (sacrebleu for BLEU, rouge-score for ROUGE-L); both are
imported lazily inside the functions so that `moa_core` imports with only the stdlib and torch.
Perplexity is computed from summed causal-LM negative log-likelihoods (`token_nll`), so callers can
accumulate over batches and divide once.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
METRICS: tuple[str, ...] = ("ppl", "bleu", "rougeL")
"""Per-domain metric keys of `EvalRow.per_domain`."""

_HIGHER_IS_BETTER: dict[str, bool] = {"ppl": False, "bleu": True, "rougeL": True}
_DIGITS: dict[str, int] = {"ppl": 3, "bleu": 2, "rougeL": 2}
_HEADER_NAME: dict[str, str] = {"ppl": "PPL", "bleu": "BLEU", "rougeL": "R-L"}
_MAX_LOG_PPL = math.log(sys.float_info.max)
_RESERVED_DOMAIN = "avg"


def _check_pairs(predictions: list[str], references: list[str]) -> None:
    if not predictions:
        raise ValueError("no predictions to score: predictions and references are empty")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")


# ------------------------------------------------------------------------------------------ text metrics

def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU in [0, 100] (sacrebleu, tokenizer "13a", one reference per prediction)."""
    _check_pairs(predictions, references)
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure × 100 (rouge-score, Porter stemming)."""
    _check_pairs(predictions, references)
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
    return 100.0 * total / len(predictions)


def bleu_statistics(predictions: list[str], references: list[str]) -> list[list[int]]:
    """Per row, sacrebleu's 10 BLEU sufficient statistics [hyp_len, ref_len, correct_1..4, total_1..4];
    summed over rows they give `bleu` exactly (`moa_core.stats.bleu_from_counts`), so a bootstrap can
    recompute corpus BLEU on resampled rows."""
    _check_pairs(predictions, references)
    from sacrebleu.metrics import BLEU

    # a private but stable helper of sacrebleu 2.x; tests check the sums reproduce corpus_bleu
    return [list(map(int, row)) for row in BLEU(tokenize="13a")._extract_corpus_statistics(predictions, [references])]


def rouge_l_rows(predictions: list[str], references: list[str]) -> list[float]:
    """Per-row ROUGE-L F-measure x 100 (their mean is `rouge_l`)."""
    _check_pairs(predictions, references)
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


# ------------------------------------------------------------------------------------ language modelling

def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total_nll / total_tokens); `inf` when the exponent would overflow a float.

    Raises ValueError for `total_tokens <= 0` (no scored token: perplexity is undefined).
    """
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs at least one scored token, got total_tokens={total_tokens}")
    mean_nll = total_nll / total_tokens
    if mean_nll >= _MAX_LOG_PPL:
        return math.inf
    return math.exp(mean_nll)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM negative log-likelihood summed per row.

    Position t of `logits` predicts `labels[:, t + 1]` (the usual shift); label `-100` is ignored.

    Args:
        logits: [B, T, V] unnormalised scores (any float dtype; computed in float32).
        labels: [B, T] token ids, `-100` where a position is not scored (prompt, padding).

    Returns:
        nll_sum: [B] float32, summed -log p(label) over scored positions of each row.
        n_tokens: [B] int64, number of scored positions of each row.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, T-1], 0 where ignored
    n_tokens = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return nll.sum(dim=1), n_tokens


# ----------------------------------------------------------------------------------------------- router

def confusion_matrix(gold: list[str], predicted: list[str], labels: list[str]) -> list[list[int]]:
    """Counts `[len(labels)][len(labels)]`: row = gold label, column = predicted label, in `labels` order."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions; they must pair up")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    index = {name: i for i, name in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        for kind, name in (("gold", g), ("predicted", p)):
            if name not in index:
                raise ValueError(f"{kind} label {name!r} is not one of {labels}")
        matrix[index[g]][index[p]] += 1
    return matrix


def router_accuracy(gold: list[str], predicted: list[str]) -> float:
    """Fraction in [0, 1] of examples routed to their gold domain."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions; they must pair up")
    if not gold:
        raise ValueError("router accuracy of an empty set is undefined")
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def router_accuracy_by_domain(gold: list[str], predicted: list[str]) -> dict[str, float]:
    """Router accuracy of each gold domain's rows, in order of first appearance."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions; they must pair up")
    out: dict[str, float] = {}
    for dom in dict.fromkeys(gold):
        pairs = [(g, p) for g, p in zip(gold, predicted) if g == dom]
        out[dom] = sum(g == p for g, p in pairs) / len(pairs)
    return out


# ---------------------------------------------------------------------------------------------- results

@dataclass
class EvalRow:
    """One evaluated system (e.g. "base", "single-lora", "lora-mixed", "moa", "mosld", "modula-flan").

    `per_domain` maps domain → {"ppl", "bleu", "rougeL"}; `router_accuracy` is in [0, 1] (None for systems
    without a router); `trainable_params` and `train_seconds` are None where they do not apply.
    """

    system: str
    per_domain: dict[str, dict[str, float]] = field(default_factory=dict)
    router_accuracy: float | None = None
    trainable_params: int | None = None
    train_seconds: float | None = None
    router_accuracy_by_domain: dict[str, float] = field(default_factory=dict)

    @property
    def average(self) -> dict[str, float]:
        """Arithmetic mean of each metric over domains (PPL included, as in the MoA paper)."""
        if not self.per_domain:
            raise ValueError(f"system {self.system!r} has no per-domain results to average")
        n = len(self.per_domain)
        return {m: sum(d[m] for d in self.per_domain.values()) / n for m in METRICS}


def human_count(n: int) -> str:
    """1840000 → "1.84M", 12345 → "12.35K", 999 → "999"."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _best(values: list[float], metric: str) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return None
    return max(finite) if _HIGHER_IS_BETTER[metric] else min(finite)


def results_table_markdown(rows: list[EvalRow], domains: list[str]) -> str:
    """Markdown table in the style of the MoA paper's Table 2, one line per system.

    Columns: per-domain PPL/BLEU/R-L, Avg PPL/BLEU/R-L (best in bold: lowest PPL, highest BLEU/R-L),
    router accuracy (%), trainable parameters and training time (s). A missing value shows as "–". The
    training time column is left out when no row has one (the DVC-tracked report: wall-clock time varies per run).
    """
    timed = any(row.train_seconds is not None for row in rows)
    header = ["System"]
    header += [f"{d} {_HEADER_NAME[m]}" for d in domains for m in METRICS]
    header += [f"Avg {_HEADER_NAME[m]}" for m in METRICS]
    header += ["Router acc (%)", "Trainable params"] + (["Train time (s)"] if timed else [])
    lines = ["| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 1)]

    averages = [row.average for row in rows]
    best = {m: _best([avg[m] for avg in averages], m) for m in METRICS}
    for row, avg in zip(rows, averages):
        cells = [row.system]
        for d in domains:
            scores = row.per_domain.get(d, {})
            cells += [_fmt(scores.get(m), _DIGITS[m]) for m in METRICS]
        for m in METRICS:
            text = _fmt(avg[m], _DIGITS[m])
            cells.append(f"**{text}**" if avg[m] == best[m] else text)
        acc = None if row.router_accuracy is None else 100.0 * row.router_accuracy
        cells.append(_fmt(acc, 2))
        cells.append("–" if row.trainable_params is None else human_count(row.trainable_params))
        if timed:
            cells.append(_fmt(row.train_seconds, 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_SCALARS: tuple[str, ...] = ("router_accuracy", "trainable_params", "train_seconds")
_ROUTER = "router_accuracy"  # "<domain>_router_accuracy": that domain's share of rows routed to its own expert


def results_to_json(rows: list[EvalRow]) -> dict[str, dict[str, float]]:
    """Flat, DVC-metrics-friendly mapping.

    `{system: {"avg_ppl", "avg_bleu", "avg_rougeL", "<domain>_ppl", "<domain>_bleu", "<domain>_rougeL",
    "router_accuracy", "<domain>_router_accuracy", "trainable_params", "train_seconds"}}`; None values are left out.
    """
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if _RESERVED_DOMAIN in row.per_domain:
            raise ValueError(f"domain name {_RESERVED_DOMAIN!r} is reserved for averages; rename the domain")
        if row.system in out:
            raise ValueError(f"system {row.system!r} appears twice in the results")
        flat: dict[str, float] = {f"{_RESERVED_DOMAIN}_{m}": v for m, v in row.average.items()}
        for domain, scores in row.per_domain.items():
            flat.update({f"{domain}_{m}": scores[m] for m in METRICS})
        flat.update({f"{domain}_{_ROUTER}": acc for domain, acc in row.router_accuracy_by_domain.items()})
        for key in _SCALARS:
            value = getattr(row, key)
            if value is not None:
                flat[key] = value
        out[row.system] = flat
    return out


def results_from_json(data: dict[str, dict[str, float]]) -> list[EvalRow]:
    """Inverse of `results_to_json` (the `avg_*` keys are derived, so they are recomputed, not read)."""
    rows = []
    for system, flat in data.items():
        per_domain: dict[str, dict[str, float]] = {}
        by_domain: dict[str, float] = {}
        for key, value in flat.items():
            domain, _, metric = key.rpartition("_")
            if metric in METRICS and domain != _RESERVED_DOMAIN:
                per_domain.setdefault(domain, {})[metric] = float(value)
            elif key.endswith(f"_{_ROUTER}"):
                by_domain[key.removesuffix(f"_{_ROUTER}")] = float(value)
        params = flat.get("trainable_params")
        rows.append(
            EvalRow(
                system=system,
                per_domain=per_domain,
                router_accuracy=flat.get("router_accuracy"),
                trainable_params=None if params is None else int(params),
                train_seconds=flat.get("train_seconds"),
                router_accuracy_by_domain=by_domain,
            )
        )
    return rows
