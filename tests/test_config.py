"""params.yaml validation: every mistake names the key and the fix, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_raw_params
from moa_core.base_model import BaseModelError, resolve_base_path
from moa_core.config import BaseModelConfig, ConfigError, TrainConfig, load_config, parse_config


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_are_valid_with_and_without_profile():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.method == "moa" and cfg.domain_names == ["code", "medicine", "finance", "sports"]
    quick = load_config(ROOT / "params.yaml", profile="quick")
    assert quick.train.expert_steps < cfg.train.expert_steps and quick.lora == cfg.lora


def test_unknown_key_names_it_and_suggests_the_fix():
    raw = _raw()
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert "train.learning_rate" in str(e.value) and "unknown key" in str(e.value)
    raw = _raw()
    raw["lora"]["rank"] = 8
    with pytest.raises(ConfigError, match=r"lora\.rank.*allowed keys here: r, alpha"):
        parse_config(raw)
    raw = _raw()
    raw["routr"] = {}
    with pytest.raises(ConfigError, match="did you mean 'router'"):
        parse_config(raw)


@pytest.mark.parametrize("section,key,value,needle", [
    ("lora", "r", 0, "lora.r"),
    ("train", "batch_size", "eight", "train.batch_size"),
    ("curate", "val_fraction", 0.9, "curate.val_fraction"),
    ("router", "pooling", "max", "router.pooling"),
    ("serve", "prompt_shapes", -1, "serve.prompt_shapes"),
])
def test_bad_values_name_the_key(section, key, value, needle):
    raw = _raw()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_config(raw)


def test_bad_method_and_domain_errors():
    raw = _raw()
    raw["method"] = "moe"
    with pytest.raises(ConfigError, match="method"):
        parse_config(raw)
    raw = _raw()
    raw["domains"]["Bad Name"] = {"source": {"kind": "builtin", "name": "hpo"}}
    with pytest.raises(ConfigError, match="must match"):
        parse_config(raw)
    raw = _raw()
    raw["domains"]["law"] = {"source": {"kind": "file"}}
    with pytest.raises(ConfigError, match="needs 'path'"):
        parse_config(raw)


def test_two_domains_with_one_name_are_rejected(tmp_path: Path):
    text = (ROOT / "params.yaml").read_text().replace(
        "  medicine:\n", "  code:\n    source: {kind: builtin, name: hpo}\n  medicine:\n", 1)
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="'code' appears twice"):
        load_config(p)


def test_missing_profile_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="profile 'fast' not found"):
        load_config(ROOT / "params.yaml", profile="fast")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_base_model_path_that_does_not_exist(tmp_path: Path):
    with pytest.raises(BaseModelError, match="does not exist"):
        resolve_base_path(BaseModelConfig(source="./models/nowhere"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="without config.json"):
        resolve_base_path(BaseModelConfig(source="empty"), tmp_path)


def test_trust_remote_code_is_off_by_default():
    assert load_config(ROOT / "params.yaml").base_model.trust_remote_code is False


def test_prefect_retries_only_what_a_retry_can_fix():
    from moa_core.config import ConfigError
    from moa_core.data import EmptyDomainError
    from moa_core.model import MixtureError
    from moa_core.train import NonFiniteLossError
    from tasks.prefect_tasks import _retryable

    class Failed:  # the one method Prefect's retry_condition_fn calls on a state
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def result(self):
            raise self.exc

    for permanent in (ConfigError("bad key"), MixtureError("other base"), NonFiniteLossError("nan"),
                      EmptyDomainError("empty"), FileNotFoundError("gone")):
        assert _retryable(None, None, Failed(permanent)) is False, permanent
    for transient in (ConnectionError("sqlite busy"), TimeoutError("slow disk"), OSError(28, "No space left")):
        assert _retryable(None, None, Failed(transient)) is True, transient


def test_profiles_compose_in_order(tiny_model_dir):
    from moa_core.config import ConfigError, parse_config

    raw = tiny_raw_params(tiny_model_dir)
    cfg = parse_config(raw, profile="gpu,from_mixed")
    assert cfg.train.experts_from == "mixed" and cfg.train.seeds == [0, 1, 2] and cfg.train.precision == "bf16"
    assert parse_config(raw, profile="gpu").train.experts_from == "base"
    with pytest.raises(ConfigError, match="'nope' not found"):
        parse_config(raw, profile="gpu,nope")


def test_a_profile_does_not_hide_a_bad_base_value():
    """`batch_size: four` under train: must fail with --profile quick too (the profile overrides it), not only
    in the next full run after a quick run has registered a version."""
    raw = _raw()
    raw["train"]["batch_size"] = "four"
    assert "batch_size" in raw["profiles"]["quick"]["train"]
    with pytest.raises(ConfigError, match=r"train\.batch_size.*four"):
        parse_config(raw, "params.yaml", profile="quick")


def test_epoch_budget_has_a_floor_of_min_steps():
    t = TrainConfig(batch_size=64, epochs=3.0, min_steps=48)
    assert t.step_budget(999, 131) == 48  # 3 epochs of HumanEval's 131 rows at batch 64 are 7 steps: the floor wins
    assert t.step_budget(999, 13_160) == 617  # a large domain: epochs decide
    assert TrainConfig(batch_size=64, epochs=3.0).step_budget(999, 131) == 7
    assert TrainConfig(batch_size=64, min_steps=48).step_budget(10, 131) == 10  # without epochs: the stage's own steps
