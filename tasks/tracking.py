"""MLflow: the tracking store, the experiment, lineage tags, one nested run per stage, batched step metrics."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .context import StageContext


def tracking_uri(ctx: StageContext) -> str:
    """params.yaml's tracking.mlflow_uri; `MOA_TRACKING_URI` overrides it where the same server has another
    address (a worker container reaches http://mlflow:5000, the host http://127.0.0.1:5000: infra/README.md)."""
    uri = os.environ.get("MOA_TRACKING_URI") or ctx.cfg.tracking.mlflow_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        db = ctx.root / uri.removeprefix("sqlite:///")
        db.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{db}"
    return uri


def mlflow_experiment(ctx: StageContext) -> str:
    """Point MLflow at the project's store and return the experiment id (created on first use)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(ctx))
    exp = mlflow.get_experiment_by_name(ctx.cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location: str | None = None
    if "://" in ctx.cfg.tracking.artifact_root:  # e.g. s3://bucket/path
        location = ctx.cfg.tracking.artifact_root
    elif not tracking_uri(ctx).startswith(("http://", "https://")):  # a tracking server picks its own (S3, proxied)
        art = Path(ctx.cfg.tracking.artifact_root)
        art = art if art.is_absolute() else ctx.root / art
        art.mkdir(parents=True, exist_ok=True)
        location = art.as_uri()
    try:
        return mlflow.create_experiment(ctx.cfg.tracking.experiment, artifact_location=location)
    except Exception:  # another process created it between our check and create
        return mlflow.get_experiment_by_name(ctx.cfg.tracking.experiment).experiment_id


def lineage_tags(ctx: StageContext) -> dict[str, str]:
    tags: dict[str, str] = {"moa.method": ctx.cfg.method}
    try:
        tags["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ctx.root, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "none"
    lock = ctx.root / "dvc.lock"
    tags["dvc_lock_md5"] = hashlib.md5(lock.read_bytes()).hexdigest() if lock.exists() else "none"
    if ctx.flow_run_id:
        tags["prefect_flow_run_id"] = ctx.flow_run_id
    if ctx.seed is not None:
        tags["moa.seed"] = str(ctx.seed)
    return tags


@contextlib.contextmanager
def stage_run(ctx: StageContext, name: str, **tags: str) -> Iterator[Any]:
    """A nested MLflow run under the pipeline's parent run (a standalone run when a stage runs alone,
    e.g. from `dvc repro`). Safe from worker threads: each thread has its own active-run stack."""
    import mlflow

    exp_id = mlflow_experiment(ctx)
    stage = name.split(":")[0]
    name = name if ctx.seed is None else f"{name} [seed {ctx.seed}]"
    with mlflow.start_run(experiment_id=exp_id, run_name=name, parent_run_id=ctx.parent_run_id,
                          nested=ctx.parent_run_id is not None,
                          tags={**lineage_tags(ctx), "moa.stage": stage, **tags}) as run:
        yield run


def log_history(history: list[dict[str, float]], prefix: str = "") -> None:
    """Per-step training metrics, batched into one MLflow call."""
    import mlflow
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    ms = [Metric(f"{prefix}{k}", float(v), now, int(h["step"])) for h in history for k, v in h.items() if k != "step"]
    if ms:
        mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=ms)
