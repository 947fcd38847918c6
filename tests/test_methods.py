"""The method registry: the built-in methods, config validation against it, saved specs from before the
routing enums, and a method registered in one place (this file) going through the real flow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_raw_params, toy_records
from moa_core.methods import MixtureMethod, get_method, method_names, register_method, unregister_method
from moa_core.methods.moa import MoA

BUILT_IN = ("moa", "mosld", "modula-flan", "modula-res")


class AttentionOnlyMoA(MoA):
    """The toy method: MoA whose mixture keeps the stage-1 experts of the attention's q/v projections only."""

    name = "toy-attn-moa"

    def spec(self, cfg, base, model_id):
        return dataclasses.replace(super().spec(cfg, base, model_id), target_modules=["q_proj", "v_proj"])


@pytest.fixture
def toy_method():
    register_method(AttentionOnlyMoA)
    yield AttentionOnlyMoA.name
    unregister_method(AttentionOnlyMoA.name)


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_built_in_methods_and_their_flags():
    assert method_names()[:4] == BUILT_IN
    assert [get_method(m).needs_experts for m in BUILT_IN] == [True, False, False, False]
    assert [get_method(m).onboardable for m in BUILT_IN] == [True, False, True, True]
    assert "mosld" in get_method("mosld").config_sections and "modula" in get_method("modula-res").config_sections
    with pytest.raises(ValueError, match="did you mean 'mosld'"):
        get_method("mosl")


def test_config_accepts_what_is_registered_and_suggests_a_fix(toy_method):
    from moa_core.config import ConfigError, parse_config

    raw = _raw()
    raw["method"] = "moe"
    with pytest.raises(ConfigError, match=r"method: .*unknown method 'moe'; did you mean 'moa'\?"):
        parse_config(raw)
    raw = _raw()
    raw["evaluate"]["compare_methods"] = ["modula_flan"]
    with pytest.raises(ConfigError, match=r"evaluate\.compare_methods: .*did you mean 'modula-flan'\?"):
        parse_config(raw)
    raw = _raw()
    raw["method"] = toy_method
    assert parse_config(raw).method == toy_method
    unregister_method(toy_method)
    with pytest.raises(ConfigError, match=f"unknown method '{toy_method}'"):
        parse_config(raw)


def test_a_method_without_a_name_or_with_a_taken_one_is_refused():
    class Nameless(MixtureMethod):
        pass

    class Impostor(MixtureMethod):
        name = "moa"

    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        register_method(Nameless)
    with pytest.raises(ValueError, match="already registered by MoA"):
        register_method(Impostor)
    assert type(get_method("moa")) is MoA


def test_mixture_json_written_before_the_routing_enum_loads_and_saves_the_same(tmp_path: Path):
    from moa_core.model import MIXTURE_CONFIG, read_spec
    from moa_core.routing import Routing

    old = {"base_config_hash": "abc", "base_model": "tiny", "domains": ["a", "b"], "dropconnect_p": 0.1,
           "dropout": 0.05, "experts": ["e0", "e1"], "experts_per_layer": [2, 2], "inference": "last",
           "leaky_slope": 0.01, "method": "mosld", "pooling": "mean", "r": 8, "routing": "topk", "scaling": 2.0,
           "shared_a": True, "target_modules": ["q_proj", "v_proj"], "top_k": 2, "universal_r": 0,
           "universal_scaling": 1.0}
    text = json.dumps(old, indent=2, sort_keys=True)
    (tmp_path / MIXTURE_CONFIG).write_text(json.dumps({**old, "extra": {"train": {}}}))
    spec = read_spec(tmp_path)
    assert spec.routing is Routing.TOPK and spec.routing.per_token
    assert spec.to_json() == text  # byte-identical: saved mixtures and their DVC hashes do not change


def test_domain_data_slices_validation_like_train():
    from moa_core.methods import DomainData

    train, val = toy_records(3, 4), toy_records(3, 2)
    data = DomainData(train, val)
    assert data.domain(-1) == DomainData([train[2]], [val[2]]) and len(data) == 3
    assert DomainData(train).domain(0).val is None
    with pytest.raises(ValueError, match="val has 2 domains, train 3"):
        DomainData(train, val[:2])


def test_the_toy_spec_is_built_by_the_registry(toy_method, tiny_cfg, tiny_base):
    from moa_core.methods import build_mixture

    mm = build_mixture(tiny_cfg, toy_method, tiny_base, "tiny")
    assert mm.spec.method == toy_method
    assert {name.rsplit(".", 1)[-1] for name in mm.wrapped} == {"q_proj", "v_proj"}


@pytest.mark.slow
def test_a_registered_method_runs_through_the_flow(toy_method, tmp_path: Path, tiny_model_dir: Path):
    """Registered here and nowhere else: the flow trains the stage-1 experts it needs, its mixture, evaluates
    and registers it; its spec is the one its class builds."""
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import moa_pipeline
    from moa_core.model import read_spec

    raw = tiny_raw_params(tiny_model_dir)
    raw["method"] = toy_method
    raw["domains"] = {k: v for k, v in raw["domains"].items() if k in ("code", "medicine")}
    raw["profiles"]["quick"]["curate"] = {"max_rows": 20}
    raw["evaluate"].update({"baselines": ["single"], "compare_methods": []})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    result = moa_pipeline(params=str(tmp_path / "params.yaml"), profile="quick")

    spec = read_spec(tmp_path / "models/mixture" / toy_method)
    assert spec.method == toy_method and spec.target_modules == ["q_proj", "v_proj"]
    assert set(result["evaluation"]["metrics"]) == {"single-lora", toy_method}
    trained = json.loads((tmp_path / f"metrics/train_router_{toy_method}.json").read_text())
    assert set(trained["phases"]) == {"joint"} and trained["method"] == toy_method
    assert result["registered"]["promoted"] is True
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}")
    version = MlflowClient().get_model_version(raw["registry"]["model_name"], result["registered"]["version"])
    assert version.tags["moa.method"] == toy_method
