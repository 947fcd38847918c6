"""The evaluate stage's rows about routing: the oracle (the trained MoA mixture with each test row's own expert)
and PEFT Arrow over the stage-1 experts, plus how close each routed system comes to the oracle."""

from __future__ import annotations

from moa_core.atomic import atomic_write_text

import json
from typing import Any

from moa_core.arrow import build_arrow
from moa_core.base_model import load_base
from moa_core.evaluate import SystemEval, evaluate_system
from moa_core.metrics import EvalRow
from moa_core.model import load_mixture, read_spec
from moa_core.oracle import oracle_table_markdown, percent_of_oracle

from .common import StageContext, stage_logger

ORACLE, ARROW = "oracle", "arrow"
ORACLE_FILE = "oracle.json"
NOT_ROUTED = ("base", "single", "mixed", ORACLE)  # systems without a routing decision of their own


def oracle_label(ctx: StageContext) -> str:
    return f"{ctx.cfg.method}-oracle"


def routing_rows(ctx: StageContext, test: dict[str, list[Any]], progress) -> dict[str, SystemEval]:
    """The oracle and Arrow rows that evaluate.baselines asks for (`progress(system, domains)` as evaluate's)."""
    wanted = set(ctx.cfg.evaluate.baselines)
    out: dict[str, SystemEval] = {}
    doms = list(test)
    if ORACLE in wanted:
        mixture = ctx.layout.mixture(ctx.cfg.method)
        if read_spec(mixture).routing != "sequence":
            stage_logger().info("oracle: %s routes per token, so no expert per row can be forced; row skipped",
                                ctx.cfg.method)
        else:
            base, tok, _ = load_base(ctx.cfg.base_model, ctx.root)
            out[ORACLE] = evaluate_system(load_mixture(base, mixture), tok, test, ctx.cfg, "gold",
                                          progress(oracle_label(ctx), doms))
    if ARROW in wanted:
        base, tok, _ = load_base(ctx.cfg.base_model, ctx.root)
        names = ctx.cfg.domain_names
        arrow = build_arrow(base, [ctx.layout.expert(d) for d in names], names, ctx.cfg.evaluate.arrow_top_k,
                            ctx.cfg.train.seed)
        out[ARROW] = evaluate_system(arrow, tok, test, ctx.cfg, "token", progress("peft-arrow", doms))
    return out


def oracle_comparison(ctx: StageContext, rows: list[EvalRow], names: dict[str, str]) -> tuple[dict[str, Any], str]:
    """`names`: system key -> table label. -> (metrics/oracle.json's contents, the markdown section); empty
    without an oracle row."""
    ctx.layout.metrics.mkdir(parents=True, exist_ok=True)
    if ORACLE not in names:
        atomic_write_text(ctx.layout.metrics / ORACLE_FILE, "{}\n")  # DVC expects the metrics file of every run
        return {}, ""
    routed = [label for key, label in names.items() if key not in NOT_ROUTED]
    pct = percent_of_oracle(rows, names[ORACLE], routed)
    acc = {r.system: r.router_accuracy for r in rows}
    data = {name: {f"pct_of_oracle_{m}": v for m, v in p.items()} for name, p in pct.items()}
    atomic_write_text(ctx.layout.metrics / ORACLE_FILE, json.dumps(data, indent=2, sort_keys=True))
    return data, oracle_table_markdown(pct, acc, names[ORACLE]) + "\n"
