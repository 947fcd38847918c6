"""train_expert stage (MoA stage 1): one PEFT LoRA per domain; and the LoRA-mixed baseline."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import mlflow

from moa_core.base_model import load_base
from moa_core.train import TrainResult, early_stopping_summary, train_peft_lora

from .common import (
    TORCH_LOCK, StageContext, data_parallel_group, fingerprint, log_history, progress, stage_run,
    write_training_metrics,
)
from .incremental import FINGERPRINT_TAG, fingerprint_stage, record_success, skip_if_unchanged


def _log_training(ctx: StageContext, result: TrainResult, out_dir: Path, metrics_name: str, title: str,
                  world_size: int = 1) -> dict[str, Any]:
    from .plots import loss_curve

    summary = {
        "final_loss": result.final_loss, "steps": result.steps, "train_seconds": round(result.seconds, 2),
        "tokens": result.tokens, "tokens_per_second": round(result.tokens_per_second, 1),
        "trainable_params": result.trainable_params, "resumed_from": result.resumed_from,
        "ddp_world_size": world_size,
    }
    summary.update(early_stopping_summary(result))
    log_history(result.history, "train/")
    log_history(result.val_history, "val/")
    mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
    mlflow.log_figure(loss_curve([int(h["step"]) for h in result.history], [h["loss"] for h in result.history], title,
                                 val=result.val_history, best_step=result.best_step), "plots/loss.png")
    mlflow.log_artifacts(str(out_dir), "adapter")
    write_training_metrics(ctx, metrics_name, summary)
    return summary


def _train(ctx: StageContext, domains: list[str], steps: int, out_dir: Path, ckpt: Path, run_name: str,
           metrics_name: str, init_from: Path | None = None) -> dict[str, Any]:
    # the stage's fingerprint decides whether this run may skip it; the checkpoint's own `fp` below only decides
    # whether an interrupted run's checkpoint may be resumed
    stage = run_name
    reads = [ctx.split_path(d, split) for d in domains for split in ("train", "val")]
    stage_fp = fingerprint_stage(ctx, stage, reads + ([init_from] if init_from is not None else []), domains=domains)
    if (done := skip_if_unchanged(ctx, stage, stage_fp)) is not None:
        return done
    records = [ctx.split(d, "train") for d in domains]
    val = [ctx.split(d, "val") for d in domains]
    steps = ctx.cfg.train.step_budget(steps, sum(len(r) for r in records))
    fp = fingerprint(ctx, "base_model", "lora", "train", domains=domains)
    if init_from is not None:
        if not (init_from / "adapter_model.safetensors").exists():
            raise FileNotFoundError(f"{init_from} is missing: train.experts_from is 'mixed', so train the LoRA-mixed "
                                    "adapter first (moa stage train-mixed)")
        fp += "-" + hashlib.sha256((init_from / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    with TORCH_LOCK, data_parallel_group() as dp:
        world = dp.world_size if dp else 1
        base, tok, model_id = load_base(ctx.cfg.base_model, ctx.root, dp.device if dp else None)
        if dp is not None and not dp.is_main:  # a helper rank computes its rows of each batch; rank 0 logs, saves
            train_peft_lora(base, tok, records, ctx.cfg, steps, out_dir, ckpt, None, fp, dp=dp, val_by_domain=val,
                            init_from=init_from)
            return {"rank": dp.rank}
        with stage_run(ctx, run_name, **{FINGERPRINT_TAG: stage_fp}):
            mlflow.set_tag("base_model", model_id)
            mlflow.log_params({"domains": ",".join(domains), "steps": steps, "base_model": model_id,
                               "init_from": str(init_from) if init_from else "fresh",
                               "ddp_world_size": world,
                               **{f"lora.{k}": v for k, v in ctx.cfg.lora.model_dump().items()},
                               **{f"train.{k}": v for k, v in ctx.cfg.train.model_dump().items()}})
            result = train_peft_lora(base, tok, records, ctx.cfg, steps, out_dir, ckpt,
                                     progress(run_name, steps), fp, dp=dp, val_by_domain=val, init_from=init_from)
            summary = _log_training(ctx, result, out_dir, metrics_name, f"{run_name} loss", world)
    shutil.rmtree(ckpt, ignore_errors=True)  # the adapter is saved; the checkpoint only serves an interrupted run
    record_success(ctx, stage, stage_fp, [out_dir, ctx.layout.metrics / f"{metrics_name}.json"], summary)
    return summary


def run_train_expert(ctx: StageContext, domain: str) -> dict[str, Any]:
    """Stage 1 for one domain -> models/experts/<domain>/ (PEFT adapter, safetensors)."""
    lay = ctx.layout
    return _train(ctx, [domain], ctx.cfg.train.expert_steps, lay.expert(domain), lay.checkpoints / f"expert-{domain}",
                  f"train_expert:{domain}", f"train_expert_{domain}",
                  init_from=lay.mixed if ctx.cfg.train.experts_from == "mixed" else None)


def run_train_mixed(ctx: StageContext) -> dict[str, Any]:
    """The LoRA-mixed baseline: one LoRA on all domains (batches as train.mixed_sampling says) -> models/mixed/."""
    lay = ctx.layout
    return _train(ctx, ctx.cfg.domain_names, ctx.cfg.train.mixed_steps, lay.mixed, lay.checkpoints / "mixed",
                  "train_mixed", "train_mixed")
