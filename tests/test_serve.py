"""The registered model behind MLflow's REST scoring server: `mlflow models serve -m models:/moa-model/<v>
--env-manager local` on loopback, against the sqlite registry of the shared e2e pipeline run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest

from procs import VENV_BIN, free_port, spawn, wait_http  # noqa: F401  (spawn is a fixture)

pytestmark = pytest.mark.slow
DOMAINS = {"code", "medicine", "finance", "sports"}


def _split(rows: list[list[str]], columns: list[str]) -> dict:
    return {"dataframe_split": {"columns": columns, "data": rows}}


@pytest.mark.timeout(240)
def test_mlflow_models_serve_answers_rest_requests(spawn, project: Path, pipeline_result: dict, tmp_path: Path):
    version = pipeline_result["registered"]["version"]
    uri = f"sqlite:///{project / 'mlruns/mlflow.db'}"
    port = free_port()
    # The scoring server is started as `uvicorn ...` through bash: the venv's bin must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = spawn("mlflow models serve", [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                           f"models:/moa-model/{version}", "--env-manager", "local",
                                           "-h", "127.0.0.1", "-p", str(port)],
                   tmp_path / "serve.log", env=env, cwd=project)
    base = f"http://127.0.0.1:{port}"
    wait_http(server, f"{base}/ping", timeout=150)
    assert server.listening() == {("127.0.0.1", port)}, server.listening()

    prompts = [["What is fever?"], ["def add(a, b):"], ["Shares fell sharply as the bank cut its forecast."]]
    r = httpx.post(f"{base}/invocations", json=_split(prompts, ["prompt"]), timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(prompts)
    for p in preds:
        assert set(p) == {"text", "expert", "confidence"} and isinstance(p["text"], str), p
        assert p["expert"] in DOMAINS | {"base"} and 0 < p["confidence"] <= 1, p

    # the same answers as the pyfunc loaded in-process (greedy decoding): the REST path adds nothing
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    local = mlflow.pyfunc.load_model(f"models:/moa-model/{version}").predict(pd.DataFrame({"prompt": [p[0] for p in prompts]}))
    assert preds == local.to_dict(orient="records")

    # a forced expert, and the inference parameter the signature declares
    r = httpx.post(f"{base}/invocations", json={**_split([["What is fever?", "medicine"], ["def f():", "code"]],
                                                         ["prompt", "domain"]), "params": {"max_new_tokens": 3}},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert [(p["expert"], p["confidence"]) for p in r.json()["predictions"]] == [("medicine", None), ("code", None)]
    assert "Ignoring provided params" not in server.tail(100000), "the model signature lacks the params schema"

    # bad requests are answered 400 with the reason, and the server keeps serving
    r = httpx.post(f"{base}/invocations", json=_split([["What is law?", "law"]], ["prompt", "domain"]), timeout=60)
    assert r.status_code == 400 and "unknown domain(s) ['law']" in r.text, r.text
    r = httpx.post(f"{base}/invocations", json=_split([["hello"]], ["question"]), timeout=60)
    assert r.status_code == 400 and "prompt" in r.text, r.text
    assert httpx.get(f"{base}/ping", timeout=10).status_code == 200
    print(f"served moa-model v{version} on {base}: {preds}")


def test_versions_pickled_before_the_pyfunc_moved_to_tasks_still_load():
    """Versions registered before the pyfunc moved to tasks/ name moa_cli.pyfunc.MoAPyfunc in their pickle."""
    import pickle

    from tasks.pyfunc import MoAPyfunc

    old = pickle.dumps(MoAPyfunc(), protocol=0).replace(b"tasks.pyfunc", b"moa_cli.pyfunc")
    assert b"moa_cli.pyfunc\nMoAPyfunc" in old
    assert type(pickle.loads(old)) is MoAPyfunc


def test_unknown_domain_is_a_400_whose_message_names_the_known_domains(tiny_model_dir: Path, tiny_cfg, tmp_path: Path):
    """MLflow's scoring app (the one `mlflow models serve` runs) in-process, on a pyfunc of a tiny mixture: the
    reason of a bad request is in the answer's `message`, not only inside its `stack_trace`."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server
    from transformers import AutoModelForCausalLM

    from tasks.pyfunc import MoAPyfunc, signature
    from moa_core.model import save_mixture
    from moa_core.methods import build_mixture

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mixture = save_mixture(build_mixture(tiny_cfg, "moa", base, str(tiny_model_dir)), tmp_path / "mixture")
    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=MoAPyfunc(), artifacts={"mixture": str(mixture)},
                             model_config={"base_path": str(tiny_model_dir), "max_new_tokens": 2, "device": "cpu"},
                             signature=signature(2),
                             # as tasks/register.py does: listed, so MLflow does not start a process to infer them
                             pip_requirements=["torch", "transformers", "peft", "safetensors", "pandas"])
    client = TestClient(scoring_server.init(mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))))
    r = client.post("/invocations", json=_split([["What is law?", "law"]], ["prompt", "domain"]))
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert "unknown domain(s) ['law']" in message and all(d in message for d in tiny_cfg.domain_names), message
    r = client.post("/invocations", json=_split([["What is fever?", tiny_cfg.domain_names[0]]], ["prompt", "domain"]))
    assert r.status_code == 200, r.text
