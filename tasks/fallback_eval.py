"""The evaluate stage's out-of-domain check: does the router fall back (MoA: to the base model; MoDULA: to its
universal expert) on prompts from no domain, while still routing the in-domain test prompts (moa_core.fallback)?"""

from __future__ import annotations

from moa_core.atomic import atomic_write_text

import json
from typing import Any

from moa_core.base_model import load_base
from moa_core.fallback import FALLBACK, evaluate_fallback, fallback_name, out_of_domain_instructions
from moa_core.model import load_mixture, read_spec

from .common import StageContext, stage_logger

FALLBACK_FILE = "fallback.json"


def run_fallback_eval(ctx: StageContext, test: dict[str, list[Any]]) -> dict[str, Any] | None:
    """-> the report as a dict (also metrics/fallback.json), or None where the mixture has no fallback threshold
    (MoSLD, or router.fallback_threshold: off when the mixture was trained)."""
    mixture = ctx.layout.mixture(ctx.cfg.method)
    spec = read_spec(mixture)
    threshold = spec.fallback_threshold
    ctx.layout.metrics.mkdir(parents=True, exist_ok=True)
    if threshold is None:
        stage_logger().info("fallback: %s has no fallback threshold (MoSLD has no fallback, or "
                            "router.fallback_threshold: off); skipped", ctx.cfg.method)
        atomic_write_text(ctx.layout.metrics / FALLBACK_FILE, "{}\n")  # DVC expects the metrics file of every run
        return None
    ood = out_of_domain_instructions(ctx.cfg, per_category=max(len(v) for v in test.values()), seed=ctx.cfg.curate.seed)
    base, tok, _ = load_base(ctx.cfg.base_model, ctx.root)
    report = evaluate_fallback(load_mixture(base, mixture), tok, test, ood, threshold, ctx.cfg)
    result = {**report.as_dict(), "out_of_domain_categories": sorted(ood),
              "answered_by": "base model" if fallback_name(spec) == FALLBACK else "universal expert alone"}
    atomic_write_text(ctx.layout.metrics / FALLBACK_FILE, json.dumps(result, indent=2, sort_keys=True))
    return result


def fallback_markdown(r: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f} %"

    return (
        f"## Out-of-domain fallback (threshold {r['threshold']:.3f})\n\n"
        f"{r['out_of_domain']} out-of-domain prompts (BBC {', '.join(r['out_of_domain_categories'])}) and "
        f"{r['in_domain']} in-domain test prompts. A prompt whose routing confidence is below the threshold is "
        f"answered by the {r['answered_by']}{'; no prompt fell back' if r['precision'] is None else ''}.\n\n"
        "| fallback precision | fallback recall | in-domain kept routed | router acc (fallback on) | router acc (off) |\n"
        "|---:|---:|---:|---:|---:|\n"
        f"| {pct(r['precision'])} | {pct(r['recall'])} | {pct(r['in_domain_kept'])} | "
        f"{pct(r['router_accuracy'])} | {pct(r['router_accuracy_no_fallback'])} |\n\n"
    )
