"""Shared fixtures: offline env, a tiny config-built Llama (SmolLM2's architecture) and a small config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
               # the ephemeral API server's default 20 s start-up budget is too tight on a busy 2-core runner
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_k, _v)

# One PREFECT_HOME for the whole session: Prefect's ephemeral server costs 8-20 s per new home/process.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="moa-prefect-"))

from helpers import ROOT, tiny_raw_params, toy_records  # noqa: F401  (re-exported to the test modules)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moa_core.base_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_base(tiny_model_dir: Path):
    """A fresh copy of the tiny base model (mixtures inject into the model they wrap)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m.eval()
    return m


@pytest.fixture(scope="session")
def tiny_tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_cfg(tiny_model_dir: Path):
    from moa_core.config import parse_config

    return parse_config(tiny_raw_params(tiny_model_dir), profile="quick")


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A project directory whose params.yaml uses the tiny model on the four real builtin domains."""
    root = tmp_path_factory.mktemp("project")
    raw = tiny_raw_params(tiny_model_dir)
    raw["profiles"]["quick"]["curate"] = {"max_rows": 40}
    # every method and the ablation go through the real flow too (each is seconds on the tiny model)
    raw["profiles"]["quick"]["evaluate"].update(raw["profiles"]["compare"]["evaluate"])
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def pipeline_result(project: Path) -> dict:
    """One real run of the moa_pipeline flow (Prefect + MLflow + all stages), shared by the e2e tests."""
    from flows.pipeline import moa_pipeline

    return moa_pipeline(params=str(project / "params.yaml"), profile="quick")


def pytest_collection_modifyitems(config, items):
    """`optin` tests run only when a -m expression names them (`pytest -m optin`): each one repeats, at a cost the
    default run should not pay, a check the default run already makes in a cheaper form (README, Tests)."""
    if "optin" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="opt-in: run with `pytest -m optin` (README, Tests)")
    for item in items:
        if item.get_closest_marker("optin"):
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    """Prefect stops its embedded server at interpreter exit and logs that at INFO through a handler whose
    stream pytest has closed by then ("I/O operation on closed file"); only warnings are worth that line."""
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)
