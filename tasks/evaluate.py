"""evaluate stage: the MoA paper's Table 2 on our domains (held-out test split), as markdown + JSON + plots."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

import mlflow

from moa_core.atomic import atomic_write_json, atomic_write_text
from moa_core.methods import experts_side_by_side, get_method, planned_mixtures
from moa_core.stats import METRICS as STAT_METRICS
from moa_core.stats import RowStats, compare_systems, interval_table_markdown

from .common import TORCH_LOCK, StageContext, read_training_metrics, stage_logger, stage_run
from .incremental import FINGERPRINT_TAG, fingerprint_stage, record_success, skip_if_unchanged

# The evaluate stage's model code (torch, the base model, the mixtures: ~4 s at start-up) is imported in the functions
# that evaluate: `moa stage intervals` only pools the rows files, with numpy. The modules hold no transformers
# lazy-attribute access at import, so a first import in a flow's task thread is safe (cf. moa_core/base_model.py).
if TYPE_CHECKING:
    from moa_core.evaluate import SystemEval

# Row names of the table and keys of metrics/eval.json (the single-LoRA row is an oracle: label known).
SYSTEM_LABELS = {"base": "base", "single": "single-lora", "mixed": "lora-mixed"}


ROWS_FILE = "eval_rows.json"


def eval_progress(system: str, domains: list[str]):
    """evaluate_system's callback: `evaluate moa: finance (3/4)` in the task's log, as each domain starts."""
    log = stage_logger()
    return lambda d: log.info("evaluate %s: %s (%d/%d)", system, d, domains.index(d) + 1, len(domains))


def _baselines(ctx: StageContext, test: dict[str, list[Any]]) -> dict[str, SystemEval]:
    """base, single-lora and lora-mixed share one model: the stage-1 experts, plus the mixed LoRA as one
    more expert, on one copy of the base (the base row switches the adapters off)."""
    from moa_core.base_model import load_base
    from moa_core.evaluate import EvalRouting, evaluate_system

    wanted = set(ctx.cfg.evaluate.baselines)
    out: dict[str, SystemEval] = {}
    if not wanted & {"base", "single", "mixed"}:
        return out
    base, tok, model_id = load_base(ctx.cfg.base_model, ctx.root)
    mm = experts_side_by_side(ctx.cfg, base, model_id, [ctx.layout.expert(d) for d in ctx.cfg.domain_names])
    doms = list(test)
    if "base" in wanted:
        out["base"] = evaluate_system(mm, tok, test, ctx.cfg, EvalRouting.OFF, eval_progress("base", doms))
    if "single" in wanted:
        out["single"] = evaluate_system(mm, tok, test, ctx.cfg, EvalRouting.GOLD, eval_progress("single-lora", doms))
    if "mixed" in wanted and ctx.layout.mixed.exists():
        k = mm.add_expert("__mixed__")
        mm.load_peft_expert(k, ctx.layout.mixed)
        out["mixed"] = evaluate_system(mm, tok, test, ctx.cfg, k, eval_progress("lora-mixed", doms))
    return out


def _mixture_system(ctx: StageContext, name: str, test: dict[str, list[Any]]) -> SystemEval:
    from moa_core.base_model import load_base
    from moa_core.evaluate import evaluate_system, learned_routing
    from moa_core.model import load_mixture

    base, tok, _ = load_base(ctx.cfg.base_model, ctx.root)
    mm = load_mixture(base, ctx.layout.mixture(name))
    return evaluate_system(mm, tok, test, ctx.cfg, learned_routing(mm.spec), eval_progress(name, list(test)))


def _costs(ctx: StageContext, system: str) -> tuple[int | None, float | None]:
    """(trainable parameters, training seconds) of a system, from the training stages' metrics files."""
    from .comparison_rows import ARROW, ORACLE

    doms = ctx.cfg.domain_names
    experts = [read_training_metrics(ctx, f"train_expert_{d}") for d in doms]
    if system == "base":
        return 0, 0.0
    if system == ORACLE:  # the method's own mixture, evaluated with perfect routing
        system = ctx.cfg.method
    if system in ("single", ARROW):  # Arrow trains nothing beyond the stage-1 experts
        return (experts[0].get("trainable_params"), sum(e.get("train_seconds", 0.0) for e in experts)) if experts[0] else (None, None)
    if system == "mixed":
        m = read_training_metrics(ctx, "train_mixed")
        return m.get("trainable_params"), m.get("train_seconds")
    r = read_training_metrics(ctx, f"train_router_{system}")
    if not r:
        return None, None
    stage1 = sum(e.get("train_seconds", 0.0) for e in experts) if get_method(r["method"]).needs_experts else 0.0
    seconds = r["train_seconds"] + stage1
    return r["trainable_params"], seconds


def run_evaluate(ctx: StageContext) -> dict[str, Any]:
    from moa_core import metrics

    from .comparison_rows import ARROW, ORACLE, ORACLE_FILE, oracle_comparison, oracle_label, routing_rows
    from .fallback_eval import FALLBACK_FILE, fallback_markdown, run_fallback_eval
    from .plots import confusion_heatmap, metric_bars

    lay, doms = ctx.layout, ctx.cfg.domain_names
    mixtures = [p.name for p in planned_mixtures(ctx.cfg) if p.required or (lay.mixture(p.name) / "mixture.json").exists()]
    # everything the table is computed from: the curated splits, every adapter and mixture, the training summaries
    # (trainable parameters); the domain list and curate.seed choose the out-of-domain prompts of the fallback row
    reads = [*(lay.curated(d) for d in doms), *(lay.expert(d) for d in doms), lay.mixed, *map(lay.mixture, mixtures),
             *(lay.metrics / f"{name}.json" for name in _training_summaries(ctx, mixtures))]
    stage_fp = fingerprint_stage(ctx, "evaluate", reads, domains=doms, curate_seed=ctx.cfg.curate.seed)
    if (done := skip_if_unchanged(ctx, "evaluate", stage_fp)) is not None:
        return done
    test = ctx.splits("test")
    with TORCH_LOCK:
        systems = _baselines(ctx, test)
        for name in mixtures:
            systems[name] = _mixture_system(ctx, name, test)
        systems.update(routing_rows(ctx, test, eval_progress))
        fallback = run_fallback_eval(ctx, test)
    labels = {**SYSTEM_LABELS, ORACLE: oracle_label(ctx), ARROW: "peft-arrow"}
    rows = []
    for name, ev in systems.items():
        params, seconds = _costs(ctx, name)
        rows.append(metrics.EvalRow(system=labels.get(name, name), per_domain=ev.per_domain,
                                    router_accuracy=ev.router_accuracy, trainable_params=params, train_seconds=seconds,
                                    router_accuracy_by_domain=ev.router_accuracy_by_domain))
    # The tracked files (eval.json, eval.md) hold what the inputs determine; the wall-clock training time varies per
    # run, so it is only in the table `moa run` prints, in metrics/timings/eval.json and in MLflow.
    timed_table = metrics.results_table_markdown(rows, doms)
    seconds = {row.system: row.train_seconds for row in rows if row.train_seconds is not None}
    rows = [dataclasses.replace(row, train_seconds=None) for row in rows]
    table = metrics.results_table_markdown(rows, doms)
    oracle_data, oracle_md = oracle_comparison(ctx, rows, {name: labels.get(name, name) for name in systems})
    data = metrics.results_to_json(rows)
    routed = systems[ctx.cfg.method]
    confusion = metrics.confusion_matrix(routed.gold, routed.routed, doms) if routed.routed else None
    atomic_write_json(lay.metrics / "eval.json", data)
    # per test row, for the confidence intervals of `run_intervals` (several seeds pool these files)
    row_stats = {labels.get(name, name): {d: r.to_json() for d, r in ev.rows.items()} for name, ev in systems.items()}
    atomic_write_text(lay.metrics / ROWS_FILE, json.dumps(row_stats))
    samples = "\n".join(
        f"| {s['domain']} | {s['instruction'][:80]!r} | {s['reference'][:80]!r} | {s['prediction'][:80]!r} |"
        for s in routed.samples
    )
    report = (f"# Evaluation ({ctx.cfg.method}, held-out test split)\n\n{table}\n\n{oracle_md}"
              + (f"Router confusion (rows = gold domain, columns = routed expert, order {doms}): {confusion}\n\n" if confusion else "")
              + (fallback_markdown(fallback) if fallback else "")
              + "## Sample generations\n\n| domain | instruction | reference | prediction |\n|---|---|---|---|\n" + samples + "\n")
    atomic_write_text(lay.reports / "eval.md", report)
    atomic_write_json(lay.timings / "eval.json", {"train_seconds": seconds})
    with stage_run(ctx, "evaluate", **{FINGERPRINT_TAG: stage_fp}):
        flat = {f"{sys_}.{k}": v for sys_, vals in data.items() for k, v in vals.items() if isinstance(v, int | float)}
        flat.update({f"{sys_}.train_seconds": v for sys_, v in seconds.items()})
        mlflow.log_metrics({k: float(v) for k, v in flat.items()})
        mlflow.log_text(timed_table, "eval_with_train_time.md")
        mlflow.log_metrics({f"{name}.{k}": float(v) for name, vals in oracle_data.items() for k, v in vals.items()})
        if fallback:
            mlflow.log_metrics({f"fallback.{k}": float(v) for k, v in fallback.items() if isinstance(v, int | float)})
        mlflow.log_text(report, "eval.md")
        mlflow.log_dict(data, "eval.json")
        for metric in metrics.METRICS:
            mlflow.log_figure(metric_bars(rows, doms, metric), f"plots/{metric}_by_domain.png")
        if confusion:
            mlflow.log_figure(confusion_heatmap(confusion, doms, f"{ctx.cfg.method} router (test split)"),
                              "plots/router_confusion.png")
    result = {"table": timed_table, "metrics": data, "router_accuracy": routed.router_accuracy, "confusion": confusion,
              "fallback": fallback, "oracle": oracle_data}
    outputs = [lay.metrics / name for name in ("eval.json", ROWS_FILE, FALLBACK_FILE, ORACLE_FILE)]
    if ctx.seed is None:  # reports/ is shared by the seeds of a several-seed run: the last seed's report stands there
        outputs.append(lay.reports / "eval.md")
    record_success(ctx, "evaluate", stage_fp, outputs, result)
    return result


def _training_summaries(ctx: StageContext, mixtures: list[str]) -> list[str]:
    """The metrics files (names without .json) of the training stages whose systems the table shows."""
    return [*(f"train_expert_{d}" for d in ctx.cfg.domain_names), "train_mixed", *(f"train_router_{m}" for m in mixtures)]


def run_intervals(ctx: StageContext) -> dict[str, Any]:
    """The comparison over every training seed of the run, with 95 % bootstrap intervals over test rows and
    paired verdicts against the method -> metrics/eval_intervals.json, reports/eval_intervals.md, MLflow."""
    seeds = ctx.seeds
    rows_files = [ctx.for_seed(s).layout.metrics / ROWS_FILE for s in seeds]
    for s, path in zip(seeds, rows_files):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the evaluate stage for seed {s} first")
    stage_fp = fingerprint_stage(ctx, "intervals", rows_files, uses_base_model=False, seeds=seeds,
                                 domains=ctx.cfg.domain_names)
    if (done := skip_if_unchanged(ctx, "intervals", stage_fp)) is not None:
        return done
    per_seed = [json.loads(path.read_text()) for path in rows_files]
    systems = [name for name in per_seed[0] if all(name in p for p in per_seed)]
    per_system = {name: [{d: RowStats.from_json(r) for d, r in p[name].items()} for p in per_seed] for name in systems}
    comparison = compare_systems(per_system, ctx.cfg.domain_names, ctx.cfg.method, n_boot=ctx.cfg.evaluate.bootstrap)
    comparison["seed_values"] = seeds
    table = interval_table_markdown(comparison)
    lay = ctx.layout
    atomic_write_json(lay.metrics / "eval_intervals.json", comparison)
    report = f"# Evaluation with uncertainty ({ctx.cfg.method}, held-out test split, seeds {seeds})\n\n{table}"
    atomic_write_text(lay.reports / "eval_intervals.md", report)
    with stage_run(ctx, "intervals", **{FINGERPRINT_TAG: stage_fp}):
        flat: dict[str, float] = {}
        for name, entry in comparison["systems"].items():
            for m in STAT_METRICS:
                avg = entry[m]["avg"]
                if not math.isnan(avg["value"]):  # router accuracy of a system without a router
                    flat.update({f"{name}.avg_{m}": avg["value"], f"{name}.avg_{m}_low": avg["low"],
                                 f"{name}.avg_{m}_high": avg["high"]})
        mlflow.log_metrics(flat)
        mlflow.log_text(report, "eval_intervals.md")
        mlflow.log_dict(comparison, "eval_intervals.json")
    result = {"table": table, "comparison": comparison}
    record_success(ctx, "intervals", stage_fp, [lay.metrics / "eval_intervals.json", lay.reports / "eval_intervals.md"],
                   result)
    return result
