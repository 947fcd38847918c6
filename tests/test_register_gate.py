"""The @champion gate of the register stage on a real MLflow registry with a tiny mixture: the champion is
compared on the current test split (evaluated again when its figures are from another one), router accuracy
per domain counts as well as the metric, and a champion that cannot be read or evaluated blocks promotion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from conftest import tiny_raw_params

DOMAINS = ["code", "medicine"]


def _project(root: Path, tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    from moa_core.model import save_mixture
    from moa_core.methods import build_mixture
    from tasks.common import StageContext

    raw = tiny_raw_params(tiny_model_dir)
    raw["domains"] = {d: raw["domains"][d] for d in DOMAINS}
    raw["evaluate"].update({"max_samples": 2, "max_new_tokens": 2})
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    ctx = StageContext.load(root / "params.yaml")
    for d in DOMAINS:
        _write_test(ctx, d, [f"{d} question {i}" for i in range(3)])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    save_mixture(build_mixture(ctx.cfg, "moa", base, str(tiny_model_dir)), ctx.layout.mixture("moa"))
    return ctx


def _write_test(ctx, domain: str, prompts: list[str]) -> None:
    out = ctx.layout.curated(domain)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"{domain}-{i}", "domain": domain, "instruction": p, "response": f"answer {i}"}
            for i, p in enumerate(prompts)]
    (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _candidate(ctx, rouge: float, router: dict[str, float]) -> None:
    flat = {"avg_rougeL": rouge, **{f"{d}_router_accuracy": a for d, a in router.items()}}
    ctx.layout.metrics.mkdir(parents=True, exist_ok=True)
    (ctx.layout.metrics / "eval.json").write_text(json.dumps({"moa": flat}))


def _champion(ctx) -> str:
    from mlflow import MlflowClient

    return str(MlflowClient().get_registered_model("moa-model").aliases["champion"])


def test_promotion_gate_compares_like_with_like_and_fails_closed(tmp_path: Path, tiny_model_dir: Path):
    from mlflow import MlflowClient

    from tasks.register import run_register

    ctx = _project(tmp_path / "p", tiny_model_dir)
    _candidate(ctx, 40.0, {"code": 1.0, "medicine": 1.0})
    first = run_register(ctx)
    assert first["promoted"] and first["reason"] == "no champion yet"

    # better on the metric, but medicine's router accuracy drops 100 % -> 95 %: not promoted
    _candidate(ctx, 45.0, {"code": 1.0, "medicine": 0.95})
    dropped = run_register(ctx)
    assert not dropped["promoted"], dropped["reason"]
    assert "medicine: router accuracy 100% -> 95%" in dropped["reason"] and "same test split" in dropped["reason"]
    assert _champion(ctx) == first["version"]

    # the test split changes (another domain set or new test rows): the champion's stored 40.0 was measured on
    # the old one, so it is evaluated again here (the random tiny mixture scores about 0, not 40)
    _write_test(ctx, "medicine", [f"what is symptom {i}?" for i in range(3)])
    _candidate(ctx, 5.0, {"code": 0.0, "medicine": 0.0})
    ctx = ctx.__class__(cfg=ctx.cfg.model_copy(update={"registry": ctx.cfg.registry.model_copy(
        update={"router_accuracy_tolerance": 1.0})}), root=ctx.root)
    remeasured = run_register(ctx)
    assert "evaluated again on this test split" in remeasured["reason"], remeasured["reason"]
    assert remeasured["promoted"], remeasured["reason"]  # 5.0 beats the champion's real figure, not its stale 40
    assert _champion(ctx) == remeasured["version"]

    # the champion cannot be evaluated again (its artifacts are gone): whatever fails, @champion stays
    _write_test(ctx, "code", [f"def f{i}():" for i in range(3)])
    _candidate(ctx, 99.0, {"code": 1.0, "medicine": 1.0})
    client = MlflowClient()
    champion = client.get_model_version("moa-model", remeasured["version"])
    shutil.rmtree(Path(client.get_model_version_download_uri("moa-model", champion.version).removeprefix("file://")))
    blocked = run_register(ctx)
    assert not blocked["promoted"] and "could not be read or evaluated again" in blocked["reason"], blocked["reason"]
    assert _champion(ctx) == remeasured["version"]
    assert client.get_model_version("moa-model", blocked["version"]).tags["moa.not_promoted_reason"] == blocked["reason"]
