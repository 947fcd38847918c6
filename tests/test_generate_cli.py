"""`moa generate` on the tiny model: the trained mixture on disk (--local) and registered versions (@champion,
--version, --run) from a real MLflow sqlite registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_raw_params
from moa_cli.main import app
from moa_core.answer import answer
from moa_core.model import save_mixture
from test_export import PROMPTS, spread_routers, trained_like_moa

EXPERTS = ["code", "medicine", "finance", "sports"]


@pytest.fixture
def project(tmp_path: Path, tiny_model_dir, tiny_cfg, tiny_base, tiny_tok):
    """A project whose params.yaml uses the tiny model, with a trained-like MoA mixture on disk."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(tiny_model_dir), sort_keys=False))
    mm = trained_like_moa(tiny_cfg, tiny_base, b_std=1.0)
    spread_routers(mm, tiny_tok, PROMPTS)
    mm.spec.fallback_threshold = 0.0  # never falls back: the routed experts are what the test compares
    save_mixture(mm, tmp_path / "models" / "mixture" / "moa")
    return tmp_path, mm


def _moa(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "moa_cli.main", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_local_generate_routes_forces_and_never_imports_prefect(project, tiny_tok):
    root, mm = project
    r = _moa(root, "generate", "--local", "--json", "--max-new-tokens", "4", *PROMPTS)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    expected = answer(mm, tiny_tok, PROMPTS, max_length=128, max_new_tokens=4, threshold=0.0)
    assert [row["prompt"] for row in rows] == PROMPTS
    assert [(row["text"], row["expert"]) for row in rows] == [(a.text, a.expert) for a in expected]
    assert [row["confidence"] for row in rows] == pytest.approx([a.confidence for a in expected], abs=1e-5)
    assert len({row["expert"] for row in rows}) > 1 and all(row["text"] for row in rows)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "torch" in imported and "prefect" not in imported, "one generation must not import Prefect"

    # prompts from stdin (a pipe: not a terminal), one expert forced: no router confidence. In this process: the
    # run above already covers the command as a process of its own
    r = CliRunner().invoke(app, ["generate", "--local", "--json", "--max-new-tokens", "4", "--expert", "medicine",
                                 "-p", str(root / "params.yaml")], input="What is fever?\n\ndef add(a, b):\n")
    assert r.exit_code == 0, r.output[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["prompt"], row["expert"], row["confidence"]) for row in rows] == [
        ("What is fever?", "medicine", None), ("def add(a, b):", "medicine", None)]

    # an unknown expert, in this process too
    r = CliRunner().invoke(app, ["generate", "--local", "--expert", "law", "-p", str(root / "params.yaml"), "hello"])
    assert r.exit_code == 2 and "unknown expert 'law'" in r.stderr and "medicine" in r.stderr, r.output


def test_registered_champion_version_and_run(project, capfd):
    root, _ = project
    from tasks.common import StageContext, configure_env, stage_run
    from tasks.register import log_mixture_version, set_promotion

    configure_env(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"] = {"compile": True, "prompt_shapes": 3, "fold_single_expert": True}  # carried to its pyfunc
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ctx = StageContext.load(root / "params.yaml")
    runner = CliRunner()
    base_args = ["generate", "--json", "--max-new-tokens", "3", "-p", str(root / "params.yaml")]

    r = runner.invoke(app, [*base_args, "What is fever?"])
    assert r.exit_code == 2 and "@champion" in r.output and "--local" in r.output, r.output

    capfd.readouterr()
    with stage_run(ctx, "register") as run:
        version = log_mixture_version(ctx, ctx.layout.mixture("moa"), {})
        set_promotion(ctx, version, True, "test")
    logged = capfd.readouterr()
    assert "CloudPickle" not in logged.err + logged.out  # MLflow's pickling notice, silenced for our own class
    import mlflow

    served = mlflow.pyfunc.load_model(f"models:/moa-model/{version}").unwrap_python_model().mm
    decoding = (served.graph_decoding, served.graph_decoder.compiled, served.graph_decoder.prompt_shapes,
                served.fold_single_expert)
    assert decoding == (True, True, 3, True), "the version's pyfunc did not take params.yaml's serve section"
    assert served.graph_decoder._compiled_model is None  # nothing compiled (nor dynamo imported) before a CUDA step
    local = runner.invoke(app, [*base_args, "--local", *PROMPTS[:2]])
    assert local.exit_code == 0, local.output
    local_rows = [json.loads(x) for x in local.stdout.splitlines()]
    for extra in ([], ["--version", version], ["--run", run.info.run_id]):
        r = runner.invoke(app, [*base_args, *extra, *PROMPTS[:2]])
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in r.stdout.splitlines()]
        # the registered pyfunc answers as the mixture on disk does (same weights, greedy decoding)
        assert [(x["text"], x["expert"]) for x in rows] == [(x["text"], x["expert"]) for x in local_rows]
        assert [x["confidence"] for x in rows] == pytest.approx([x["confidence"] for x in local_rows], abs=1e-5)
        assert all(x["expert"] in EXPERTS for x in rows)

    # a forced expert through the pyfunc's domain column; plain text output
    r = runner.invoke(app, ["generate", "--max-new-tokens", "3", "-p", str(root / "params.yaml"), "--expert", "base",
                            "What is fever?"])
    assert r.exit_code == 0 and "base (forced)" in r.output, r.output
    r = runner.invoke(app, [*base_args, "--version", "99", "hi"])
    assert r.exit_code == 2 and "moa-model v99" in r.output, r.output
