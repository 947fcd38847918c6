"""The real flow end to end through Prefect, MLflow (sqlite store + registry) and the stage functions,
on the tiny model and small slices of the real offline domains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_pipeline_leaves_artifacts_metrics_and_a_champion(project: Path, pipeline_result: dict):
    import mlflow
    from mlflow import MlflowClient

    domains = ["code", "medicine", "finance", "sports"]
    # artifacts on disk
    for d in domains:
        assert (project / "data/curated" / d / "test.jsonl").stat().st_size > 0
        assert (project / "models/experts" / d / "adapter_model.safetensors").exists()
    assert (project / "models/mixture/moa/mixture.safetensors").exists()
    assert not (project / "models/checkpoints" / "expert-code").exists(), "checkpoints are removed after success"
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert set(ev) == {"base", "single-lora", "lora-mixed", "moa", "moa-no-routing-loss", "mosld", "modula-flan",
                       "modula-res", "moa-oracle", "peft-arrow"}
    # every routed system against the oracle; the out-of-domain fallback on BBC categories that are no domain
    oracle = json.loads((project / "metrics/oracle.json").read_text())
    assert set(oracle) == {"moa", "moa-no-routing-loss", "mosld", "modula-flan", "modula-res", "peft-arrow"}
    assert all(0 < v["pct_of_oracle_ppl"] for v in oracle.values())
    fallback = json.loads((project / "metrics/fallback.json").read_text())
    assert fallback["out_of_domain_categories"] == ["entertainment", "politics", "tech"]
    assert 0 <= fallback["recall"] <= 1 and fallback["in_domain_kept"] > 0 and 0 <= fallback["threshold"] <= 1
    report = (project / "reports/eval.md").read_text()
    assert "% of oracle R-L" in report and "Out-of-domain fallback" in report
    assert ev["moa"]["trainable_params"] > 0 and "train_seconds" not in ev["mosld"]  # wall-clock: not in tracked files
    assert json.loads((project / "metrics/timings/eval.json").read_text())["train_seconds"]["mosld"] > 0
    for system, vals in ev.items():
        assert 1.0 < vals["avg_ppl"] < 1e6 and 0.0 <= vals["avg_rougeL"] <= 100.0, system
    assert 0.0 <= ev["moa"]["router_accuracy"] <= 1.0
    assert "| moa |" in (project / "reports/eval.md").read_text()

    # MLflow: a parent run with one nested run per stage/domain, lineage tags, plots
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns/mlflow.db'}")
    client = MlflowClient()
    parent = client.get_run(pipeline_result["mlflow_run_id"])
    assert parent.data.tags["prefect_flow_run_id"] == pipeline_result["flow_run_id"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)
    names = {r.info.run_name for r in children}
    assert names >= {*(f"curate:{d}" for d in domains), *(f"train_expert:{d}" for d in domains),
                     "train_mixed", "train_router:moa", "evaluate", "register"}
    evaluate_run = next(r for r in children if r.info.run_name == "evaluate")
    assert math.isfinite(evaluate_run.data.metrics["moa.avg_ppl"])
    arts = {a.path for a in client.list_artifacts(evaluate_run.info.run_id, "plots")}
    assert "plots/router_confusion.png" in arts and "plots/rougeL_by_domain.png" in arts
    train_run = next(r for r in children if r.info.run_name == "train_expert:code")
    assert len(client.get_metric_history(train_run.info.run_id, "train/loss")) >= 2

    # registry: version 1 is the champion and answers through pyfunc
    reg = pipeline_result["registered"]
    assert reg["promoted"] is True
    champion = client.get_model_version_by_alias("moa-model", "champion")
    assert str(champion.version) == reg["version"]
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/moa-model@champion")
    out = model.predict(pd.DataFrame({"prompt": ["What is fever?", "def add(a, b):"]}))
    assert list(out.columns) == ["text", "expert", "confidence"] and set(out["expert"]) <= {*domains, "base"}
    assert all(0 < c <= 1 for c in out["confidence"])
    forced = model.predict(pd.DataFrame({"prompt": ["What is fever?"], "domain": ["medicine"]}))
    assert forced["expert"].tolist() == ["medicine"] and forced["confidence"].tolist() == [None]


def test_every_stage_is_a_prefect_task_run(pipeline_result: dict):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_runs():
        async with get_client() as c:
            return await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[pipeline_result["flow_run_id"]])))

    runs = asyncio.run(task_runs())
    by_name = {r.name: r.state.type.value for r in runs}
    for name in ["curate[code]", "train_expert[sports]", "train_router[moa]"]:
        assert by_name.get(name) == "COMPLETED", by_name
    assert any(n.startswith("evaluate") for n in by_name) and any(n.startswith("register") for n in by_name)
    # the flow ran exactly the stages dvc.yaml defines (tests/test_pipeline_definition.py)
    import re

    from tasks.prefect_tasks import PIPELINE_STAGES

    assert {re.split(r"[\[-]", n)[0] for n in by_name} == set(PIPELINE_STAGES), sorted(by_name)


def test_a_worse_model_does_not_take_champion(project: Path, pipeline_result: dict):
    from mlflow import MlflowClient

    from tasks.common import StageContext
    from tasks.register import run_register

    ctx = StageContext.load(project / "params.yaml", "quick")
    path = project / "metrics/eval.json"
    original = path.read_text()
    ev = json.loads(original)
    champion_version = pipeline_result["registered"]["version"]
    ev["moa"]["avg_rougeL"] = ev["moa"]["avg_rougeL"] - 50.0  # clearly worse on the gate metric
    path.write_text(json.dumps(ev))
    try:
        worse = run_register(ctx)
    finally:
        path.write_text(original)  # the project is shared with the other e2e tests
    assert worse["promoted"] is False and "worse than champion" in worse["reason"]
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("moa-model", "champion").version) == champion_version
    assert "worse than champion" in client.get_model_version("moa-model", worse["version"]).tags["moa.not_promoted_reason"]


def _register_with_base_at(project: Path, base_dir: Path, model_name: str, include_base: bool) -> str:
    from tasks.common import StageContext
    from tasks.register import run_register

    ctx = StageContext.load(project / "params.yaml", "quick")
    cfg = ctx.cfg.model_copy(update={
        "base_model": ctx.cfg.base_model.model_copy(update={"source": str(base_dir)}),
        "registry": ctx.cfg.registry.model_copy(update={"model_name": model_name, "include_base": include_base})})
    return run_register(StageContext(cfg=cfg, root=ctx.root))["version"]


def test_registry_include_base_makes_a_version_that_serves_without_the_project(
        project: Path, pipeline_result: dict, tiny_model_dir: Path, tmp_path: Path):
    import shutil

    import mlflow
    import pandas as pd

    carried, pointed = tmp_path / "base-carried", tmp_path / "base-pointed"
    shutil.copytree(tiny_model_dir, carried)
    shutil.copytree(tiny_model_dir, pointed)
    v_carried = _register_with_base_at(project, carried, "moa-portable", include_base=True)
    v_pointed = _register_with_base_at(project, pointed, "moa-pointer", include_base=False)
    shutil.rmtree(carried)  # the base model is gone from where both versions were registered
    shutil.rmtree(pointed)

    out = mlflow.pyfunc.load_model(f"models:/moa-portable/{v_carried}").predict(pd.DataFrame({"prompt": ["What is fever?"]}))
    assert list(out.columns) == ["text", "expert", "confidence"]
    assert out["expert"].iloc[0] in {"code", "medicine", "finance", "sports", "base"}
    with pytest.raises(Exception, match="registered without its base model.*include_base: true"):
        mlflow.pyfunc.load_model(f"models:/moa-pointer/{v_pointed}")


def test_moa_evaluate_remakes_the_table_from_the_trained_models(project: Path, pipeline_result: dict):
    from typer.testing import CliRunner

    from moa_cli.main import app

    before = pipeline_result["evaluation"]["metrics"]
    res = CliRunner().invoke(app, ["evaluate", "--params", str(project / "params.yaml"), "--profile", "quick"])
    assert res.exit_code == 0, res.output
    after = json.loads((project / "metrics/eval.json").read_text())
    assert set(after) == set(before)
    for system, vals in before.items():  # held-out split, fixed decoding: the same numbers again
        assert after[system]["avg_ppl"] == pytest.approx(vals["avg_ppl"], rel=1e-3), system
        assert after[system]["avg_rougeL"] == pytest.approx(vals["avg_rougeL"], abs=0.5), system
    assert "| moa |" in res.output


def test_moa_evaluate_before_training_says_what_to_run(tmp_path: Path, tiny_model_dir: Path):
    import yaml
    from typer.testing import CliRunner

    from conftest import tiny_raw_params
    from moa_cli.main import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(tiny_model_dir)))
    res = CliRunner().invoke(app, ["evaluate", "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 2
    assert "nothing to evaluate yet" in res.output and "moa run" in res.output
