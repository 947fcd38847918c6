"""Per-domain expert training as separate flow runs on a Prefect work pool, instead of threads in one process.

- `train_expert_flow(domain, params, profile)`: trains ONE domain's expert (the pipeline's `train_expert` task,
  so the same function, retries and MLflow logging). Deploy it on a work pool: a process pool on this machine,
  the docker-compose worker (infra/docker-compose.yml) or a Kubernetes pool with one GPU per job (infra/k8s/).
- `dispatch_experts(params, profile, deployment_name)`: one flow run of that deployment per domain through
  `run_deployment`, waits for all of them and reports their states; raises `DispatchError` naming every domain
  whose run did not complete.

The runs share nothing but the project directory (curated data in, adapters out) and the tracking server:
the workers must see `params` at the path passed to them (`worker_params`, default: this machine's absolute
path, right for a process pool or a same-path mount) and the same MLflow store.

    python -m flows.dispatch deploy --pool moa-process --source .     # once, against a running Prefect server
    prefect worker start --pool moa-process                           # one or more, anywhere
    python -m flows.dispatch run --profile quick                      # or: moa run --expert-deployment moa_train_expert/process
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

FLOW_NAME = "moa_train_expert"
ENTRYPOINT = "flows/dispatch.py:train_expert_flow"
DEFAULT_DEPLOYMENT = f"{FLOW_NAME}/process"


class DispatchError(RuntimeError):
    """One or more per-domain flow runs did not complete."""


@flow(name=FLOW_NAME, flow_run_name="train_expert[{domain}]")
def train_expert_flow(domain: str, params: str = "params.yaml", profile: str | None = None,
                      parent_run_id: str | None = None) -> dict[str, Any]:
    """Train one domain's LoRA expert -> models/experts/<domain>/ (needs data/curated/<domain>/ from `curate`)."""
    from prefect.runtime import flow_run

    from tasks.common import StageContext, configure_env, set_torch_threads

    ctx = StageContext.load(params, profile)
    if domain not in ctx.cfg.domain_names:
        raise ValueError(f"unknown domain {domain!r}: {params} defines {ctx.cfg.domain_names}")
    train = ctx.layout.curated(domain) / "train.jsonl"
    if not train.exists():  # before the heavy imports: a worker that cannot see the data fails in seconds
        raise FileNotFoundError(f"{train} is missing on this worker: curate {domain!r} first (moa stage curate "
                                f"{domain}) and give the workers the project directory at this path")
    configure_env(ctx.root)
    from tasks.prefect_tasks import train_expert_task

    threads = set_torch_threads(ctx.cfg)
    ctx = dataclasses.replace(ctx, parent_run_id=parent_run_id, flow_run_id=str(flow_run.id))
    get_run_logger().info("training expert %s from %s (profile %s, %d torch threads)", domain, ctx.root / Path(params).name,
                          profile or "default", threads)
    summary = train_expert_task(ctx, domain)
    return {"domain": domain, "adapter": str(ctx.layout.expert(domain)), **summary}


def _wait(client: Any, runs: dict[str, Any], timeout_s: float | None, poll_s: float) -> dict[str, Any]:
    """Poll the flow runs until each is in a final state (or the timeout passes); returns the latest reads."""
    latest = dict(runs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for d, fr in latest.items():
            if not (fr.state and fr.state.is_final()):
                latest[d] = client.read_flow_run(fr.id)
        if all(fr.state and fr.state.is_final() for fr in latest.values()):
            return latest
        if deadline is not None and time.monotonic() > deadline:
            return latest
        time.sleep(poll_s)


@flow(name="moa_dispatch_experts")
def dispatch_experts(params: str = "params.yaml", profile: str | None = None,
                     deployment_name: str = DEFAULT_DEPLOYMENT, domains: list[str] | None = None,
                     worker_params: str | None = None, parent_run_id: str | None = None,
                     job_variables: dict[str, Any] | None = None, timeout_s: float | None = None,
                     poll_s: float = 2.0) -> dict[str, dict[str, str]]:
    """Run `deployment_name` (a deployment of `train_expert_flow`) once per domain, on its work pool, in parallel
    as far as the pool's workers allow; wait for all; return {domain: {flow_run_id, flow_run_name, state}}.

    `params` is read here (to list the domains); the runs get `worker_params` (default: the absolute path of
    `params`). Without `parent_run_id` (not inside a pipeline run) it holds the project lock and opens an MLflow
    run `dispatch_experts` that the experts' runs nest under. Raises `DispatchError` if any run ends in a state other than Completed (or is still running after
    `timeout_s`)."""
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    from tasks.common import StageContext, configure_env, lineage_tags, mlflow_experiment, project_lock

    log = get_run_logger()
    ctx = StageContext.load(params, profile)
    configure_env(ctx.root)
    names = list(domains or ctx.cfg.domain_names)
    unknown = sorted(set(names) - set(ctx.cfg.domain_names))
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}: {params} defines {ctx.cfg.domain_names}")
    remote_params = worker_params or str(Path(params).resolve())

    def fan_out(parent: str) -> dict[str, dict[str, str]]:
        runs = {}
        for d in names:
            runs[d] = run_deployment(
                deployment_name, timeout=0, flow_run_name=f"train_expert[{d}]", tags=["moa", f"domain:{d}"],
                parameters={"domain": d, "params": remote_params, "profile": profile, "parent_run_id": parent},
                job_variables=job_variables or None)
            log.info("%s: flow run %s (%s) scheduled on %s", d, runs[d].name, runs[d].id, deployment_name)
        with get_client(sync_client=True) as client:
            final = _wait(client, runs, timeout_s, poll_s)
        report = {d: {"flow_run_id": str(fr.id), "flow_run_name": fr.name,
                      "state": fr.state.name if fr.state else "Unknown",
                      "state_type": fr.state.type.value if fr.state else "UNKNOWN",
                      "message": (fr.state.message or "") if fr.state else ""} for d, fr in final.items()}
        for d, r in report.items():
            log.info("%-12s %-10s flow run %s (%s)", d, r["state"], r["flow_run_name"], r["flow_run_id"])
        bad = {d: r for d, r in report.items() if r["state_type"] != "COMPLETED"}
        if bad:
            lines = "; ".join(f"{d}: {r['state']} (flow run {r['flow_run_id']}): {r['message']}" for d, r in bad.items())
            raise DispatchError(f"{len(bad)} of {len(report)} expert runs did not complete: {lines}. "
                                f"See their logs in the Prefect UI or `prefect flow-run logs <id>`.")
        return report

    if parent_run_id is not None:  # part of a pipeline run, which holds the project lock
        return fan_out(parent_run_id)
    exp = mlflow_experiment(ctx)  # creates the store and experiment once, before the runs race to do it
    with project_lock(ctx.root, f"dispatch_experts flow run {flow_run.id}"), \
            mlflow.start_run(experiment_id=exp, run_name="dispatch_experts", tags=lineage_tags(ctx)) as run:
        mlflow.set_tags({"prefect_flow_run_id": str(flow_run.id), "moa.deployment": deployment_name})
        mlflow.log_params({"domains": ",".join(names), "profile": profile or "default", "deployment": deployment_name})
        return fan_out(run.info.run_id)


def deploy_train_expert(work_pool: str, name: str = "process", source: str | None = None,
                        job_variables: dict[str, Any] | None = None, create_pool: str | None = "process") -> str:
    """Register a deployment of `train_expert_flow` on `work_pool`; returns its full name for `dispatch_experts`.

    `source`: a directory holding this repository (its `flows/dispatch.py` is loaded from there, and flow runs
    start in it); without it the deployment uses the module path `flows.dispatch.train_expert_flow`, which the
    worker's Python must be able to import (moa installed, e.g. the infra/Dockerfile image).
    `create_pool`: create the pool with this type if it does not exist (None: it must exist)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(work_pool)
        except ObjectNotFound:
            if create_pool is None:
                raise
            client.create_work_pool(WorkPoolCreate(name=work_pool, type=create_pool))
    opts: dict[str, Any] = {"name": name, "work_pool_name": work_pool, "build": False, "push": False,
                            "job_variables": job_variables, "print_next_steps": False, "ignore_warnings": True,
                            "tags": ["moa", "train-expert"],
                            "description": "Train one domain's LoRA expert (moa flows/dispatch.py)."}
    if source:
        train_expert_flow.from_source(source=str(Path(source).resolve()), entrypoint=ENTRYPOINT).deploy(**opts)
    else:  # imported by name: under `python -m flows.dispatch` this module is __main__, not an importable path
        from flows.dispatch import train_expert_flow as importable

        importable.deploy(entrypoint_type=EntrypointType.MODULE_PATH, **opts)
    return f"{FLOW_NAME}/{name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.dispatch", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    dp = sub.add_parser("deploy", help="register the per-domain training deployment on a work pool")
    dp.add_argument("--pool", default="moa-process")
    dp.add_argument("--name", default="process", help="deployment name (full name: moa_train_expert/<name>)")
    dp.add_argument("--source", default=None, help="repository directory the worker runs from (default: module path)")
    dp.add_argument("--pool-type", default="process", help="type for a pool that does not exist yet")
    rp = sub.add_parser("run", help="one flow run per domain on the deployment's pool; wait; report")
    rp.add_argument("--params", "-p", default="params.yaml")
    rp.add_argument("--profile", default=None)
    rp.add_argument("--deployment", default=DEFAULT_DEPLOYMENT)
    rp.add_argument("--domain", action="append", dest="domains", help="only these domains (repeatable)")
    rp.add_argument("--worker-params", default=None, help="params.yaml path as the workers see it")
    rp.add_argument("--timeout", type=float, default=None, help="seconds to wait for the runs")
    rp.add_argument("--json", action="store_true", help="print the report as one JSON line on stdout")
    a = ap.parse_args(argv)
    if a.cmd == "deploy":
        print(deploy_train_expert(a.pool, a.name, a.source, create_pool=a.pool_type))
        return 0
    state = dispatch_experts(params=a.params, profile=a.profile, deployment_name=a.deployment, domains=a.domains,
                             worker_params=a.worker_params, timeout_s=a.timeout, return_state=True)
    try:
        report = state.result()
    except Exception as exc:  # noqa: BLE001 - the flow's failure, already logged by Prefect
        print(json.dumps({"error": str(exc)}) if a.json else f"dispatch failed: {exc}", file=sys.stdout if a.json else sys.stderr)
        return 1
    print(json.dumps(report) if a.json else "\n".join(f"{d}: {r['state']} ({r['flow_run_id']})" for d, r in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
