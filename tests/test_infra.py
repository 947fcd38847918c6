"""infra/: the docker-compose stack (loopback-only ports, Postgres + MinIO behind Prefect and MLflow, the DVC
remote) and the Kubernetes work pool template + deployments, checked without a Docker daemon or a cluster.
`docker compose config` (or docker-compose) validates the compose file where it is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
SERVICES = {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "prefect-worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(2) for d in deps if (m := re.match(r"([a-z0-9_-]+)==([\w.]+)$", d))}


def _environ(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def _check_ports_loopback(services: dict) -> int:
    n = 0
    for name, svc in services.items():
        for p in svc.get("ports", []):
            if isinstance(p, dict):  # long syntax (what `docker compose config` prints)
                assert p.get("host_ip") == "127.0.0.1", (name, p)
            else:
                assert str(p).startswith("127.0.0.1:"), f"{name}: port {p!r} is not bound to 127.0.0.1"
            n += 1
    return n


def test_compose_services_and_loopback_ports(compose: dict):
    services = compose["services"]
    assert set(services) == SERVICES
    assert _check_ports_loopback(services) == 4  # Prefect UI/API, MLflow, MinIO S3 API, MinIO console
    assert "ports" not in services["postgres"] and "ports" not in services["prefect-worker"]
    assert "network_mode" not in json.dumps(services), "host networking would bypass the loopback binding"


def test_compose_prefect_and_mlflow_use_postgres_and_minio(compose: dict):
    s = compose["services"]
    prefect_env = _environ(s["prefect-server"])
    assert prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert prefect_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert s["prefect-server"]["image"] == f"prefecthq/prefect:{_pins()['prefect']}-python3.11"

    mlflow_env = _environ(s["mlflow"])
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://${MLFLOW_BUCKET:-mlflow}/artifacts"
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "--serve-artifacts" in s["mlflow"]["command"]
    assert "mlflow" in mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(","), "the worker's Host header"
    assert "CREATE DATABASE mlflow" in (INFRA / "postgres/init.sql").read_text()
    dockerfile = (INFRA / s["mlflow"]["build"]["dockerfile"]).read_text()
    assert f'"mlflow=={_pins()["mlflow"]}"' in dockerfile and "psycopg2" in dockerfile and "boto3" in dockerfile

    # the one-shot bucket job creates the MLflow bucket and the DVC bucket named in .env.example
    init = s["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert 'mc mb --ignore-existing "local/$$MLFLOW_BUCKET" "local/$$DVC_BUCKET"' in init["command"][0]
    env = _env_example()
    assert _environ(init)["MLFLOW_BUCKET"] == "${MLFLOW_BUCKET:-mlflow}" and env["MLFLOW_BUCKET"] == "mlflow"
    assert _environ(init)["DVC_BUCKET"] == "${DVC_BUCKET:-dvc}" and env["DVC_BUCKET"] == "dvc"
    assert s["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_worker_runs_moa_flows_against_the_stack(compose: dict):
    w = compose["services"]["prefect-worker"]
    cmd = w["command"]
    assert cmd[:3] == ["prefect", "worker", "start"] and "--pool" in cmd and cmd[cmd.index("--type") + 1] == "process"
    env = _environ(w)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MOA_TRACKING_URI"] == "http://mlflow:5000"  # read by tasks/common.py:tracking_uri
    assert w["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    host, _, target = w["volumes"][0].rpartition(":")
    assert host.startswith("${MOA_PROJECT_DIR:?") and target == "${MOA_PROJECT_DIR}", "same path inside and out"
    assert w["working_dir"] == "${MOA_PROJECT_DIR}"
    assert w["build"]["context"] == ".." and (ROOT / w["build"]["dockerfile"]).exists()
    dockerfile = (ROOT / w["build"]["dockerfile"]).read_text()
    assert f'"torch=={_pins()["torch"]}"' in dockerfile and "requirements-data.txt" in dockerfile
    for excluded in (".venv", "data", "models", "mlruns", ".git"):  # the build context stays small
        assert excluded in (INFRA / "Dockerfile.dockerignore").read_text().split()


def test_env_example_defines_every_required_variable():
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text)) | set(re.findall(r"\$\{(\w+)\}", text))
    env = _env_example()
    assert required <= set(env), f"not in infra/.env.example: {sorted(required - set(env))}"
    assert env["MOA_PROJECT_DIR"].startswith("/")
    assert (INFRA / ".gitignore").read_text().split() == [".env"], "the real secrets never get committed"


def test_dvc_remote_on_minio_is_documented_and_configures(tmp_path: Path):
    readme = (INFRA / "README.md").read_text()
    assert "sh infra/dvc-remote.sh" in readme and "dvc-s3" in readme
    assert "dvc remote add" in readme and "s3://dvc/moa" in readme and "endpointurl http://127.0.0.1:9000" in readme
    # the script, run for real in a scratch DVC repo with .env.example's values
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=env, check=True)
    r = subprocess.run(["sh", str(INFRA / "dvc-remote.sh"), str(ENV_EXAMPLE)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    config = (tmp_path / ".dvc/config").read_text()
    assert "remote = minio" in config and "url = s3://dvc/moa" in config
    assert "endpointurl = http://127.0.0.1:9000" in config
    assert "secret_access_key" not in config, "credentials go to .dvc/config.local"
    assert "secret_access_key = change-me-minio" in (tmp_path / ".dvc/config.local").read_text()


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file(tmp_path: Path):
    cli = _compose_cli()
    if cli is None:
        pytest.fail("neither `docker compose` nor docker-compose is installed; `make test` installs Debian's "
                    "docker-compose (make browser), or run `apt-get install docker-compose`")
    base = [*cli, "--project-directory", str(INFRA), "-f", str(COMPOSE)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MINIO_", "MOA_"))}
    r = subprocess.run([*base, "--env-file", str(ENV_EXAMPLE), "config"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, f"{' '.join(cli)} config rejected infra/docker-compose.yml:\n{r.stderr}"
    rendered = yaml.safe_load(r.stdout)
    assert set(rendered["services"]) == SERVICES
    assert _check_ports_loopback(rendered["services"]) == 4  # after interpolation too
    # without the secrets (no infra/.env) it refuses to start rather than using defaults
    empty = tmp_path / "empty.env"
    empty.write_text("")
    r = subprocess.run([*base, "--env-file", str(empty), "config"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "infra/.env" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------ Kubernetes
K8S = INFRA / "k8s"


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads((K8S / "base-job-template.json").read_text())


def _render(template: dict, job_variables: dict) -> dict:
    """What a kubernetes worker builds from the pool template: defaults, then the deployment's job variables."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    values.update(job_variables)
    return apply_values(template["job_configuration"], values)


def test_k8s_template_is_a_valid_work_pool_template(template: dict):
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import find_placeholders

    validate_base_job_template(template)  # every placeholder is a declared variable (what the server checks)
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    declared = set(template["variables"]["properties"])
    assert used == declared, f"declared but unused: {declared - used}"
    manifest = template["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    # what prefect-kubernetes requires of a job manifest
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    assert pod["restartPolicy"] == "Never" and pod["parallelism"] == 1 and pod["completions"] == 1
    assert pod["containers"][0]["name"] == "prefect-job" and pod["containers"][0]["args"] == "{{ command }}"


def test_k8s_training_job_requests_one_gpu(template: dict):
    job = _render(template, {"image": "registry.example.com/moa:1", "name": "train-expert-code",
                             "command": "prefect flow-run execute"})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # extended resources need request == limit
    assert container["image"] == "registry.example.com/moa:1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["volumes"] == [{"name": "project", "persistentVolumeClaim": {"claimName": "moa-project"}}]
    assert container["volumeMounts"] == [{"name": "project", "mountPath": "/project"}]
    assert job["job_manifest"]["spec"]["backoffLimit"] == 0
    assert job["env"]["HF_HUB_OFFLINE"] == "1"
    two = _render(template, {"image": "x", "gpu_count": 2})["job_manifest"]["spec"]["template"]["spec"]
    assert two["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_k8s_prefect_yaml_deploys_train_expert_flow_on_the_kubernetes_pool(template: dict):
    spec = yaml.safe_load((K8S / "prefect.yaml").read_text())
    assert spec["prefect-version"] == _pins()["prefect"]
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/moa"}}]
    assert "WORKDIR /opt/moa" in (INFRA / "Dockerfile").read_text(), "the pull step's directory is the image's code"
    deps = {d["name"]: d for d in spec["deployments"]}
    expert = deps["k8s-gpu"]
    assert expert["entrypoint"] == "flows/dispatch.py:train_expert_flow"
    assert (ROOT / expert["entrypoint"].split(":")[0]).exists()
    for d in deps.values():
        assert d["work_pool"]["name"] == "moa-k8s"
        jv = d["work_pool"]["job_variables"]
        assert set(jv) <= set(template["variables"]["properties"]), "job variables the template declares"
        assert jv["gpu_count"] == 1
        assert d["parameters"]["params"].startswith(template["variables"]["properties"]["project_mount_path"]["default"])
    assert deps["k8s"]["parameters"]["expert_deployment"] == "moa_train_expert/k8s-gpu"
    readme = (K8S / "README.md").read_text()
    assert "base-job-template.json" in readme and "nvidia.com/gpu" in readme and "prefect.yaml" in readme
