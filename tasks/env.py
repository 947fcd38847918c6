"""The process a stage runs in: offline and no-telemetry defaults, a project-local Prefect home, torch threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from moa_core.config import MoAConfig

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
    # one "Loading weights" bar per model load drowns the stage logs; transformers' warnings too
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    else:
        # the same settings as the variables transformers and huggingface_hub read at import: importing
        # transformers here only to set them costs ~1 s at start-up of every command, also those that never load
        # a model (moa validate, moa stage curate). Overridden, not defaulted, as the calls above override.
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"



def set_torch_threads(cfg: MoAConfig, jobs: int | None = None) -> int:
    """Threads per training job: the cores over the jobs that run side by side (default train.parallel_jobs)
    and over torchrun's ranks on this node."""
    import torch

    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    jobs = cfg.train.parallel_jobs if jobs is None else jobs
    n = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // (jobs * ranks))
    torch.set_num_threads(n)
    return n
