"""The run prologue every flow repeated: environment, torch threads, the MLflow experiment, stop-on-signal, the
project lock and the parent MLflow run, entered in that order and left in reverse."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from moa_core.stopping import stop_on_signals

from .context import StageContext
from .env import configure_env, set_torch_threads
from .locks import project_lock
from .logs import announce_stop
from .tracking import lineage_tags, mlflow_experiment


@dataclass(frozen=True)
class StartedRun:
    """Inside the prologue: the context with the parent run and flow run set, the parent MLflow run, the threads."""

    ctx: StageContext
    parent: Any  # mlflow.ActiveRun
    torch_threads: int


@contextlib.contextmanager
def flow_run_prologue(ctx: StageContext, *, run_name: str, holder: str, rerun: str,
                      flow_run_id: str | None = None) -> Iterator[StartedRun]:
    """Offline env and torch threads for `ctx`, then, held for the whole block: SIGINT/SIGTERM ask the running jobs to
    stop at their next step (`rerun` is the command the announcement names), the project lock (`holder` says who
    holds it) and the parent MLflow run `run_name`, tagged with the lineage and the Prefect flow run id. The
    yielded context carries the parent run id, so the stages' runs nest under it."""
    import mlflow

    configure_env(ctx.root)
    threads = set_torch_threads(ctx.cfg)
    ctx = dataclasses.replace(ctx, flow_run_id=flow_run_id)
    experiment = mlflow_experiment(ctx)
    # Prefect's flow engine turns SIGTERM into an exception in this thread, which would leave the training
    # threads running to their end: inside the flow, both signals ask every job to stop at its next step
    with stop_on_signals(announce_stop(ctx, rerun)), project_lock(ctx.root, holder), \
            mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=lineage_tags(ctx)) as parent:
        yield StartedRun(dataclasses.replace(ctx, parent_run_id=parent.info.run_id), parent, threads)
