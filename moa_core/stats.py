"""Uncertainty of evaluation results: bootstrap confidence intervals over test rows, pooled over seeds.

Every metric is computed from per-row sufficient statistics (`RowStats`), so a bootstrap resample of the
test rows recomputes the metric exactly as the full evaluation does:
- PPL: exp(sum NLL / sum tokens) over the resampled rows (not a mean of per-row perplexities);
- BLEU: corpus BLEU from the summed sacrebleu n-gram counts of the resampled rows;
- ROUGE-L and router accuracy: means of per-row values.

Seeds: the test rows are the same for every training seed, so one resample of row indices is applied to
every seed and the metric averaged over seeds. The interval is the percentile interval of that seed-mean
(uncertainty from the finite test set; the seeds' own spread is reported beside it). A paired comparison
applies the same resampled rows to both systems, so row difficulty cancels out of their difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

METRICS: tuple[str, ...] = ("ppl", "bleu", "rougeL", "router_acc")
PAIRED: tuple[str, ...] = ("ppl", "bleu", "rougeL")  # compared system against system (router accuracy is not)
HIGHER_IS_BETTER: dict[str, bool] = {"ppl": False, "bleu": True, "rougeL": True, "router_acc": True}


@dataclass
class RowStats:
    """Per test row of one domain, for one system and one seed (all lists have one entry per row).

    nll, tokens: summed response NLL and scored token count (perplexity); bleu: sacrebleu's 10 sufficient
    statistics [hyp_len, ref_len, correct_1..4, total_1..4] of the row's generation (empty list when the row
    was not generated); rougeL: ROUGE-L F x 100 of the generation; routed_ok: 1.0/0.0 when a router chose
    the row's expert, empty for systems without a router."""

    nll: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    bleu: list[list[int]] = field(default_factory=list)
    rougeL: list[float] = field(default_factory=list)
    routed_ok: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, list]:
        return {"nll": self.nll, "tokens": self.tokens, "bleu": self.bleu, "rougeL": self.rougeL,
                "routed_ok": self.routed_ok}

    @classmethod
    def from_json(cls, d: dict[str, list]) -> "RowStats":
        return cls(**{k: list(d.get(k, [])) for k in ("nll", "tokens", "bleu", "rougeL", "routed_ok")})


def bleu_from_counts(counts: np.ndarray) -> np.ndarray:
    """Corpus BLEU (sacrebleu's defaults: 4-grams, "exp" smoothing) from summed statistics.

    counts: [..., 10] = [hyp_len, ref_len, correct_1..4, total_1..4] summed over a corpus -> [...] in [0, 100]."""
    counts = np.asarray(counts, dtype=np.float64)
    sys_len, ref_len = counts[..., 0], counts[..., 1]
    correct, total = counts[..., 2:6], counts[..., 6:10]
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(sys_len < ref_len, np.exp(1 - ref_len / np.where(sys_len > 0, sys_len, 1)), 1.0)
        bp = np.where(sys_len > 0, bp, 0.0)
        # "exp" smoothing: the k-th n-gram order with no match gets precision 1 / (2^k * total)
        zero = correct == 0
        smooth = np.cumprod(np.where(zero, 2.0, 1.0), axis=-1)
        prec = np.where(zero, 1.0 / (smooth * np.where(total > 0, total, 1)), correct / np.where(total > 0, total, 1))
        # sacrebleu stops at the first order with no n-grams at all (precision 0 from there on)
        usable = np.cumprod(total > 0, axis=-1).astype(bool)
        logp = np.where(usable, np.log(np.where(usable, prec, 1.0)), -np.inf)
        score = bp * np.exp(logp.mean(axis=-1)) * 100.0
    return np.where(correct.sum(axis=-1) > 0, score, 0.0)


def _metric_on(rows: RowStats, metric: str, idx: np.ndarray) -> np.ndarray:
    """The metric over resampled rows. idx: [B, n] row indices -> [B] values (nan where it does not apply)."""
    if metric == "ppl":
        nll = np.asarray(rows.nll)[idx].sum(-1)
        tok = np.asarray(rows.tokens, dtype=np.float64)[idx].sum(-1)
        return np.exp(nll / np.maximum(tok, 1))
    if metric == "bleu":
        if not rows.bleu:
            return np.full(idx.shape[0], np.nan)
        return bleu_from_counts(np.asarray(rows.bleu, dtype=np.float64)[idx].sum(-2))  # [B, n, 10] -> [B, 10]
    values = {"rougeL": rows.rougeL, "router_acc": rows.routed_ok}[metric]
    if not values:
        return np.full(idx.shape[0], np.nan)
    return np.asarray(values, dtype=np.float64)[idx].mean(-1) * (100.0 if metric == "router_acc" else 1.0)


def _indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[1 + n_boot, n]: the identity (the point estimate) followed by n_boot resamples with replacement."""
    return np.concatenate([np.arange(n)[None], rng.integers(0, n, size=(n_boot, n))]) if n else np.zeros((1 + n_boot, 0), int)


@dataclass(frozen=True)
class Estimate:
    """A metric averaged over seeds: point value, 95 % bootstrap interval over test rows, and the seeds' own
    values (their spread is the training-seed variation, which the interval does not include)."""

    value: float
    low: float
    high: float
    per_seed: tuple[float, ...]

    def to_json(self) -> dict[str, float | list[float]]:
        return {"value": self.value, "low": self.low, "high": self.high, "per_seed": list(self.per_seed)}


def _row_count(rows: RowStats, metric: str) -> int:
    """The rows a metric is computed on: every test row for PPL, the generated ones (the first rows of the
    split, possibly fewer) for BLEU and ROUGE-L, the routed ones for router accuracy."""
    return len({"ppl": rows.nll, "bleu": rows.bleu, "rougeL": rows.rougeL, "router_acc": rows.routed_ok}[metric])


def _domain_samples(seeds: Sequence[dict[str, RowStats]], domains: Sequence[str], metric: str, n_boot: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per domain, [1 + n_boot] seed-mean values and [S] per-seed point values, with shared resamples."""
    rng = np.random.default_rng(seed)
    out, per_seed = [], []
    for d in domains:
        idx = _indices(_row_count(seeds[0][d], metric), n_boot, rng)
        vals = np.stack([_metric_on(s[d], metric, idx) for s in seeds])  # [S, 1 + n_boot]
        out.append(vals.mean(0))
        per_seed.append(vals[:, 0])
    return np.stack(out), np.stack(per_seed)  # [D, 1 + n_boot], [D, S]


def _average(values: np.ndarray, seeds: Sequence[dict[str, RowStats]], domains: Sequence[str], metric: str) -> np.ndarray:
    """The "avg" over domains of per-domain values [D, ...]: the plain mean, as the results table averages PPL,
    BLEU and ROUGE-L; router accuracy is pooled over every routed row, as the table reports it."""
    if metric != "router_acc":
        return values.mean(0)
    n = np.asarray([_row_count(seeds[0][d], metric) for d in domains], dtype=np.float64)
    if n.sum() == 0:
        return values.mean(0)
    w = (n / n.sum()).reshape(-1, *([1] * (values.ndim - 1)))
    return (values * w).sum(0)


def _summarise(samples: np.ndarray, per_seed: np.ndarray, level: float) -> Estimate:
    boot = samples[1:]
    finite = boot[~np.isnan(boot)]
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)]) if finite.size else (math.nan, math.nan)
    return Estimate(float(samples[0]), float(lo), float(hi), tuple(float(v) for v in per_seed))


def estimate(seeds: Sequence[dict[str, RowStats]], domains: Sequence[str], metric: str, *, n_boot: int = 1000,
             level: float = 0.95, seed: int = 0) -> dict[str, Estimate]:
    """Per domain and "avg" (mean over domains, as the results table averages): the seed-mean of `metric`
    with its `level` percentile bootstrap interval over test rows (stratified by domain).

    seeds: one {domain: RowStats} per training seed, all over the same test rows."""
    samples, per_seed = _domain_samples(seeds, domains, metric, n_boot, seed)
    out = {d: _summarise(samples[i], per_seed[i], level) for i, d in enumerate(domains)}
    out["avg"] = _summarise(_average(samples, seeds, domains, metric), _average(per_seed, seeds, domains, metric), level)
    return out


@dataclass(frozen=True)
class Difference:
    """A - B of a metric (seed means), its paired 95 % bootstrap interval, and the verdict for A."""

    value: float
    low: float
    high: float
    verdict: str  # "ahead" | "behind" | "within noise" (for A against B, by the metric's direction)


def paired_difference(a: Sequence[dict[str, RowStats]], b: Sequence[dict[str, RowStats]], domains: Sequence[str],
                      metric: str, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                      domain: str = "avg") -> Difference:
    """System A minus system B on `metric` for one domain or the average, resampling the same test rows for
    both (and for every seed of each). A is "ahead" only when the whole interval is on A's better side."""
    sa, _ = _domain_samples(a, domains, metric, n_boot, seed)
    sb, _ = _domain_samples(b, domains, metric, n_boot, seed)  # same seed -> same resampled rows
    if domain == "avg":
        diff = _average(sa, a, domains, metric) - _average(sb, b, domains, metric)
    else:
        i = list(domains).index(domain)
        diff = sa[i] - sb[i]
    lo, hi = np.nanpercentile(diff[1:], [50 * (1 - level), 50 * (1 + level)])
    better_if_positive = HIGHER_IS_BETTER[metric]
    if lo > 0:
        verdict = "ahead" if better_if_positive else "behind"
    elif hi < 0:
        verdict = "behind" if better_if_positive else "ahead"
    else:
        verdict = "within noise"
    return Difference(float(diff[0]), float(lo), float(hi), verdict)


# --------------------------------------------------------------------------------------------- report

_LABEL = {"ppl": "PPL", "bleu": "BLEU", "rougeL": "R-L", "router_acc": "Router acc (%)"}
_DIGITS = {"ppl": 2, "bleu": 2, "rougeL": 2, "router_acc": 1}


def _cell(e: dict[str, float], metric: str) -> str:
    """An `Estimate.to_json()` as "value [low, high]"."""
    if math.isnan(e["value"]):
        return "–"
    d = _DIGITS[metric]
    return f"{e['value']:.{d}f} [{e['low']:.{d}f}, {e['high']:.{d}f}]"


def compare_systems(per_system: dict[str, Sequence[dict[str, RowStats]]], domains: Sequence[str], reference: str,
                    *, n_boot: int = 1000, seed: int = 0) -> dict[str, object]:
    """Every system's estimates (per domain and average, each metric) and, on the averages, the paired
    difference `reference` minus the system, with the verdict for the reference ("ahead" = reference better).
    per_system: name -> one {domain: RowStats} per seed (the same seeds for every system)."""
    out: dict[str, object] = {"domains": list(domains), "reference": reference, "bootstrap": n_boot,
                              "seeds": len(next(iter(per_system.values()))), "systems": {}}
    for name, seeds in per_system.items():
        entry: dict[str, object] = {
            m: {d: e.to_json() for d, e in estimate(seeds, domains, m, n_boot=n_boot, seed=seed).items()}
            for m in METRICS}
        if name != reference and reference in per_system:
            entry["vs_reference"] = {
                m: asdict(paired_difference(per_system[reference], seeds, domains, m, n_boot=n_boot, seed=seed))
                for m in PAIRED}
        out["systems"][name] = entry  # type: ignore[index]
    return out


def interval_table_markdown(comparison: dict[str, object]) -> str:
    """Two markdown tables from `compare_systems`: averages with 95 % intervals and the paired verdicts
    against the reference system; then every domain's figures."""
    systems: dict[str, dict] = comparison["systems"]  # type: ignore[assignment]
    domains: list[str] = comparison["domains"]  # type: ignore[assignment]
    ref = comparison["reference"]
    head = ["System"] + [f"Avg {_LABEL[m]}" for m in METRICS] + [f"{ref} − this: {_LABEL[m]}" for m in PAIRED]
    lines = ["| " + " | ".join(head) + " |", "|:---|" + "---:|" * (len(head) - 1)]
    for name, entry in systems.items():
        cells = [name] + [_cell(entry[m]["avg"], m) for m in METRICS]
        for m in PAIRED:
            d = entry.get("vs_reference", {}).get(m)
            cells.append("–" if d is None else f"{d['value']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {d['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    dom_head = ["System"] + [f"{d} {_LABEL[m]}" for d in domains for m in PAIRED]
    dom = ["| " + " | ".join(dom_head) + " |", "|:---|" + "---:|" * (len(dom_head) - 1)]
    for name, entry in systems.items():
        cells = [name] + [_cell(entry[m][d], m) for d in domains for m in PAIRED]
        dom.append("| " + " | ".join(cells) + " |")
    n_seeds = comparison["seeds"]
    note = (f"Mean over {n_seeds} training seed(s); [low, high] = 95 % bootstrap interval over test rows "
            f"({comparison['bootstrap']} resamples, stratified by domain). \"{ref} − this\": the paired difference "
            f"(same resampled rows for both systems) and whether {ref} is ahead of or behind that system; "
            f"\"ahead\"/\"behind\" only where the interval excludes 0, else \"within noise\".\n")
    return note + "\n" + "\n".join(lines) + "\n\nPer domain:\n\n" + "\n".join(dom) + "\n"
