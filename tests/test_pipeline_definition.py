"""One pipeline definition: dvc.yaml has the flow's stages (tasks/prefect_tasks.py PIPELINE_STAGES), in order,
each running `moa stage <name>`, and reads params.yaml down to the keys each stage uses. (That the flow runs
exactly these stages is checked on its real run in test_pipeline_e2e.py.)"""

from __future__ import annotations

import yaml

from conftest import ROOT


def _dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _params(stage: dict) -> list[str]:
    return list((stage.get("do") or stage)["params"])


def test_dvc_stages_are_the_flows_stages_in_order_with_their_commands():
    from tasks.prefect_tasks import PIPELINE_STAGES

    stages = _dvc()
    assert list(stages) == list(PIPELINE_STAGES)
    for name, task in PIPELINE_STAGES.items():
        assert task.name == name
        cmd = (stages[name].get("do") or stages[name])["cmd"]
        suffix = " ${key}" if "foreach" in stages[name] else ""
        assert cmd == f"moa stage {name.replace('_', '-')}{suffix}", name


def test_train_router_reads_what_every_method_and_the_comparison_rows_need():
    """Every params.yaml section a registered method reads, and the keys that choose the ablation and the
    compare_methods rows (which the DVC stage trains as the flow does)."""
    from moa_core.methods import get_method, method_names

    params = _params(_dvc()["train_router"])
    for method in method_names():
        for section in get_method(method).config_sections:
            assert section in params or any(p.startswith(f"{section}.") for p in params), (method, section)
    assert {"method", "evaluate.baselines", "evaluate.compare_methods", "train.joint_lr"} <= set(params)


def test_stage_two_keys_do_not_retrain_the_experts():
    """DVC params at key level: the joint stage's settings are train_router's alone, while runtime-only keys
    (threads, logging, checkpoint interval) re-run no stage."""
    stages = _dvc()
    runtime = {"train.num_threads", "train.parallel_jobs", "train.log_every", "train.checkpoint_every"}
    for name in ("train_expert", "train_mixed"):
        params = _params(stages[name])
        assert "train" not in params and not {"train.joint_lr", "train.joint_steps", "router"} & set(params), name
    for name, stage in stages.items():
        assert not runtime & set(_params(stage)), name


def test_every_param_dvc_reads_is_written_in_params_yaml():
    """DVC refuses to run a stage whose params are missing from params.yaml (a default in config.py is not
    enough): every key dvc.yaml lists is there."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _dvc().items():
        for key in _params(stage):
            if "${" in key:  # domains.${key}: one per domain, present by construction
                continue
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params.yaml has no {key}"
                node = node[part]
