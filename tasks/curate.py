"""curate stage: raw source rows -> cleaned, deduplicated, split records + quarantine + data card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from moa_core.atomic import atomic_write_json
from moa_core.data import REJECTED_QUARANTINE, curate, require_rows, write_curated, write_jsonl_atomic
from moa_core.incremental import value_digest
from moa_core.sources import load_source

from .common import StageContext, stage_run
from .incremental import FINGERPRINT_TAG, fingerprint_stage, record_success, skip_if_unchanged


def run_curate(ctx: StageContext, domain: str) -> dict[str, Any]:
    """Curate one domain into data/curated/<domain>/; returns its counts. Raises `EmptyDomainError`
    (naming the domain) before anything downstream trains on nothing."""
    dom = ctx.cfg.domain(domain)
    source = dom.source
    if source.kind == "file" and source.path and not Path(source.path).is_absolute():
        source = source.model_copy(update={"path": str(ctx.root / source.path)})  # relative to params.yaml
    src = load_source(source)
    stage = f"curate:{domain}"
    # the raw rows themselves (any source kind), the domain's entry and where the rows came from (the data card)
    fp = fingerprint_stage(ctx, stage, [], uses_base_model=False, domain=dom.model_dump(mode="json"),
                           rows=value_digest(src.rows), origin=[src.origin, src.licence, src.attribution])
    if (done := skip_if_unchanged(ctx, stage, fp)) is not None:
        return done
    result = curate(src.rows, domain, ctx.cfg.curate)
    card = {
        "domain": domain, "description": dom.description, "origin": src.origin,
        "licence": dom.source.licence or src.licence, "attribution": dom.source.attribution or src.attribution,
        "counts": result.counts, "settings": ctx.cfg.curate.model_dump(),
    }
    out = ctx.layout.curated(domain)
    if not result.train:  # the earlier splits stay: nothing here is worth replacing them with
        rejected = out / REJECTED_QUARANTINE
        write_jsonl_atomic(rejected, result.quarantine)
        require_rows(result, domain, rejected)
    write_curated(out, result, card)
    counts_file = atomic_write_json(ctx.layout.metrics / f"curate_{domain}.json", result.counts)
    with stage_run(ctx, stage, domain=domain, **{FINGERPRINT_TAG: fp}) as _run:
        mlflow.log_params({"domain": domain, "source": dom.source.kind, **{f"curate.{k}": v for k, v in ctx.cfg.curate.model_dump().items()}})
        mlflow.log_metrics({k: float(v) for k, v in result.counts.items() if isinstance(v, int | float)})
        mlflow.log_artifact(str(out / "card.json"), "data")
        if result.quarantine:
            mlflow.log_artifact(str(out / "quarantine.jsonl"), "data")
    record_success(ctx, stage, fp, [out, counts_file], result.counts)
    return result.counts
