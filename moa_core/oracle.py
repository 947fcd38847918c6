"""How close each routed system comes to the oracle: the trained MoA mixture with every test row's own expert
forced (perfect routing). Same experts, the best routing they allow; so "% of oracle" isolates what the
router loses (or, for token-level methods, gains by mixing)."""

from __future__ import annotations

from collections.abc import Sequence

from .metrics import METRICS, EvalRow

_HEADER = {"ppl": "PPL", "bleu": "BLEU", "rougeL": "R-L"}


def percent_of_oracle(rows: Sequence[EvalRow], oracle: str, routed: Sequence[str]) -> dict[str, dict[str, float]]:
    """{system: {metric: % of the oracle's average}} for each routed system. For BLEU and ROUGE-L that is
    100 * system / oracle; for perplexity (lower is better) 100 * oracle / system, so 100 % is the oracle on
    every metric and less is worse."""
    by_name = {r.system: r for r in rows}
    if oracle not in by_name:
        raise ValueError(f"no oracle row {oracle!r} among {sorted(by_name)}")
    best = by_name[oracle].average
    out: dict[str, dict[str, float]] = {}
    for name in routed:
        if name not in by_name or name == oracle:
            continue
        avg = by_name[name].average
        out[name] = {m: 100.0 * (best[m] / avg[m] if m == "ppl" else avg[m] / best[m])
                     for m in METRICS if (avg[m] if m == "ppl" else best[m]) > 0}
    return out


def oracle_table_markdown(percent: dict[str, dict[str, float]], router_accuracy: dict[str, float | None],
                          oracle: str) -> str:
    """The routed systems against the oracle row, one line each (router accuracy in %, "–" where none)."""
    header = ["System", "Router acc (%)", *[f"% of oracle {_HEADER[m]}" for m in METRICS]]
    lines = [f"Routed systems against `{oracle}` (the same MoA experts, each test row's own expert forced):\n",
             "| " + " | ".join(header) + " |", "|:---|" + "---:|" * (len(header) - 1)]
    for name, pct in percent.items():
        acc = router_accuracy.get(name)
        cells = [name, "–" if acc is None else f"{100 * acc:.2f}",
                 *[f"{pct[m]:.1f}" if m in pct else "–" for m in METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
