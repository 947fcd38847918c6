"""Onboarding a fifth domain onto a trained four-domain mixture: old experts bit-identical, router accuracy on
all five domains, a new registry version, promotion blocked by a regression, and bad requests stopped before
any training with params.yaml and the registry untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import toy_records

OLD = ["code", "medicine", "finance", "sports"]


# ------------------------------------------------------------------------------- pure parts, fast
def test_regression_gate_per_domain_and_direction():
    from moa_core.onboard import regression_gate

    before = {"a": {"ppl": 10.0, "rougeL": 20.0}, "b": {"ppl": 5.0, "rougeL": 30.0}}
    ok = regression_gate(before, {"a": {"ppl": 10.4, "rougeL": 19.5}, "b": {"ppl": 4.0, "rougeL": 31.0}, "new": {"ppl": 9.0}},
                         "ppl", 0.05)
    assert ok.passed and set(ok.compared) == {"a", "b"} and ok.compared["a"]["allowed"] == pytest.approx(10.5)
    bad = regression_gate(before, {"a": {"ppl": 10.6}, "b": {"ppl": 5.0}}, "ppl", 0.05)
    assert not bad.passed and [r.domain for r in bad.regressions] == ["a"] and "a: ppl 10 -> 10.6" in bad.reason
    assert not regression_gate(before, {"a": {"rougeL": 18.0}, "b": {"rougeL": 30.0}}, "rougeL", 0.05).passed
    assert regression_gate(before, {"a": {"rougeL": 19.1}, "b": {"rougeL": 30.0}}, "rougeL", 0.05).passed
    assert not regression_gate(before, {"a": {"ppl": float("nan")}, "b": {"ppl": 5.0}}, "ppl", 0.05).passed
    with pytest.raises(ValueError, match="not evaluated on old domains"):
        regression_gate(before, {"a": {"ppl": 1.0}}, "ppl", 0.0)


def test_regression_gate_sees_an_old_domains_router_accuracy_drop():
    """medicine 100 % -> 95 % after onboarding, perplexity unchanged: a regression (the gate looked at ppl only)."""
    from moa_core.onboard import regression_gate

    ppl = {"medicine": {"ppl": 10.0}, "code": {"ppl": 8.0}}
    after = {**ppl, "perl": {"ppl": 12.0}}
    acc_before = {"medicine": 1.0, "code": 0.9}
    dropped = regression_gate(ppl, after, "ppl", 0.05, acc_before, {"medicine": 0.95, "code": 0.9, "perl": 0.5})
    assert not dropped.passed and [r.domain for r in dropped.regressions] == ["medicine"], dropped.reason
    assert "medicine: router accuracy 1 -> 0.95 (allowed down to 1)" in dropped.reason
    assert dropped.compared["medicine"]["router_accuracy_after"] == 0.95
    assert regression_gate(ppl, after, "ppl", 0.05, acc_before, {"medicine": 0.95, "code": 0.9}, 0.05).passed
    assert regression_gate(ppl, after, "ppl", 0.05, acc_before, {"medicine": 1.0, "code": 0.95}).passed
    assert not regression_gate(ppl, after, "ppl", 0.05, acc_before, {"code": 0.9}).passed  # not measured


def test_add_domain_to_params_keeps_comments_and_validates(tmp_path: Path):
    import difflib

    from moa_core.config import add_domain_to_params, load_config

    src = Path(__file__).resolve().parent.parent / "params.yaml"
    p = tmp_path / "params.yaml"
    p.write_text(src.read_text())
    entry = {"description": "law Q&A", "source": {"kind": "file", "path": "data/raw/law.jsonl",
                                                    "fields": {"instruction": "question", "response": "answer"}}}
    add_domain_to_params(p, "law", entry)
    text = p.read_text()
    assert "# Your own data (a local file" in text and "# The one source of configuration" in text
    cfg = load_config(p)
    assert cfg.domain_names == ["code", "medicine", "finance", "sports", "law"]
    assert cfg.domain("law").source.fields == {"instruction": "question", "response": "answer"}
    diff = [ln for ln in difflib.ndiff(src.read_text().splitlines(), text.splitlines()) if ln[:2] in ("- ", "+ ")]
    assert all(ln.startswith("+ ") for ln in diff) and diff[0] == "+   law:", diff  # only added lines


@pytest.mark.parametrize("method", ["modula-flan", "modula-res"])
def test_modula_onboarding_trains_only_the_new_expert_and_routers(method, tiny_cfg, tiny_base, tiny_tok):
    import torch

    from moa_core.onboard import extend_mixture
    from moa_core.methods import build_mixture
    from moa_core.train import train_mixture

    cfg = tiny_cfg.model_copy(update={"method": method})
    mm = build_mixture(cfg, method, tiny_base, "tiny")
    mm.spec.domains = list(mm.spec.domains)
    recs = toy_records(4, 8)
    old = recs[:3]
    if method == "modula-res":  # MoDULA stage 1: the universal expert the domain experts read
        train_mixture(mm, tiny_tok, old, cfg, steps=2, lr=1e-2, train_experts=False, train_routers=False,
                      train_universal=True, route="experts_off")
    for k in range(len(mm.spec.experts)):  # give every old expert non-zero weights
        train_mixture(mm, tiny_tok, [old[min(k, 2)]], cfg, steps=1, lr=1e-2, train_experts=True, train_routers=False, route=k)
    before = {n: mm.expert_hash(k) for k, n in enumerate(mm.spec.experts)}
    universal = {n: p.detach().clone() for n, p in mm.named_parameters() if ".universal_" in n}
    res = extend_mixture(mm, cfg, tiny_tok, "law", recs[: len(mm.spec.domains)] + [recs[3]])
    assert {n: mm.expert_hash(k) for k, n in enumerate(mm.spec.experts[:-1])} == before
    assert mm.spec.experts[-1] == "law" and set(res.phases) == {"domain:law", "router"}
    assert all(torch.equal(p, universal[n]) for n, p in mm.named_parameters() if ".universal_" in n)
    assert next(iter(mm.wrapped.values())).lora_B[res.expert_index].abs().sum() > 0


def test_mosld_cannot_be_onboarded_and_says_what_to_do(tiny_cfg, tiny_base, tiny_tok):
    from moa_core.onboard import OnboardError, extend_mixture
    from moa_core.methods import build_mixture

    mm = build_mixture(tiny_cfg.model_copy(update={"method": "mosld"}), "mosld", tiny_base, "tiny")
    with pytest.raises(OnboardError, match="moa run"):
        extend_mixture(mm, tiny_cfg, tiny_tok, "law", toy_records(4, 4))


# ------------------------------------------------------------------------------- the real flow (slow)
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _law_rows(n: int = 40) -> list[dict]:
    topics = ["contract", "tort", "lease", "patent", "custody", "appeal", "bail", "copyright"]
    rows = [{"question": f"What does a {topics[i % 8]} lawyer check in case {i}?",
             "answer": f"The {topics[i % 8]} terms, the parties' duties and the deadlines of case {i}."} for i in range(n)]
    rows += [{"question": "", "answer": "an empty question is quarantined"}, {"question": "no answer here"}]
    return rows


def _versions(project: Path) -> list[str]:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns/mlflow.db'}")
    return sorted(int(v.version) for v in MlflowClient().search_model_versions("name='moa-model'"))


@pytest.fixture(scope="module")
def trained(project: Path, pipeline_result: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's trained four-domain project (so onboarding here cannot disturb other tests)."""
    root = tmp_path_factory.mktemp("onboard") / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("checkpoints"))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    # the tiny random model's router is not what these tests check (test_regression_gate_sees_... does)
    raw["profiles"]["quick"]["onboard"] = {"router_steps": 4, "tolerance": 0.5, "router_accuracy_tolerance": 1.0}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


@pytest.mark.slow
def test_bad_requests_stop_before_training_and_change_nothing(trained: Path):
    from flows.onboard import onboard_domain
    from moa_core.config import ConfigError
    from moa_core.data import EmptyDomainError
    from moa_core.onboard import OnboardError
    from moa_core.sources import SourceError

    params = trained / "params.yaml"
    before_params, before_versions = params.read_bytes(), _versions(trained)
    empty = _write_jsonl(trained / "data/raw/empty.jsonl", [])
    blank = _write_jsonl(trained / "data/raw/blank.jsonl", [{"question": " ", "answer": " "}] * 3)
    law = _write_jsonl(trained / "data/raw/law.jsonl", _law_rows())
    fields = {"instruction": "question", "response": "answer"}
    cases = [
        (dict(domain="code", source=str(law), fields=fields), OnboardError, "already exists"),
        (dict(domain="law", source="no-such-org/no-such-dataset", fields=fields), SourceError, "no-such-org/no-such-dataset"),
        (dict(domain="law", source=str(trained / "data/raw/missing.jsonl")), OnboardError, "no such file"),
        (dict(domain="law", source=str(empty), fields=fields), SourceError, "no rows"),
        (dict(domain="law", source=str(blank), fields=fields), EmptyDomainError, "law"),
        (dict(domain="law", source=str(law), fields={"instruction": "query", "response": "answer"}), SourceError, "query"),
        (dict(domain="Law!", source=str(law), fields=fields), OnboardError, "Law!"),
        (dict(domain="law", source=str(law), fields={"prompt": "question"}), (OnboardError, ConfigError), "prompt"),
    ]
    for kwargs, exc, words in cases:
        with pytest.raises(exc, match=words.replace("!", "\\!").replace("/", "\\/")):
            onboard_domain(params=str(params), profile="quick", **kwargs)
        assert params.read_bytes() == before_params, kwargs
        assert _versions(trained) == before_versions, kwargs
        assert not (trained / "models/experts/law").exists() and not (trained / "models/onboard/law").exists(), kwargs


@pytest.mark.slow
def test_onboard_a_fifth_domain_then_a_regression_blocks_promotion(trained: Path):
    from flows.onboard import onboard_domain
    from moa_core.config import load_config
    from moa_core.model import MixtureModel, load_mixture, read_spec
    from transformers import AutoModelForCausalLM
    from mlflow import MlflowClient

    params = trained / "params.yaml"
    cfg = load_config(params)

    def hashes(mixture: Path) -> dict[str, str]:
        mm: MixtureModel = load_mixture(AutoModelForCausalLM.from_pretrained(cfg.base_model.source), mixture)
        return {n: mm.expert_hash(k) for k, n in enumerate(mm.spec.experts)}

    old_hashes = hashes(trained / "models/mixture/moa")
    versions = _versions(trained)
    law = _write_jsonl(trained / "data/raw/law.jsonl", _law_rows())
    result = onboard_domain(domain="law", source="data/raw/law.jsonl", description="law Q&A",
                            fields={"instruction": "question", "response": "answer"}, params=str(params), profile="quick")
    assert law.exists()

    # curated like the others: the two malformed rows are quarantined and counted
    assert result["counts"]["quarantined"] == 2
    card = json.loads((trained / "data/curated/law/card.json").read_text())
    assert card["counts"]["quarantined"] == 2
    # the old experts are bit-identical (hash of every A/B slice, recomputed from the saved files)
    new_hashes = hashes(trained / "models/onboard/law")
    assert {d: new_hashes[d] for d in OLD} == old_hashes and set(new_hashes) == {*OLD, "law"}
    assert result["extend"]["old_experts_unchanged"] is True
    # router accuracy on all five domains, and the before/after comparison of the old ones
    ev = result["evaluation"]
    assert set(ev["router_accuracy_by_domain"]) == {*OLD, "law"}
    assert all(0.0 <= a <= 1.0 for a in ev["router_accuracy_by_domain"].values())
    assert set(ev["compared"]) == set(OLD) and set(ev["after"]) == {*OLD, "law"}
    # a new registry version, tagged; promoted (tolerance 0.5 here), so the project now includes law
    reg = result["registered"]
    assert _versions(trained) == sorted(versions + [int(reg["version"])])
    client = MlflowClient()
    mv = client.get_model_version("moa-model", reg["version"])
    assert mv.tags["moa.onboarded"] == "law" and mv.tags["moa.domains"].endswith(",law")
    assert ev["passed"] and reg["promoted"], ev["reason"]
    assert str(client.get_model_version_by_alias("moa-model", "champion").version) == str(reg["version"])
    assert load_config(params).domain_names == [*OLD, "law"]
    assert read_spec(trained / "models/mixture/moa").domains == [*OLD, "law"]
    cost = result["cost"]
    assert 0 < cost["onboard_trainable_params"] < cost["full_mixture_trainable_params"]
    assert (trained / "metrics/onboard_law.json").exists()

    # A sixth "domain" that copies the code prompts with junk answers, and no tolerance: the router update
    # for it moves old prompts to other experts (measured here: sports ppl 331.6 -> 335.4 on the tiny model),
    # so the gate blocks it. The run is seeded, so the same numbers come back on every run.
    code_rows = [json.loads(ln) for ln in (trained / "data/curated/code/train.jsonl").read_text().splitlines()]
    code_rows += [json.loads(ln) for ln in (trained / "data/curated/code/test.jsonl").read_text().splitlines()]
    _write_jsonl(trained / "data/raw/junk.jsonl",
                 [{"instruction": r["instruction"], "response": "zq " * 40} for r in code_rows])
    raw = yaml.safe_load(params.read_text())
    raw["profiles"]["quick"]["onboard"] = {"router_steps": 8, "tolerance": 0.0}
    raw["profiles"]["quick"]["train"].update({"expert_steps": 16})
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    params_before = params.read_bytes()
    champion = client.get_model_version_by_alias("moa-model", "champion").version
    bad = onboard_domain(domain="junk", source="data/raw/junk.jsonl", params=str(params), profile="quick")
    gate = bad["evaluation"]
    assert not gate["passed"], gate["compared"]
    worse = [d for d, c in gate["compared"].items() if c["after"] > c["allowed"]]
    assert worse and all(f"{d}: ppl" in gate["reason"] for d in worse)
    assert bad["registered"]["promoted"] is False
    mv = client.get_model_version("moa-model", bad["registered"]["version"])
    assert "regression on" in mv.tags["moa.not_promoted_reason"]
    assert client.get_model_version_by_alias("moa-model", "champion").version == champion
    assert params.read_bytes() == params_before
    assert read_spec(trained / "models/mixture/moa").domains == [*OLD, "law"]
