"""Figures for MLflow (`mlflow.log_figure`): loss curves, router confusion heatmaps, metric bars.

Figures are built on an explicit Agg canvas (no pyplot state, nothing to close, safe in worker threads).
"""

from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moa_core.metrics import METRICS, EvalRow

_METRIC_LABEL: dict[str, str] = {"ppl": "perplexity (lower is better)", "bleu": "BLEU", "rougeL": "ROUGE-L"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def loss_curve(
    steps: list[int], losses: list[float], title: str, extra: dict[str, list[float]] | None = None,
    val: list[dict[str, float]] | None = None, best_step: int | None = None,
) -> Figure:
    """Training loss against step; `extra` adds named series over the same steps (e.g. router loss); `val`
    ({"step", "val_loss"} entries) the validation curve of early stopping, with the kept step marked."""
    series = {"loss": losses, **(extra or {})}
    for name, values in series.items():
        if len(values) != len(steps):
            raise ValueError(f"series {name!r} has {len(values)} points but there are {len(steps)} steps")
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for name, values in series.items():
        ax.plot(steps, values, label=name)
    if val:
        ax.plot([v["step"] for v in val], [v["val_loss"] for v in val], marker="o", label="validation")
        if best_step is not None:
            ax.axvline(best_step, color="grey", linestyle="--", label=f"kept: step {best_step}")
    ax.set(title=title, xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    if extra or val:
        ax.legend()
    return fig


def confusion_heatmap(matrix: list[list[int]], labels: list[str], title: str) -> Figure:
    """Router confusion matrix [gold][routed]: colour = row-normalised share, text = raw count."""
    n = len(labels)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"matrix must be {n}x{n} to match labels {labels}")
    shares = [[c / total if total else 0.0 for c in row] for row, total in zip(matrix, map(sum, matrix))]
    fig = _figure(1.2 * n + 2.5, 1.1 * n + 1.5)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            colour = "white" if shares[i][j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set(title=title, xlabel="routed expert", ylabel="gold domain")
    fig.colorbar(image, ax=ax, label="share of gold row")
    return fig


def metric_bars(rows: list[EvalRow], domains: list[str], metric: str) -> Figure:
    """Grouped bars: one group per domain, one bar per system (a missing value draws no bar)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    width = 0.8 / max(len(rows), 1)
    fig = _figure(max(6.0, 0.6 * len(domains) * len(rows) + 2), 4)
    ax = fig.add_subplot()
    for k, row in enumerate(rows):
        values = [row.per_domain.get(d, {}).get(metric, math.nan) for d in domains]
        offsets = [i - 0.4 + width * (k + 0.5) for i in range(len(domains))]
        ax.bar(offsets, values, width, label=row.system)
    ax.set_xticks(range(len(domains)), domains)
    ax.set(title=f"{_METRIC_LABEL[metric]} per domain", xlabel="domain", ylabel=_METRIC_LABEL[metric])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return fig
