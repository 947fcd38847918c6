"""train_router stage: the method's mixture after stage 1 (MoA stage 2, MoSLD joint, MoDULA stages)."""

from __future__ import annotations

import contextlib
import shutil
from typing import Any

import mlflow

from moa_core.base_model import load_base
from moa_core.incremental import split_timings
from moa_core.methods import DomainData, fit_method, get_method
from moa_core.fallback import resolve_threshold
from moa_core.model import save_mixture
from moa_core.train import early_stopping_summary

from .common import (
    TORCH_LOCK, StageContext, data_parallel_group, fingerprint, log_history, progress, stage_run,
    write_training_metrics,
)
from .incremental import FINGERPRINT_TAG, fingerprint_stage, record_success, skip_if_unchanged


def run_train_router(ctx: StageContext, method: str | None = None, eta: float | None = None,
                     name: str | None = None) -> dict[str, Any]:
    """Train `method` (default: params.yaml's) -> models/mixture/<name>/. `eta=0.0` with name
    'moa-no-routing-loss' gives the routing-loss ablation."""
    from .plots import loss_curve

    method = method or ctx.cfg.method
    name = name or method
    lay, doms = ctx.layout, ctx.cfg.domain_names
    recipe = get_method(method)
    stage = f"train_router:{name}"
    reads = [ctx.split_path(d, split) for d in doms for split in ("train", "val")]
    stage_fp = fingerprint_stage(ctx, stage, reads + ([lay.expert(d) for d in doms] if recipe.needs_experts else []),
                                 method=method, eta=eta, name=name)
    if (done := skip_if_unchanged(ctx, stage, stage_fp)) is not None:
        return done
    train = [ctx.split(d, "train") for d in doms]
    val = [ctx.split(d, "val") for d in doms]
    ckpt = lay.checkpoints / f"mixture-{name}"
    fp = fingerprint(ctx, *recipe.config_sections, domains=doms) + f"-{eta}"
    expert_dirs = [lay.expert(d) for d in doms] if recipe.needs_experts else None
    data = DomainData(train, val)
    with TORCH_LOCK, data_parallel_group() as dp, contextlib.ExitStack() as run:
        world = dp.world_size if dp else 1
        base, tok, model_id = load_base(ctx.cfg.base_model, ctx.root, dp.device if dp else None)
        if dp is not None and not dp.is_main:  # a helper rank computes its rows of each batch; rank 0 logs, saves
            fit_method(ctx.cfg, method, base, tok, model_id, data, expert_dirs=expert_dirs, ckpt_root=ckpt,
                       eta=eta, fingerprint=fp, dp=dp)
            return {"rank": dp.rank}
        run.enter_context(stage_run(ctx, stage, method=method, **{FINGERPRINT_TAG: stage_fp}))
        mlflow.set_tag("base_model", model_id)
        mlflow.log_params({"method": method, "eta": ctx.cfg.router.eta if eta is None else eta,
                           "ddp_world_size": world,
                           **{f"router.{k}": v for k, v in ctx.cfg.router.model_dump().items()},
                           "train.joint_steps": ctx.cfg.train.joint_steps, "train.joint_lr": ctx.cfg.train.joint_lr})
        mm, phases = fit_method(
            ctx.cfg, method, base, tok, model_id, data, expert_dirs=expert_dirs, ckpt_root=ckpt, eta=eta,
            fingerprint=fp, dp=dp,
            on_log=progress(f"train_router:{name}", ctx.cfg.train.step_budget(ctx.cfg.train.joint_steps, sum(map(len, train)))),
        )
        summary: dict[str, Any] = {
            "ddp_world_size": world,
            "method": method,
            "train_seconds": round(sum(r.seconds for r in phases.values()), 2),
            "trainable_params": sum(p.numel() for p in mm.mixture_parameters().values()),
            "phases": {k: {"final_loss": r.final_loss, "steps": r.steps, "seconds": round(r.seconds, 2),
                           "tokens_per_second": round(r.tokens_per_second, 1), **early_stopping_summary(r)}
                       for k, r in phases.items()},
        }
        for phase, r in phases.items():
            tag = phase.replace(":", "_")
            log_history(r.history, f"{tag}/")
            log_history(r.val_history, f"{tag}/")
            mlflow.log_figure(loss_curve([int(h["step"]) for h in r.history], [h["loss"] for h in r.history],
                                         f"{name} {phase}", val=r.val_history, best_step=r.best_step),
                              f"plots/loss_{tag}.png")
        mlflow.log_metrics({"train_seconds": summary["train_seconds"], "trainable_params": summary["trainable_params"]})
        mm.spec.fallback_threshold = resolve_threshold(mm, tok, ctx.splits("val"), ctx.cfg)
        if mm.spec.fallback_threshold is not None:
            summary["fallback_threshold"] = mm.spec.fallback_threshold
            mlflow.log_metric("fallback_threshold", mm.spec.fallback_threshold)
        out = save_mixture(mm, lay.mixture(name), extra={"train": split_timings(summary)[0]})  # the same bytes each run
        mlflow.log_artifacts(str(out), "mixture")
    shutil.rmtree(ckpt, ignore_errors=True)
    write_training_metrics(ctx, f"train_router_{name}", summary)
    record_success(ctx, stage, stage_fp, [out, lay.metrics / f"train_router_{name}.json"], summary)
    return summary
