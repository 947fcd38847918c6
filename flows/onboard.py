"""onboard_domain: add one domain to the trained mixture without retraining the other experts.

check (before anything trains) -> curate[new] -> train_expert[new] (MoA stage 1) -> extend (new expert +
router update, old experts frozen and hash-checked) -> evaluate (old mixture on old domains vs candidate on
all) -> register (a new version; @champion, the project's mixture and params.yaml move only if no old
domain regressed). One Prefect flow run, one parent MLflow run with a nested run per stage.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger

from moa_core.atomic import atomic_write_json
from tasks.curate import run_curate
from tasks.onboard import (
    OnboardPlan, onboarding_cost, plan_onboarding, run_extend, run_onboard_evaluate, run_onboard_register, with_parent,
)
from tasks.prefect_tasks import stage_task
from tasks.prologue import flow_run_prologue
from tasks.train_expert import run_train_expert


@stage_task(name="onboard_curate", task_run_name="curate[{plan.domain}]")
def curate_new(plan: OnboardPlan) -> dict[str, Any]:
    return run_curate(plan.new, plan.domain)


@stage_task(name="onboard_train_expert", task_run_name="train_expert[{plan.domain}]", retries=1, retry_delay_seconds=2)
def train_new_expert(plan: OnboardPlan) -> dict[str, Any]:
    return run_train_expert(plan.new, plan.domain)


@stage_task(name="onboard_extend", task_run_name="extend[{plan.domain}]", retries=1, retry_delay_seconds=2)
def extend(plan: OnboardPlan) -> dict[str, Any]:
    return run_extend(plan)


@stage_task(name="onboard_evaluate", task_run_name="evaluate[{plan.domain}]")
def evaluate(plan: OnboardPlan) -> dict[str, Any]:
    return run_onboard_evaluate(plan)


@stage_task(name="onboard_register", task_run_name="register[{plan.domain}]")
def register(plan: OnboardPlan, evaluation: dict[str, Any]) -> dict[str, Any]:
    return run_onboard_register(plan, evaluation)


@flow(name="onboard_domain")
def onboard_domain(domain: str, source: str, fields: dict[str, str] | None = None, description: str = "",
                   params: str = "params.yaml", profile: str | None = None) -> dict[str, Any]:
    """Onboard `domain` from `source` (a local .jsonl/.json/.parquet/.csv path or a dataset id in the local
    HF cache; `fields` maps instruction/response[/input/id] to its columns)."""
    import mlflow
    from prefect.runtime import flow_run

    log = get_run_logger()
    plan = plan_onboarding(params, domain, source, fields, description, profile)  # fails before any training
    log.info("onboarding %r onto the %s mixture of %s", domain, plan.method, plan.old.cfg.domain_names)
    # as in moa_pipeline: SIGINT/SIGTERM stop the running job at its next step boundary (moa_core.stopping)
    with flow_run_prologue(plan.new, run_name=f"onboard:{domain}", holder=f"onboard_domain flow run {flow_run.id} ({domain})",
                           rerun=f"moa onboard -d {domain} -s {source}", flow_run_id=str(flow_run.id)) as started:
        parent = started.parent
        mlflow.log_params({"domain": domain, "source": json.dumps(plan.entry["source"]), "method": plan.method,
                           "profile": profile or "default"})
        plan = with_parent(plan, parent.info.run_id, str(flow_run.id))
        counts = curate_new(plan)  # an empty or unreadable domain stops here
        log.info("curated %s: %s", domain, counts)
        expert = train_new_expert(plan) if plan.recipe.needs_experts else None
        extended = extend(plan)
        evaluation = evaluate(plan)
        registered = register(plan, evaluation)
        cost = onboarding_cost(plan, expert, extended)
        mlflow.log_metrics({k: float(v) for k, v in cost.items() if isinstance(v, int | float)})
        result = {"domain": domain, "counts": counts, "extend": extended, "evaluation": evaluation,
                  "registered": registered, "cost": cost, "mlflow_run_id": parent.info.run_id,
                  "flow_run_id": str(flow_run.id)}
        out = atomic_write_json(plan.new.layout.metrics / f"onboard_{domain}.json", result, default=str)
        mlflow.log_artifact(str(out))
    log.info("%s: %s; registered version %s (promoted: %s)", domain, evaluation["reason"], registered["version"],
             registered["promoted"])
    return result
