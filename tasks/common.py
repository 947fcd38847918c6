"""What every stage shares, one module per concern; imported from here by the tasks, flows, CLI and tests:

- tasks/context.py   StageContext (config, layout, parent run, seed), the training metrics files, the checkpoint
                     fingerprint, the torchrun process group
- tasks/env.py       offline/no-telemetry environment, torch threads
- tasks/logs.py      the stage's logger, training progress lines, the stop announcement
- tasks/locks.py     TORCH_LOCK (one torch job per process), project_lock (one writer per project)
- tasks/tracking.py  MLflow: store, experiment, lineage tags, nested stage runs, step metrics
- tasks/prologue.py  the run prologue of the flows (config, env, threads, experiment, lock, parent run)
"""

from __future__ import annotations

from .context import (
    StageContext, data_parallel_group, fingerprint, read_training_metrics, write_training_metrics,
)
from .env import OFFLINE_ENV, configure_env, set_torch_threads
from .locks import TORCH_LOCK, project_lock
from .logs import announce_stop, progress, stage_logger
from .tracking import lineage_tags, log_history, mlflow_experiment, stage_run, tracking_uri

__all__ = [
    "OFFLINE_ENV", "TORCH_LOCK", "StageContext", "announce_stop", "configure_env", "data_parallel_group",
    "fingerprint", "lineage_tags", "log_history", "mlflow_experiment", "progress", "project_lock",
    "read_training_metrics", "set_torch_threads", "stage_logger", "stage_run", "tracking_uri",
    "write_training_metrics",
]
