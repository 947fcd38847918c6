"""Incremental retraining (moa_core.incremental, tasks/incremental.py): fingerprints, stage records, the flow
skipping unchanged stages, `force`, byte-identical outputs for the same inputs, and the @champion gate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from helpers import tiny_raw_params, toy_records
from moa_core.incremental import (
    STAGE_KEYS, StageRecord, config_values, is_unchanged, make_record, merge_timings, path_digest, read_record,
    record_path, sort_adapter_config, split_timings, stage_fingerprint, write_record,
)


# ------------------------------------------------------------------------------------------- unit
def test_stage_keys_are_dvc_yamls_params():
    """The flow's fingerprints and `dvc repro` re-run a stage for the same changed keys: dvc.yaml lists, per stage,
    exactly STAGE_KEYS (curate also its own domain's entry)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_KEYS)
    for name, stage in stages.items():
        listed = list((stage.get("do") or stage)["params"])
        if name == "curate":
            listed.remove("domains.${key}")
        assert listed == list(STAGE_KEYS[name]), name


def test_fingerprint_follows_the_keys_a_stage_reads_and_nothing_else():
    cfg = {"train": {"lr": 0.1, "joint_lr": 0.5, "log_every": 2}, "lora": {"r": 8}}
    keys = ["train.lr", "lora"]
    fp = stage_fingerprint("train_expert:code", cfg, keys, {"reads": {"a": "1"}})
    same = {**cfg, "train": {**cfg["train"], "joint_lr": 0.9, "log_every": 5}}  # keys the stage does not read
    assert stage_fingerprint("train_expert:code", same, keys, {"reads": {"a": "1"}}) == fp
    assert stage_fingerprint("train_expert:code", {**cfg, "lora": {"r": 4}}, keys, {"reads": {"a": "1"}}) != fp
    assert stage_fingerprint("train_expert:code", cfg, keys, {"reads": {"a": "2"}}) != fp
    assert stage_fingerprint("train_expert:sports", cfg, keys, {"reads": {"a": "1"}}) != fp
    assert stage_fingerprint("train_expert:code", cfg, keys, {"reads": {"a": "1"}, "seed": 1}) != fp
    assert config_values(cfg, ["train.lr", "train.missing", "nope.x"]) == {"train.lr": 0.1, "train.missing": None,
                                                                            "nope.x": None}


def test_path_digest_sees_content_names_and_absence(tmp_path: Path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "a.bin").write_bytes(b"xy")
    first = path_digest(d)
    (d / "a.bin").write_bytes(b"xy")  # rewritten, same bytes: same digest (mtimes do not count)
    assert path_digest(d) == first
    (d / "a.bin").write_bytes(b"xz")
    assert path_digest(d) != first
    (d / "a.bin").write_bytes(b"xy")
    (d / "b.bin").write_bytes(b"")
    assert path_digest(d) != first
    assert path_digest(tmp_path / "missing") is None


def test_record_round_trip_and_when_a_stage_may_be_skipped(tmp_path: Path):
    out = tmp_path / "models" / "experts" / "code"
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    metrics = tmp_path / "metrics" / "train_expert_code.json"
    metrics.parent.mkdir()
    metrics.write_text("{}")
    path = record_path(tmp_path / ".moa" / "stages", "train_expert:code")
    assert path.name == "train_expert.code.json"
    write_record(path, make_record("train_expert:code", "fp1", tmp_path, [out, metrics], {"steps": 4, "x": float("nan")}))
    record = read_record(path)
    assert isinstance(record, StageRecord) and record.outputs.keys() == {"models/experts/code", "metrics/train_expert_code.json"}
    assert is_unchanged(record, "fp1", tmp_path)
    assert not is_unchanged(record, "fp2", tmp_path)  # another fingerprint
    (out / "adapter_model.safetensors").write_bytes(b"other weights")  # an output changed behind the record's back
    assert not is_unchanged(record, "fp1", tmp_path)
    (out / "adapter_model.safetensors").write_bytes(b"weights")
    metrics.unlink()  # an output deleted
    assert not is_unchanged(record, "fp1", tmp_path)
    assert not is_unchanged(None, "fp1", tmp_path)
    path.write_text("{not json")
    assert read_record(path) is None  # a damaged record: the stage runs
    with pytest.raises(FileNotFoundError, match="cannot be recorded"):
        make_record("train_expert:code", "fp1", tmp_path, [metrics], {})


def test_timings_split_out_of_a_summary_and_back():
    summary = {"steps": 4, "train_seconds": 1.5, "resumed_from": 0,
               "phases": {"stage2": {"final_loss": 2.0, "seconds": 1.0, "tokens_per_second": 9.0}}}
    tracked, timings = split_timings(summary)
    assert tracked == {"steps": 4, "phases": {"stage2": {"final_loss": 2.0}}}
    assert timings == {"train_seconds": 1.5, "resumed_from": 0, "phases": {"stage2": {"seconds": 1.0, "tokens_per_second": 9.0}}}
    assert merge_timings(tracked, timings) == summary


def test_adapter_config_lists_target_modules_sorted(tmp_path: Path):
    config = {"r": 8, "target_modules": ["v_proj", "q_proj", "k_proj"], "task_type": "CAUSAL_LM"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    sort_adapter_config(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert json.loads(text)["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)


# ------------------------------------------------------------------------------ the flow, end to end
DOMAINS = ("alpha", "beta", "gamma")


def _write_source(root: Path, domain: str, rows: list[dict]) -> None:
    path = root / "data" / "raw" / f"{domain}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _project(root: Path, model_dir: Path) -> Path:
    """Three small file domains (a file source can grow), the tiny model, the quick profile."""
    for domain, rows in zip(DOMAINS, toy_records(len(DOMAINS), 30)):
        _write_source(root, domain, rows)
    raw = tiny_raw_params(model_dir, domains={d: {"source": {"kind": "file", "path": f"data/raw/{d}.jsonl"}}
                                             for d in DOMAINS})
    raw["evaluate"].update(max_samples=2, max_new_tokens=4, bootstrap=100)
    raw["profiles"]["quick"]["evaluate"] = {"max_samples": 2, "max_new_tokens": 4}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


# The DVC-tracked outputs of dvc.yaml (one seed): these must be the same bytes for the same inputs.
TRACKED = ("data/curated", "models/experts", "models/mixed", "models/mixture", "metrics/eval.json",
           "metrics/eval_rows.json", "metrics/fallback.json", "metrics/oracle.json", "metrics/eval_intervals.json",
           "reports/eval.md", "reports/eval_intervals.md", *(f"metrics/train_expert_{d}.json" for d in DOMAINS),
           "metrics/train_mixed.json", "metrics/train_router_moa.json", *(f"metrics/curate_{d}.json" for d in DOMAINS))


def _tracked_bytes(root: Path) -> dict[str, bytes]:
    out = {}
    for rel in TRACKED:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[f.relative_to(root).as_posix()] = f.read_bytes()
    return out


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns
            for rel in ("models", "data/curated", "metrics") for p in (root / rel).rglob("*") if p.is_file()
            and "timings" not in p.parts}


def _run(root: Path, force: bool = False) -> tuple[dict, float]:
    from flows.pipeline import moa_pipeline

    t0 = time.monotonic()
    result = moa_pipeline(params=str(root / "params.yaml"), profile="quick", force=force)
    return result, time.monotonic() - t0


def _champion(root: Path) -> str | None:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns/mlflow.db'}")
    version = MlflowClient().get_registered_model("moa-model").aliases.get("champion")
    return None if version is None else str(version)


ALL_STAGES = {*(f"curate:{d}" for d in DOMAINS), *(f"train_expert:{d}" for d in DOMAINS), "train_mixed",
              "train_router:moa", "evaluate", "intervals", "register"}


@pytest.mark.slow
def test_unchanged_skips_all_force_retrains_byte_identically_grown_domain_and_stage_two_key_retrain_their_chains(
        tmp_path: Path, tiny_model_dir: Path):
    root = _project(tmp_path, tiny_model_dir)
    first, first_s = _run(root)
    assert first["skipped"] == [] and first["registered"]["version"] == "1" and _champion(root) == "1"
    snapshot, mtimes = _tracked_bytes(root), _mtimes(root)
    adapter_cfg = json.loads((root / "models/experts/alpha/adapter_config.json").read_text())
    assert adapter_cfg["target_modules"] == sorted(adapter_cfg["target_modules"])
    assert "train_seconds" not in json.loads((root / "metrics/train_expert_alpha.json").read_text())
    assert json.loads((root / "metrics/timings/train_expert_alpha.json").read_text())["train_seconds"] > 0

    # (a) nothing changed: every stage is skipped, no file is rewritten, no version registered, in a fraction of the time
    again, again_s = _run(root)
    assert set(again["skipped"]) == ALL_STAGES and again["stage_runs"] == len(ALL_STAGES)
    assert _mtimes(root) == mtimes
    assert again["registered"]["version"] == "1" and again["registered"]["skipped"] and _champion(root) == "1"
    assert again["evaluation"]["metrics"] == first["evaluation"]["metrics"]
    assert again["intervals_table"] == first["intervals_table"]
    assert again_s < first_s / 2, (again_s, first_s)
    _assert_mlflow_says_skipped(root, again["mlflow_run_id"])

    # (d) force: every stage runs again and writes the same bytes (the DVC-tracked outputs are deterministic)
    forced, _ = _run(root, force=True)
    assert forced["skipped"] == []
    assert _tracked_bytes(root) == snapshot
    assert all(_mtimes(root)[p] != t for p, t in mtimes.items() if p.startswith("models/experts/"))
    # the same model again: the gate compares it with the champion and keeps it there (not worse)
    assert forced["registered"]["version"] == "2" and forced["registered"]["promoted"]
    mtimes = _mtimes(root)

    # (b) one domain's source grows: its curation and expert, the models reading every domain (LoRA-mixed baseline,
    # mixture) and what follows run again; the other domains' curation and experts are skipped
    rows = [json.loads(line) for line in (root / "data/raw/beta.jsonl").read_text().splitlines()]
    _write_source(root, "beta", rows + [{"instruction": f"beta extra question {i}", "response": "beta extra answer"}
                                        for i in range(10)])
    grown, _ = _run(root)
    assert set(grown["skipped"]) == {"curate:alpha", "curate:gamma", "train_expert:alpha", "train_expert:gamma"}
    changed = {p for p, t in _mtimes(root).items() if mtimes.get(p) != t}
    assert any(p.startswith("models/experts/beta/") for p in changed)
    assert not any(p.startswith(("models/experts/alpha/", "models/experts/gamma/", "data/curated/alpha/")) for p in changed)
    assert any(p.startswith("models/mixture/moa/") for p in changed)
    # (c) the gate still decides @champion for the new version
    reg = grown["registered"]
    assert reg["version"] == "3" and not reg.get("skipped") and reg["reason"]
    assert _champion(root) == ("3" if reg["promoted"] else "2")

    # (e) train.joint_lr is read by train_router alone: the experts and the LoRA-mixed baseline are skipped (this
    # project's trained state serves as the starting point; a fresh one would repeat the first run above)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["train"]["joint_lr"] *= 2
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    joint, _ = _run(root)
    assert set(joint["skipped"]) == {*(f"curate:{d}" for d in DOMAINS), *(f"train_expert:{d}" for d in DOMAINS),
                                     "train_mixed"}


def _assert_mlflow_says_skipped(root: Path, run_id: str) -> None:
    from mlflow import MlflowClient

    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["moa.stage.train_expert.alpha"] == "unchanged, skipped"
    assert tags["moa.stage.register"] == "unchanged, skipped"
    assert set(tags["moa.skipped_stages"].split(",")) == ALL_STAGES


@pytest.mark.slow
def test_moa_run_leaves_dvc_up_to_date_and_a_second_run_trains_nothing(tmp_path: Path, tiny_model_dir: Path):
    """`moa run` records dvc.lock (dvc commit), so `dvc status` is clean and `dvc repro` runs nothing after it; a
    second `moa run` skips every stage and DVC still agrees."""
    import os
    import shutil
    import subprocess
    import sys

    from typer.testing import CliRunner

    from moa_cli.main import app

    root = _project(tmp_path / "proj", tiny_model_dir)
    for code in ("moa_core", "tasks"):  # dvc.yaml's code deps, hashed into dvc.lock
        shutil.copytree(ROOT / code, root / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in raw.pop("profiles")["quick"].items():  # dvc.yaml reads the plain values: no profile
        raw[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}

    def run(*cmd: str) -> str:
        p = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout + p.stderr

    def moa_run() -> str:
        # the `moa run` command in this process: a process of its own would add only its start-up (imports and
        # a Prefect server, ~10 s); tests/test_stopping.py runs `moa run` as a process, to the end
        r = CliRunner().invoke(app, ["run", "--params", str(root / "params.yaml")])
        assert r.exit_code == 0, f"{r.output[-3000:]}\n{r.exception!r}"
        return r.output

    dvc = str(bin_dir / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    first = moa_run()
    assert "dvc.lock records this run" in first, first[-3000:]
    assert json.loads(run(dvc, "status", "--json")) == {}
    second = moa_run()
    assert f"{len(ALL_STAGES)} of {len(ALL_STAGES)} stage runs unchanged, skipped" in " ".join(second.split()), second[-3000:]
    assert json.loads(run(dvc, "status", "--json")) == {}
    assert "Running stage" not in run(dvc, "repro")
