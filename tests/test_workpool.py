"""Per-domain expert training dispatched as separate flow runs on a real Prefect work pool: a `prefect server
start` on a free loopback port, a process work pool, `prefect worker start` as a subprocess, the deployment of
flows/dispatch.py:train_expert_flow from this checkout, and `python -m flows.dispatch run` fanning out one flow
run per domain. Also registers the Kubernetes work pool template and deployments of infra/k8s/ on that server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "moa-test-pool"
DEPLOYMENT = "moa_train_expert/process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, name: str) -> None:
    """SIGTERM the process group we started (start_new_session), then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=3)  # teardown only: no need to wait out the worker's slow graceful shutdown
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # flow-run subprocesses of the worker share its group
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real Prefect server (own PREFECT_HOME, sqlite) on 127.0.0.1; yields (api_url, env for subprocesses)."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3", "PYTHONUNBUFFERED": "1"}
    env.pop("MOA_TRACKING_URI", None)
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-ui", "--analytics-off"], env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy on {api} after 150 s:\n{_tail(log)}")
            time.sleep(1)
        yield api, env
    finally:
        _stop(proc, "server")


@pytest.fixture(scope="module")
def worker(server, tmp_path_factory: pytest.TempPathFactory):
    """`prefect worker start` on a process pool (created by the worker), two flow runs at a time."""
    api, env = server
    log = tmp_path_factory.mktemp("prefect-worker") / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                                 "--limit", "2", "--name", "moa-test-worker"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:  # ready once it has registered itself with the pool
            if proc.poll() is not None:
                pytest.fail(f"prefect worker exited with {proc.returncode}:\n{_tail(log)}")
            r = httpx.post(f"{api}/work_pools/{POOL}/workers/filter", json={}, timeout=5)
            if r.status_code == 200 and r.json():
                break
            if time.monotonic() > deadline:
                pytest.fail(f"worker did not register with {POOL} after 90 s:\n{_tail(log)}")
            time.sleep(1)
        yield log
    finally:
        _stop(proc, "worker")


@pytest.fixture(scope="module")
def deployment(server, worker) -> str:
    """The deployment of train_expert_flow from this checkout (from_source), on the worker's pool."""
    _, env = server
    r = subprocess.run([sys.executable, "-m", "flows.dispatch", "deploy", "--pool", POOL, "--name", "process",
                        "--source", str(ROOT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == DEPLOYMENT
    return DEPLOYMENT


def _flow_runs(api: str, ids: list[str]) -> dict[str, dict]:
    r = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}}, timeout=10)
    r.raise_for_status()
    return {fr["id"]: fr for fr in r.json()}


def _dispatch(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.dispatch", "run", "--deployment", DEPLOYMENT, "--json",
                           "--timeout", "300", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=420)


@pytest.fixture(scope="module")
def curated(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture project's params.yaml in a fresh directory (no experts from other tests), every domain curated
    (which also creates its MLflow store before the runs share it). Two domains: enough for one flow run per
    domain side by side on the worker (--limit 2), in one wave instead of two."""
    from tasks.common import StageContext
    from tasks.curate import run_curate

    proj = tmp_path_factory.mktemp("workpool-project")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["domains"] = {k: raw["domains"][k] for k in ("code", "medicine")}
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ctx = StageContext.load(proj / "params.yaml", "quick")
    for d in ctx.cfg.domain_names:
        run_curate(ctx, d)
    return proj


def test_each_domain_trains_in_its_own_flow_run_on_the_pool(server, worker, deployment, curated: Path):
    import mlflow
    from mlflow import MlflowClient

    from tasks.common import StageContext

    api, env = server
    proj = curated
    ctx = StageContext.load(proj / "params.yaml", "quick")
    domains = ctx.cfg.domain_names
    assert len(domains) >= 2

    r = _dispatch(env, "--params", str(proj / "params.yaml"), "--profile", "quick")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-6000:]}\nworker log:\n{_tail(worker)}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(report) == sorted(domains)
    assert all(v["state"] == "Completed" for v in report.values()), report

    # each domain: its adapter on disk, written by a flow run of its own
    for d in domains:
        assert (proj / "models/experts" / d / "adapter_model.safetensors").stat().st_size > 0, d
    ids = [v["flow_run_id"] for v in report.values()]
    assert len(set(ids)) == len(domains)
    runs = _flow_runs(api, ids)  # read back from the server, not from the dispatcher's report
    assert set(runs) == set(ids)
    dep = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=10).json()
    assert dep["work_pool_name"] == POOL
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    by_domain = {fr["parameters"]["domain"]: fr for fr in runs.values()}
    assert sorted(by_domain) == sorted(domains)
    for d, fr in by_domain.items():
        assert fr["state_type"] == "COMPLETED", (d, fr["state_name"])
        assert fr["deployment_id"] == dep["id"] and fr["work_pool_name"] == POOL
        assert fr["parent_task_run_id"], "a subflow of the dispatcher's flow run"
        assert fr["name"] == f"train_expert[{d}]"
    pids = [fr["infrastructure_pid"] for fr in runs.values()]
    assert all(pids) and len(set(pids)) == len(pids), f"each run is its own worker subprocess: {pids}"

    # MLflow: one training run per domain, tagged with its own Prefect flow run, nested under the dispatcher's run
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlruns/mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name(ctx.cfg.tracking.experiment)
    trainings = client.search_runs([exp.experiment_id], "attributes.run_name LIKE 'train_expert:%'")
    tagged = {c.info.run_name: c.data.tags.get("prefect_flow_run_id") for c in trainings}
    assert tagged == {f"train_expert:{d}": by_domain[d]["id"] for d in domains}
    parents = {c.data.tags.get("mlflow.parentRunId") for c in trainings}
    assert len(parents) == 1 and client.get_run(parents.pop()).info.run_name == "dispatch_experts"


def test_dispatch_fails_clearly_when_a_domain_run_fails(server, worker, deployment, curated: Path, tmp_path: Path):
    """The worker sees a project with no curated data: that run fails, and the dispatcher says which and why."""
    api, env = server
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(curated / "params.yaml", empty / "params.yaml")
    r = _dispatch(env, "--params", str(curated / "params.yaml"), "--profile", "quick", "--domain", "code",
                  "--worker-params", str(empty / "params.yaml"))
    assert r.returncode == 1, r.stdout + r.stderr[-4000:]
    err = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert "1 of 1 expert runs did not complete" in err and "code: Failed" in err, err
    assert "is missing on this worker" in err, "the run's own error is in the dispatcher's message"
    run_id = err.split("flow run ")[1].split(")")[0]
    fr = _flow_runs(api, [run_id])[run_id]
    assert fr["state_type"] == "FAILED" and fr["parameters"]["domain"] == "code"
    assert not (empty / "models/experts/code").exists()


def test_kubernetes_pool_template_and_deployments_register(server):
    """infra/k8s/: the server accepts the base job template for a `kubernetes` pool, and `prefect deploy` registers
    both deployments of infra/k8s/prefect.yaml on it with one GPU per job."""
    api, env = server
    template = json.loads((ROOT / "infra/k8s/base-job-template.json").read_text())
    r = httpx.post(f"{api}/work_pools/", json={"name": "moa-k8s", "type": "kubernetes", "base_job_template": template},
                   timeout=10)
    assert r.status_code == 201, r.text
    pool = httpx.get(f"{api}/work_pools/moa-k8s", timeout=10).json()
    assert pool["base_job_template"] == template

    spec = yaml.safe_load((ROOT / "infra/k8s/prefect.yaml").read_text())
    r = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/k8s/prefect.yaml", "--all"],
                       env={**env, "MOA_IMAGE": "registry.example.com/moa:test",
                            "MOA_TRACKING_URI": "http://mlflow.moa.svc.cluster.local:5000"},
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    names = {"k8s-gpu": "moa_train_expert/k8s-gpu", "k8s": "moa_pipeline/k8s"}
    assert {d["name"] for d in spec["deployments"]} == set(names)
    for short, full in names.items():
        dep = httpx.get(f"{api}/deployments/name/{full}", timeout=10).json()
        assert dep["work_pool_name"] == "moa-k8s", dep
        jv = dep["job_variables"]
        assert jv["image"] == "registry.example.com/moa:test" and jv["gpu_count"] == 1
        assert jv["env"]["MOA_TRACKING_URI"] == "http://mlflow.moa.svc.cluster.local:5000"
        assert dep["parameters"]["params"] == "/project/params.yaml"
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/moa"}}]
    pipeline = httpx.get(f"{api}/deployments/name/moa_pipeline/k8s", timeout=10).json()
    assert pipeline["parameters"]["expert_deployment"] == "moa_train_expert/k8s-gpu"

    # `python -m flows.dispatch deploy` without --source: a module-path entrypoint (the image has moa installed)
    r = subprocess.run([sys.executable, "-m", "flows.dispatch", "deploy", "--pool", "moa-k8s", "--name", "module"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    dep = httpx.get(f"{api}/deployments/name/moa_train_expert/module", timeout=10).json()
    assert dep["entrypoint"] == "flows.dispatch.train_expert_flow" and dep["work_pool_name"] == "moa-k8s"
    assert set(dep["parameter_openapi_schema"]["required"]) == {"domain"}

