"""The gpu profile's shape on the tiny model through the real flow: several training seeds, early stopping on
the validation split, every test row evaluated, intervals pooled over seeds, the first seed registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import tiny_raw_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory, tiny_model_dir: Path):
    from flows.pipeline import moa_pipeline

    root = tmp_path_factory.mktemp("seeds")
    raw = tiny_raw_params(tiny_model_dir)
    # two domains: what is checked (per-seed folders, early stopping, every test row, pooling) is per domain
    raw["domains"] = {k: raw["domains"][k] for k in ("code", "finance")}
    gpu = dict(raw["profiles"]["gpu"])
    # the gpu profile's keys, at a CPU budget: 2 seeds, early stopping, every test row
    gpu["curate"] = {"max_rows": 40}
    gpu["train"] = {**gpu["train"], "precision": "bf16", "batch_size": 4, "max_length": 64, "epochs": 1.0,
                    "eval_every": 2, "patience": 2, "val_rows": 4, "seeds": [3, 4], "lr": 0.001, "joint_lr": 0.0005}
    gpu["evaluate"] = {**gpu["evaluate"], "max_new_tokens": 4, "batch_size": 16, "bootstrap": 200}
    raw["profiles"]["seeds"] = gpu
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root, moa_pipeline(params=str(root / "params.yaml"), profile="seeds")


def test_each_seed_trains_and_evaluates_in_its_own_folders(seeds_run):
    root, result = seeds_run
    for seed in (3, 4):
        assert (root / f"models/seed-{seed}/mixture/moa/mixture.safetensors").exists()
        assert (root / f"models/seed-{seed}/experts/code/adapter_model.safetensors").exists()
        ev = json.loads((root / f"metrics/seed-{seed}/eval.json").read_text())
        assert set(ev) >= {"base", "single-lora", "lora-mixed", "moa"}
        expert = json.loads((root / f"metrics/seed-{seed}/train_expert_code.json").read_text())
        assert 0 <= expert["best_step"] <= expert["steps_run"] <= expert["steps"]  # early stopping ran
        rows = json.loads((root / f"metrics/seed-{seed}/eval_rows.json").read_text())
        test_rows = sum(1 for _ in (root / "data/curated/finance/test.jsonl").open())
        assert len(rows["moa"]["finance"]["rougeL"]) == test_rows  # max_samples 0: every test row generated
    # incremental retraining keeps one record per seed (the seed is part of each fingerprint); curation is shared
    assert (root / ".moa/stages/curate.code.json").exists() and not (root / ".moa/stages/train_expert.code.json").exists()
    for seed in (3, 4):
        record = json.loads((root / f".moa/stages/seed-{seed}/train_expert.code.json").read_text())
        assert f"models/seed-{seed}/experts/code" in record["outputs"]
    fingerprints = {json.loads((root / f".moa/stages/seed-{s}/train_expert.code.json").read_text())["fingerprint"]
                    for s in (3, 4)}
    assert len(fingerprints) == 2
    # the two seeds trained differently
    a, b = (json.loads((root / f"metrics/seed-{s}/eval.json").read_text())["moa"]["avg_ppl"] for s in (3, 4))
    assert a != b


def test_intervals_pool_the_seeds_and_compare_paired(seeds_run):
    root, result = seeds_run
    comp = json.loads((root / "metrics/eval_intervals.json").read_text())
    assert comp["seeds"] == 2 and comp["reference"] == "moa"
    moa = comp["systems"]["moa"]
    avg = moa["ppl"]["avg"]
    assert len(avg["per_seed"]) == 2
    assert avg["value"] == pytest.approx(sum(avg["per_seed"]) / 2)
    assert avg["low"] <= avg["value"] <= avg["high"]
    assert comp["systems"]["lora-mixed"]["vs_reference"]["ppl"]["verdict"] in ("ahead", "behind", "within noise")
    assert "moa − this" in (root / "reports/eval_intervals.md").read_text()
    assert result["registered"]["version"] == "1"


def test_mlflow_has_per_seed_and_pooled_runs(seeds_run):
    import mlflow
    from mlflow import MlflowClient

    root, result = seeds_run
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns/mlflow.db'}")
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=200)
    names = {r.info.run_name for r in children}
    assert {"evaluate [seed 3]", "evaluate [seed 4]", "train_expert:code [seed 3]", "intervals"} <= names
    pooled = next(r for r in children if r.info.run_name == "intervals")
    assert pooled.data.metrics["moa.avg_ppl_low"] <= pooled.data.metrics["moa.avg_ppl"] <= pooled.data.metrics["moa.avg_ppl_high"]
    expert = next(r for r in children if r.info.run_name == "train_expert:code [seed 3]")
    assert client.get_metric_history(expert.info.run_id, "val/val_loss")


GPU_SCRIPTS = Path(__file__).parents[1] / "infra" / "gpu"


def _seed_copies(root: Path, tmp_path: Path) -> list[str]:
    """Per-seed project copies holding only metrics/eval_rows.json, as `run_flow.sh seeds` leaves them."""
    import shutil

    dirs = []
    for seed in (3, 4):
        d = tmp_path / f"seed-{seed}" / "metrics"
        d.mkdir(parents=True)
        shutil.copyfile(root / f"metrics/seed-{seed}/eval_rows.json", d / "eval_rows.json")
        dirs.append(str(d.parent))
    return dirs


def _gpu_script(name: str):
    """infra/gpu/<name>.py as a module, to call its main() in this process: a second process would only repeat
    the imports the seeds run already went through."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, GPU_SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_run_apart_pool_to_the_same_intervals(seeds_run, tmp_path, monkeypatch, capsys):
    """infra/gpu/pool_seeds.py (seeds trained in separate project copies) gives what one several-seed flow gives."""
    import shutil
    import subprocess
    import sys

    root, _ = seeds_run
    dirs = _seed_copies(root, tmp_path)
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    shutil.copyfile(root / "params.yaml", pooled / "params.yaml")
    out = subprocess.run([sys.executable, str(GPU_SCRIPTS / "pool_seeds.py"), "--profile", "seeds",
                          "--params", str(pooled / "params.yaml"), *dirs], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    mine = json.loads((pooled / "metrics/eval_intervals.json").read_text())["systems"]
    flows = json.loads((root / "metrics/eval_intervals.json").read_text())["systems"]
    assert mine == flows
    # a seed folder without its evaluation: exit status 2 and why
    pool_seeds = _gpu_script("pool_seeds")
    monkeypatch.setattr(sys, "argv", ["pool_seeds.py", "--params", str(pooled / "params.yaml"), str(tmp_path / "seed-9")])
    assert pool_seeds.main() == 2
    assert "did not finish its evaluation" in capsys.readouterr().err


def test_paired_across_runs_equals_the_flows_paired_verdict(seeds_run, tmp_path, capsys):
    """infra/gpu/paired.py (two systems from project copies, e.g. two profiles) gives the average paired
    difference the flow's intervals stage gives for the same systems and seeds; a system against itself is 0."""
    root, _ = seeds_run
    dirs = _seed_copies(root, tmp_path)
    both = ",".join(dirs)
    paired = _gpu_script("paired")

    def avg_row(a: str, b: str) -> list[str]:
        assert paired.main(["--bootstrap", "200", f"{both}:{a}", f"{both}:{b}"]) == 0
        out = capsys.readouterr().out
        return [c.strip() for c in next(ln for ln in out.splitlines() if ln.startswith("| avg |")).split("|")[2:-1]]

    flows = json.loads((root / "metrics/eval_intervals.json").read_text())["systems"]["lora-mixed"]["vs_reference"]
    for cell, metric in zip(avg_row("moa", "lora-mixed"), ("ppl", "bleu", "rougeL")):
        d = flows[metric]
        assert cell == f"{d['value']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {d['verdict']}", (metric, cell, d)
    assert avg_row("moa", "moa") == ["+0.00 [+0.00, +0.00] within noise"] * 3


def test_mixed_probe_compares_like_paired(seeds_run, tmp_path, capsys):
    """bench/mixed_sampling_probe.py compare: a probe holding the flow's own lora-mixed rows gives the PPL
    difference paired.py gives for moa against lora-mixed; probe rows of another test split are refused."""
    import importlib.util

    root, _ = seeds_run
    dirs = _seed_copies(root, tmp_path)
    probes = []
    for d in dirs:
        rows = json.loads((Path(d) / "metrics/eval_rows.json").read_text())["lora-mixed"]
        probe = Path(d + "-probe") / "metrics"
        probe.mkdir(parents=True)
        (probe / "mixed_probe.json").write_text(json.dumps(
            {"rows": {dom: {"nll": r["nll"], "tokens": r["tokens"]} for dom, r in rows.items()}}))
        probes.append(str(probe.parent))
    spec = importlib.util.spec_from_file_location("probe", Path(__file__).parents[1] / "bench" / "mixed_sampling_probe.py")
    probe_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe_mod)
    assert probe_mod.main(["compare", ",".join(probes), f"{','.join(dirs)}:moa", "--bootstrap", "200"]) == 0
    mine = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| avg |")).split("|")[2].strip()
    assert _gpu_script("paired").main(["--bootstrap", "200", f"{','.join(dirs)}:moa", f"{','.join(dirs)}:lora-mixed"]) == 0
    theirs = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| avg |")).split("|")[2].strip()
    assert mine == theirs
    short = Path(probes[0]) / "metrics/mixed_probe.json"
    data = json.loads(short.read_text())
    first = next(iter(data["rows"]))
    data["rows"][first] = {k: v[:-1] for k, v in data["rows"][first].items()}
    short.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="different test rows"):
        probe_mod.main(["compare", ",".join(probes), f"{','.join(dirs)}:moa"])
