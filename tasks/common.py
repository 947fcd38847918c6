"""What every stage shares: the validated config, where artifacts live, and the MLflow run to log into."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_core.atomic import atomic_write_json
from moa_core.config import MoAConfig, load_config
from moa_core.data import Record, read_records
from moa_core.incremental import merge_timings, split_timings
from moa_core.layout import Layout

# Offline, no telemetry, in every process that runs a stage (verified variable names, see README).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure_env(root: Path) -> None:
    """Set offline/telemetry defaults and a project-local PREFECT_HOME, without overriding the user's."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
    # MLflow's artifact progress bars are carriage-return redraws: noise in a log file or a CI log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Prefect's embedded server gets 20 s to start by default: not enough on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load drowns the stage logs
    hf_logging.set_verbosity_error()


def stage_logger():
    """The Prefect task/flow run's logger (its lines show in the Prefect UI), or outside a run (a DVC stage,
    a test) the standard `moa` logger."""
    import logging

    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("moa")


def progress(name: str, total: int):
    """An `on_log` callback for training loops: `name step 10/40 loss 2.31 ...` in the Prefect task's
    log (visible in the Prefect UI) or, outside a task run, on the standard logger."""
    log = stage_logger()

    def on_log(step: int, entry: dict[str, float]) -> None:
        if "val_loss" in entry:  # an early-stopping evaluation
            log.info("%s step %d/%d validation loss %.4f (best at step %d)", name, step, total, entry["val_loss"],
                     int(entry.get("best_step", 0)))
            return
        extra = " ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("step", "loss") and isinstance(v, float))
        log.info("%s step %d/%d loss %.4f %s", name, step, total, entry["loss"], extra)

    return on_log


def announce_stop(ctx: StageContext, rerun: str):
    """moa_core.stopping's `announce` callback: one line on stderr (and in the run's log) when a signal asks
    the running jobs to stop at their next step boundary."""
    import signal
    import sys

    def announce(sig: signal.Signals) -> None:
        line = (f"stop requested ({sig.name}): finishing the current step; the checkpoint goes under "
                f"{ctx.layout.checkpoints}; re-run `{rerun}` to resume (send the signal again to kill at once)")
        try:  # inside a flow run: its logger prints the line and keeps it in the Prefect UI
            from prefect import get_run_logger

            get_run_logger().warning(line)
        except Exception:  # noqa: BLE001 - outside a run (or the log fails): plain stderr; never a crash here
            print(f"moa: {line}", file=sys.stderr, flush=True)

    return announce


# Torch work of tasks that share one process runs one job at a time. Two trainings in two threads of one
# process produced a NaN loss on the second step here (each alone is finite), and on a 2-core machine
# they would only split the same cores anyway. Parallel training = separate processes (a work pool).
TORCH_LOCK = threading.Lock()


@contextlib.contextmanager
def project_lock(root: Path, holder: str, inheritable: bool = False) -> Iterator[None]:
    """One writer per project at a time: an exclusive lock on <root>/.moa.lock, held by a pipeline run,
    an onboarding run or a `moa stage` command for its whole duration. A second run waits (and says so)
    instead of interleaving its MLflow registration and DVC outputs with the first one's. The OS drops the
    lock when the holder dies, so a killed run never leaves a stale lock behind. `inheritable`: the lock
    survives an exec of this process (the torchrun launcher of `moa stage ... --nproc-per-node`)."""
    import fcntl
    import logging
    import time

    path = Path(root) / ".moa.lock"
    with open(path, "a+") as fh:
        if inheritable:
            os.set_inheritable(fh.fileno(), True)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            other = fh.read().strip() or "another process"
            logging.getLogger("moa").warning("%s waits: %s holds %s", holder, other, path)
            print(f"moa: {holder} waits for {other} (lock {path})", flush=True)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            logging.getLogger("moa").warning("%s got the lock after %.1f s", holder, time.monotonic() - t0)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}: {holder}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class StageContext:
    """Passed to every stage: config validated once, the artifact layout, and the parent MLflow run."""

    cfg: MoAConfig
    root: Path
    parent_run_id: str | None = None
    flow_run_id: str | None = None
    seed: int | None = None  # set for each seed of a run over several training seeds (train.seeds)
    # The pipeline flow skips a stage whose inputs did not change since its last successful run (tasks/incremental.py);
    # `moa run --force` and `moa stage` (DVC decides there) run every stage they are asked to.
    skip_unchanged: bool = False

    @classmethod
    def load(cls, params: str | Path = "params.yaml", profile: str | None = None, **kw: Any) -> "StageContext":
        path = Path(params).resolve()
        return cls(cfg=load_config(path, profile), root=path.parent, **kw)

    @property
    def layout(self) -> Layout:
        return Layout.at(self.root, self.seed)

    @property
    def seeds(self) -> list[int]:
        return self.cfg.train.all_seeds

    def for_seed(self, seed: int) -> "StageContext":
        """The context of one training seed: train.seed set, and its own models/metrics folders when the run
        has several seeds (a one-seed run keeps the plain layout)."""
        cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"seed": seed})})
        return dataclasses.replace(self, cfg=cfg, seed=seed if len(self.seeds) > 1 else None)

    def split_path(self, domain: str, split: str) -> Path:
        path = self.layout.curated(domain) / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the curate stage for {domain!r} first (moa stage curate {domain})")
        return path

    def split(self, domain: str, split: str) -> list[Record]:
        return read_records(self.split_path(domain, split))

    def splits(self, split: str, domains: list[str] | None = None) -> dict[str, list[Record]]:
        return {d: self.split(d, split) for d in (domains or self.cfg.domain_names)}


@contextlib.contextmanager
def data_parallel_group() -> Iterator[Any]:
    """The torchrun process group of a `moa stage ... --nproc-per-node N` job (a moa_core.distributed
    DataParallel), or None when the stage runs as one process."""
    from moa_core.distributed import init_from_env, shutdown

    dp = init_from_env()
    try:
        yield dp
    finally:
        shutdown(dp)


def set_torch_threads(cfg: MoAConfig, jobs: int | None = None) -> int:
    """Threads per training job: the cores over the jobs that run side by side (default train.parallel_jobs)
    and over torchrun's ranks on this node."""
    import torch

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    jobs = cfg.train.parallel_jobs if jobs is None else jobs
    n = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // (jobs * ranks))
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------------------------------ MLflow
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


def write_training_metrics(ctx: StageContext, name: str, summary: dict[str, Any]) -> None:
    """A training stage's summary -> metrics/<name>.json (DVC-tracked: the same bytes for the same inputs) and its
    wall-clock timings -> metrics/timings/<name>.json (untracked; the evaluation table's training time)."""
    tracked, timings = split_timings(summary)
    atomic_write_json(ctx.layout.metrics / f"{name}.json", tracked)
    atomic_write_json(ctx.layout.timings / f"{name}.json", timings)


def read_training_metrics(ctx: StageContext, name: str) -> dict[str, Any]:
    """What `write_training_metrics` wrote, merged again ({} when the stage has not run)."""
    import json

    tracked, timings = (json.loads(p.read_text()) if p.exists() else {}
                        for p in (ctx.layout.metrics / f"{name}.json", ctx.layout.timings / f"{name}.json"))
    return merge_timings(tracked, timings) if tracked else {}


def fingerprint(ctx: StageContext, *sections: str, domains: list[str] | None = None) -> str:
    """Hash of the config sections and curated train data a training job depends on: a checkpoint from
    other settings or data is not resumed."""
    h = hashlib.sha256()
    dump = ctx.cfg.model_dump()
    for s in sections:
        h.update(repr(dump.get(s)).encode())
    for d in domains or []:
        path = ctx.layout.curated(d) / "train.jsonl"
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]
