"""The stages' side of incremental retraining (the logic is moa_core.incremental): each stage computes its
fingerprint, returns its recorded result instead of running when `skip_if_unchanged` finds it unchanged, and
writes its record with `record_success` once its outputs are in place."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from moa_core.config import BaseModelConfig
from moa_core.incremental import (
    SKIPPED, STAGE_KEYS, base_model_identity, is_unchanged, make_record, path_digest, read_record, record_path,
    stage_fingerprint, write_record,
)

from .context import StageContext
from .logs import stage_logger

FINGERPRINT_TAG = "moa.fingerprint"  # on each stage's MLflow run: the fingerprint the stage ran for


# Resolving the base model converts the embedded SmolLM2 GGUF on first use. Stages fingerprint before they take
# TORCH_LOCK, so two task threads could otherwise convert into the same folder at once.
_BASE_RESOLVE_LOCK = threading.Lock()


def _base_identity(base: BaseModelConfig, root: Path) -> str:
    # imported here: moa_core.base_model imports torch and transformers (~3 s at start-up), which the stages that
    # do not fingerprint the base model (curate, intervals) never need. In the flow it is already imported.
    from moa_core.base_model import resolve_base_path

    with _BASE_RESOLVE_LOCK:
        path, model_id = resolve_base_path(base, root)
    return f"{model_id}:{base_model_identity(path)}"


def fingerprint_stage(ctx: StageContext, stage: str, reads: Iterable[Path], *, uses_base_model: bool = True,
                      **facts: Any) -> str:
    """`stage`'s fingerprint in this context: the params.yaml keys of its kind (the part of `stage` before ":"),
    the content of the files and folders it `reads` (a missing one counts as missing), the base model's identity
    (`uses_base_model`), the training seed and any other `facts` that choose its output (a domain's source rows,
    an eta)."""
    kind = stage.split(":")[0]
    inputs: dict[str, Any] = {
        "reads": {p.resolve().relative_to(ctx.root.resolve()).as_posix(): path_digest(p) for p in reads},
        "base_model": _base_identity(ctx.cfg.base_model, ctx.root) if uses_base_model else None,
        "seed": ctx.seed,
        **facts,
    }
    return stage_fingerprint(stage, ctx.cfg.model_dump(mode="json"), STAGE_KEYS[kind], inputs)


def _stage_key(ctx: StageContext, stage: str) -> str:
    return stage if ctx.seed is None else f"{stage} [seed {ctx.seed}]"


def _tag_parent(ctx: StageContext, stage: str, value: str) -> None:
    """`moa.stage.<stage>` = value on the pipeline's parent MLflow run (tag keys allow no ':' or brackets)."""
    if ctx.parent_run_id is None:
        return
    from mlflow import MlflowClient

    key = "moa.stage." + re.sub(r"[^\w.\-/ ]", ".", _stage_key(ctx, stage)).replace(" ", "")
    MlflowClient().set_tag(ctx.parent_run_id, key, value)


def skip_if_unchanged(ctx: StageContext, stage: str, fingerprint: str,
                      still_valid: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """The recorded result of `stage` when the run may skip it (ctx.skip_unchanged, the same fingerprint, its
    outputs untouched, and `still_valid(recorded result)` where given), with "skipped": True; else None and the
    stage runs. A skip is logged in the task's log and as a tag on the parent MLflow run."""
    if not ctx.skip_unchanged:
        return None
    record = read_record(record_path(ctx.layout.stage_records, stage))
    if record is None or not is_unchanged(record, fingerprint, ctx.root):
        return None
    if still_valid is not None and not still_valid(record.result):
        return None
    stage_logger().info("%s %s (fingerprint %s)", _stage_key(ctx, stage), SKIPPED, fingerprint[:12])
    _tag_parent(ctx, stage, SKIPPED)
    return {**record.result, "skipped": True, "stage": _stage_key(ctx, stage)}


def record_success(ctx: StageContext, stage: str, fingerprint: str, outputs: Iterable[Path],
                   result: Mapping[str, Any]) -> None:
    """After `stage` wrote `outputs`: its record, written last, so that an interrupted stage has none."""
    write_record(record_path(ctx.layout.stage_records, stage),
                 make_record(stage, fingerprint, ctx.root, outputs, result))
    _tag_parent(ctx, stage, "ran")
