"""The stages as Prefect tasks: coarse (one task = one curation / training / evaluation job), retried
only on errors a retry can fix, never cached by Prefect: what a run may skip is decided by one mechanism, the
stages' own records (tasks/incremental.py), which `moa stage` (DVC's commands) writes too."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from moa_core.base_model import BaseModelError
from moa_core.config import ConfigError
from moa_core.model import MixtureError
from moa_core.stopping import StopRequested, raise_if_stop_requested
from moa_core.train import NonFiniteLossError

from .curate import run_curate
from .evaluate import run_evaluate, run_intervals
from .register import run_register
from .train_expert import run_train_expert, run_train_mixed
from .train_router import run_train_router

# Bad input, bad config, damaged artifacts and diverged training fail the same way on every try.
# A stop request (SIGINT/SIGTERM) ends the job at a step boundary: a retry would start it again.
NOT_RETRYABLE = (ConfigError, MixtureError, BaseModelError, NonFiniteLossError, StopRequested, FileNotFoundError,
                 KeyError, ValueError)


def _retryable(_task: Any, _run: Any, state: Any) -> bool:
    try:
        state.result()
    except NOT_RETRYABLE:
        return False
    except Exception:
        return True
    return False


TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False, "retry_condition_fn": _retryable}


def stage_task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """`prefect.task` with TASK_OPTIONS for a stage job (this module's and the onboarding flow's). A job whose turn
    comes after a stop request ends at once instead of loading the base model and running a step (on a CPU that
    made Ctrl-C take ~25 s: each waiting job started, trained one step and checkpointed)."""
    def make(job: Callable[..., Any]) -> Any:
        @functools.wraps(job)  # Prefect reads the parameters (and task_run_name's fields) from the wrapped signature
        def run(*args: Any, **kwargs: Any) -> Any:
            raise_if_stop_requested(f"{options.get('name', job.__name__)} not started")
            return job(*args, **kwargs)
        return task(run, **options, **TASK_OPTIONS)
    return make


curate_task = stage_task(name="curate", task_run_name="curate[{domain}]")(run_curate)
train_expert_task = stage_task(name="train_expert", task_run_name="train_expert[{domain}]", retries=1,
                               retry_delay_seconds=2)(run_train_expert)
train_mixed_task = stage_task(name="train_mixed", retries=1, retry_delay_seconds=2)(run_train_mixed)
train_router_task = stage_task(name="train_router", task_run_name="train_router[{name}]", retries=1,
                               retry_delay_seconds=2)(run_train_router)
evaluate_task = stage_task(name="evaluate")(run_evaluate)
intervals_task = stage_task(name="intervals")(run_intervals)
register_task = stage_task(name="register", retries=2, retry_delay_seconds=1)(run_register)

# The pipeline's stages in run order: moa_pipeline (flows/pipeline.py) runs them as these tasks, dvc.yaml has one
# stage of each name running `moa stage <name, with - for _>`. tests/test_pipeline_definition.py holds dvc.yaml
# and the flow's task runs to this list, so the two definitions cannot drift apart.
PIPELINE_STAGES: dict[str, Any] = {
    "curate": curate_task, "train_expert": train_expert_task, "train_mixed": train_mixed_task,
    "train_router": train_router_task, "evaluate": evaluate_task, "intervals": intervals_task,
    "register": register_task,
}
