"""prefect.yaml's deployments against a real `prefect server start` on loopback: `moa deploy` registers them on
a process work pool, the scheduler creates the nightly cron runs, and a `prefect worker` executes a triggered
run of the pipeline deployment (a real flow run in a subprocess, on a two-domain tiny project)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from datetime import timezone
from pathlib import Path

import pytest
import yaml

from conftest import tiny_raw_params
from procs import ROOT, VENV_BIN, free_port, spawn, wait_http  # noqa: F401  (spawn is a fixture)

NIGHTLY = "moa_pipeline/nightly-retrain"


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_defines_the_nightly_cron_and_on_demand_onboarding():
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(raw)  # what `prefect deploy` validates (it skips the file on an error)
    deps = _deployments()
    nightly, onboard = deps["nightly-retrain"], deps["onboard"]
    assert nightly["entrypoint"] == "flows/pipeline.py:moa_pipeline"
    assert [s["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert onboard["entrypoint"] == "flows/onboard.py:onboard_domain" and onboard["schedules"] == []
    for d in deps.values():
        assert d["work_pool"]["name"] == "moa-process", d["name"]
        assert (ROOT / d["entrypoint"].split(":")[0]).exists(), f"{d['name']}: {d['entrypoint']} does not exist"


def test_moa_deploy_names_what_is_missing(tmp_path: Path):
    from typer.testing import CliRunner

    from moa_cli.main import app

    closed = f"http://127.0.0.1:{free_port()}/api"

    def deploy(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(app, ["deploy", *args])
        return r.exit_code, " ".join(r.output.split())  # rich wraps long lines

    code, out = deploy("--api-url", closed)
    assert code == 1 and "no Prefect server" in out and "moa ui --prefect" in out, out
    code, out = deploy("--api-url", closed, "--name", "weekly")
    assert code == 2 and "unknown deployment(s) ['weekly']" in out and "nightly-retrain" in out, out
    code, out = deploy("--prefect-file", str(tmp_path / "nope.yaml"))
    assert code == 2 and "not found" in out, out


def _tiny_two_domain_project(root: Path, model_dir: Path) -> Path:
    """The smallest real pipeline: two builtin domains, a few rows and steps, no baselines."""
    raw = tiny_raw_params(model_dir)
    raw["domains"] = {k: raw["domains"][k] for k in ("code", "medicine")}
    raw["evaluate"]["baselines"] = []
    quick = raw["profiles"]["quick"]
    quick["curate"] = {"max_rows": 24}
    quick["evaluate"] = {"max_samples": 2, "max_new_tokens": 4}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root / "params.yaml"


def _client_call(api_url: str, fn):
    """Run `await fn(client)` with a Prefect client bound to `api_url` (not the test session's own server)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(go())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_moa_deploy_schedules_the_cron_and_a_worker_runs_the_flow(spawn, tmp_path: Path, tiny_model_dir: Path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    t0 = time.monotonic()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_PROMPT": "false"}
    server = spawn("prefect server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(port)], tmp_path / "server.log", env=env, cwd=tmp_path)
    params = _tiny_two_domain_project(tmp_path / "project", tiny_model_dir)
    wait_http(server, f"{api}/health", timeout=120)
    assert server.listening() and all(ip == "127.0.0.1" for ip, _ in server.listening()), server.listening()

    # `moa deploy`: creates the process work pool and registers every deployment of prefect.yaml
    r = subprocess.run([str(VENV_BIN / "moa"), "deploy", "--api-url", api], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, f"moa deploy failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    print(f"deployed after {time.monotonic() - t0:.0f}s")

    async def read_setup(c):
        pool = await c.read_work_pool("moa-process")
        deps = {n: await c.read_deployment_by_name(n) for n in (NIGHTLY, "onboard_domain/onboard")}
        return pool, deps

    pool, deps = _client_call(api, read_setup)
    assert pool.type == "process"
    nightly, onboard = deps[NIGHTLY], deps["onboard_domain/onboard"]
    assert nightly.work_pool_name == onboard.work_pool_name == "moa-process"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"] and nightly.schedules[0].active
    assert onboard.schedules == [] and {"domain", "source"} <= set(onboard.parameter_openapi_schema["required"])
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]

    # the scheduler service creates the upcoming nightly runs (02:00 UTC each)
    def scheduled_filter():
        return dict(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))

    deadline, scheduled = time.monotonic() + 60, []
    while time.monotonic() < deadline and not scheduled:
        scheduled = _client_call(api, lambda c: c.read_flow_runs(**scheduled_filter()))
        time.sleep(1)
    assert scheduled, f"no scheduled run of {NIGHTLY} within 60 s; server log:\n{server.tail()}"
    for fr in scheduled:
        t = fr.expected_start_time.astimezone(timezone.utc)
        assert (t.hour, t.minute) == (2, 0) and fr.auto_scheduled, (fr.name, t)
    print(f"{len(scheduled)} nightly runs scheduled, first at {min(fr.expected_start_time for fr in scheduled)}")

    # Pausing the schedule deletes those runs, so the worker below can only pick up the triggered run (a
    # nightly run falling due during the test would retrain on the repository's real params.yaml).
    _client_call(api, lambda c: c.update_deployment_schedule(nightly.id, nightly.schedules[0].id, active=False))
    assert _client_call(api, lambda c: c.read_flow_runs(**scheduled_filter())) == []

    # a real run: the worker starts it as a subprocess of its own (the process work pool)
    worker = spawn("prefect worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "moa-process",
                                      "--name", "test-worker"], tmp_path / "worker.log",
                   env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=tmp_path)
    r = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", NIGHTLY, "--param", f"params={params}",
                        "--param", "profile=quick"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"prefect deployment run failed:\n{r.stdout}\n{r.stderr}"
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", r.stdout).group(1)

    deadline, fr = time.monotonic() + 200, None
    while time.monotonic() < deadline:
        fr = _client_call(api, lambda c: c.read_flow_run(run_id))
        if fr.state and fr.state.is_final():
            break
        time.sleep(2)
    assert fr is not None and fr.state.type == StateType.COMPLETED, (
        f"flow run {run_id} ended {fr.state if fr else None}; worker log:\n{worker.tail(6000)}")
    assert fr.deployment_id == nightly.id and fr.work_pool_name == "moa-process"
    assert fr.parameters == {"params": str(params), "profile": "quick"}
    print(f"flow run {fr.name} completed in {fr.total_run_time}; test so far {time.monotonic() - t0:.0f}s")

    # the run did the work: registered a model in the project's MLflow store, tagged with this flow run
    project = params.parent
    reg = json.loads((project / "metrics/registered.json").read_text())
    assert reg["version"] == "1" and reg["promoted"] is True
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns/mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("moa").experiment_id],
                              f"tags.prefect_flow_run_id = '{run_id}' and tags.mlflow.runName = 'pipeline:moa'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert str(client.get_model_version_by_alias("moa-model", "champion").version) == "1"
    assert "test-worker" in worker.tail(200000)
