"""moa_pipeline: curate (per domain) -> train_expert (per domain) + train_mixed -> train_router ->
evaluate -> register, as Prefect task runs under one flow run and one parent MLflow run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dispatch import dispatch_experts
from moa_core.config import ConfigError
from moa_core.methods import planned_mixtures
from moa_core.stopping import raise_if_stop_requested, stop_requested, stop_signal
from tasks.common import StageContext
from tasks.prologue import flow_run_prologue
from tasks.prefect_tasks import (
    curate_task, evaluate_task, intervals_task, register_task, train_expert_task, train_mixed_task, train_router_task,
)


@flow(name="moa_pipeline", task_runner=ThreadPoolTaskRunner(max_workers=2))
def moa_pipeline(params: str = "params.yaml", profile: str | None = None,
                 expert_deployment: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train and register a multi-domain mixture from params.yaml (optionally a `profiles:` entry).
    `expert_deployment` (e.g. moa_train_expert/process): train each domain's expert as its own flow run of that
    deployment on its work pool (flows/dispatch.py) instead of as a task thread of this run.
    A stage whose inputs did not change since its last successful run is skipped ("unchanged, skipped" in its
    task's log and on this run's MLflow run; tasks/incremental.py); `force` runs every stage."""
    import mlflow
    from prefect.runtime import flow_run

    log = get_run_logger()
    ctx = StageContext.load(params, profile)
    cfg = ctx.cfg
    rerun = "moa run" + (f" --profile {profile}" if profile else "")
    with flow_run_prologue(ctx, run_name=f"pipeline:{cfg.method}", holder=f"moa_pipeline flow run {flow_run.id}",
                           rerun=rerun, flow_run_id=str(flow_run.id)) as started:
        parent = started.parent
        log.info("method=%s domains=%s base=%s torch threads=%d", cfg.method, cfg.domain_names, cfg.base_model.source,
                 started.torch_threads)
        mlflow.log_params({"method": cfg.method, "domains": ",".join(cfg.domain_names), "profile": profile or "default",
                           "base_model": cfg.base_model.source, "force": force})
        mlflow.log_artifact(str(ctx.root / "params.yaml"))
        ctx = dataclasses.replace(started.ctx, skip_unchanged=not force)

        submitted: list[PrefectFuture] = []
        try:
            # curation of every domain finishes before any training starts: an empty domain stops the run here
            curated = {d: curate_task.submit(ctx, d) for d in cfg.domain_names}
            submitted += curated.values()
            counts = {d: f.result() for d, f in curated.items()}
            for d, c in counts.items():
                log.info("curated %s: %s", d, c)
            raise_if_stop_requested("the pipeline stopped after curation, before any training")

            # One pass of training and evaluation per training seed (train.seeds); the curated data is shared.
            # The first seed's mixture is the one registered; the intervals pool every seed's test rows.
            if expert_deployment and len(ctx.seeds) > 1:
                raise ConfigError("train.seeds with several seeds trains the experts in this flow run; run without "
                                  "--expert-deployment, or with one seed")
            evaluations = []
            for seed in ctx.seeds:
                sctx = ctx.for_seed(seed)
                if expert_deployment:  # one flow run per domain on a work pool; the adapters land in the shared project dir
                    upstream = [train_mixed_task.submit(sctx)] if "mixed" in cfg.evaluate.baselines else []
                    dispatch_experts(params=str(Path(params).resolve()), profile=profile, deployment_name=expert_deployment,
                                     parent_run_id=parent.info.run_id)
                    experts = []
                else:
                    # experts_from: mixed -> every expert starts from the LoRA-mixed adapter, so that one trains first
                    if cfg.train.experts_from == "mixed":
                        mixed = [train_mixed_task.submit(sctx)]
                        experts = [train_expert_task.submit(sctx, d, wait_for=mixed) for d in cfg.domain_names]
                    else:
                        experts = [train_expert_task.submit(sctx, d) for d in cfg.domain_names]
                        mixed = [train_mixed_task.submit(sctx)] if "mixed" in cfg.evaluate.baselines else []
                    upstream = list(experts) + mixed
                for mix in planned_mixtures(cfg):  # the method, the routing-loss ablation, compare_methods
                    upstream.append(train_router_task.submit(sctx, method=mix.method, eta=mix.eta, name=mix.name,
                                                             wait_for=experts if mix.needs_experts else []))
                evaluations.append(evaluate_task.submit(sctx, wait_for=upstream))
                submitted += [*upstream, evaluations[-1]]
            intervals = intervals_task.submit(ctx, wait_for=evaluations)
            evaluation = evaluations[0]
            registered = register_task.submit(ctx.for_seed(ctx.seeds[0]), wait_for=[intervals])
            submitted += [intervals, registered]
            ev, reg, ci = evaluation.result(), registered.result(), intervals.result()
            skipped = sorted(r["stage"] for f in submitted if isinstance(r := f.result(), dict) and r.get("skipped"))
        except Exception:
            if not stop_requested():
                raise
            wait(submitted)  # the running jobs stop at their next step boundary; leave none behind the lock
            mlflow.end_run("KILLED")
            log.warning("moa_pipeline stopped by request: the checkpoints under %s resume with `%s`",
                        ctx.layout.checkpoints, rerun)
            return Cancelled(message=f"stopped by {stop_signal().name if stop_signal() else 'request'}; "
                                     "re-run to resume from the checkpoints")
        # the table itself: reports/eval.md and MLflow (and `moa run` prints it once, without a log prefix)
        log.info("evaluated: %s; report %s", ", ".join(f"{k} {v:.4g}" for k, v in ev["metrics"][cfg.method].items()
                                                      if k.startswith("avg_")), ctx.layout.reports / "eval.md")
        log.info("95 %% intervals over %d seed(s): %s", len(ctx.seeds), ctx.layout.reports / "eval_intervals.md")
        if reg.get("skipped"):
            log.info("nothing new to register: %s version %s stands (promoted: %s, %s)", reg["model"], reg["version"],
                     reg["promoted"], reg["reason"])
        else:
            log.info("registered %s version %s (promoted: %s, %s)", reg["model"], reg["version"], reg["promoted"],
                     reg["reason"])
        log.info("%d of %d stage runs unchanged, skipped%s", len(skipped), len(submitted),
                 f": {', '.join(skipped)}" if skipped else "")
        mlflow.set_tag("moa.skipped_stages", ",".join(skipped) or "none")
        return {"counts": counts, "evaluation": ev, "intervals": ci["comparison"], "intervals_table": ci["table"],
                "registered": reg, "skipped": skipped, "stage_runs": len(submitted),
                "mlflow_run_id": parent.info.run_id,
                "flow_run_id": ctx.flow_run_id}
