"""Stopping a run: SIGTERM (kill, a Kubernetes pod's shutdown) and SIGINT (Ctrl-C) sent to `moa run` during
training end it within seconds at a step boundary, with a checkpoint the next `moa run` resumes, and leave no
process or port behind (the Prefect server the run started goes too)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import tiny_raw_params
from procs import Proc, port_free

EXPERT_STEPS = 400
CKPT = "models/checkpoints/expert-code/checkpoint.pt"


def _project(root: Path, tiny_model_dir: Path) -> Path:
    raw = tiny_raw_params(tiny_model_dir)
    raw["domains"] = {"code": raw["domains"]["code"]}
    quick = raw["profiles"]["quick"]
    quick["curate"] = {"max_rows": 30}
    # long enough that the signal lands mid-training; no periodic checkpoint: the one found is the stop's
    quick["train"].update({"expert_steps": EXPERT_STEPS, "joint_steps": 2, "checkpoint_every": 100_000,
                           "log_every": 5, "batch_size": 2, "max_length": 64})
    quick["evaluate"] = {"max_samples": 2, "max_new_tokens": 4, "baselines": [], "compare_methods": []}
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def _start(root: Path, log: Path) -> Proc:
    exe = Path(sys.executable).parent / "moa"
    return Proc("moa run", [str(exe), "run", "--profile", "quick", "--params", str(root / "params.yaml")], log,
                env=os.environ.copy(), cwd=root)


def _descendants(proc: Proc) -> tuple[list[psutil.Process], set[int]]:
    root = psutil.Process(proc.p.pid)
    kids = root.children(recursive=True)
    ports = set()
    for pr in [root, *kids]:
        try:
            ports |= {c.laddr.port for c in pr.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return kids, ports


def _stop_during_training(root: Path, sig: signal.Signals) -> tuple[Proc, float]:
    """Start `moa run`, send `sig` to its process (not its group) once the expert trains; returns the process
    and the seconds from the signal to its exit. Asserts the exit code, the checkpoint and the clean-up."""
    proc = _start(root, root / f"run-{sig.name}.log")
    try:
        deadline = time.monotonic() + 420
        while "train_expert:code step" not in proc.tail(200_000):
            assert proc.p.poll() is None, f"moa run exited before training:\n{proc.tail()}"
            assert time.monotonic() < deadline, f"no training log line in time:\n{proc.tail()}"
            time.sleep(0.1)
        kids, ports = _descendants(proc)
        assert kids and ports, "the run should have started the Prefect API server (a child process on a port)"
        os.kill(proc.p.pid, sig)
        t0 = time.monotonic()
        try:
            rc = proc.p.wait(timeout=60)
        except Exception:
            pytest.fail(f"moa run did not exit within 60 s of {sig.name}:\n{proc.tail()}")
        took = time.monotonic() - t0
        log = proc.tail(200_000)
        assert rc == 128 + sig, f"exit code {rc}, expected {128 + sig}:\n{log[-4000:]}"
        assert f"stop requested ({sig.name})" in log, log[-4000:]
        assert "re-run `moa run --profile quick` to resume" in log, log[-4000:]
        import torch

        state = torch.load(root / CKPT, map_location="cpu", weights_only=True)
        assert 0 < state["step"] < EXPERT_STEPS, state["step"]
        assert not (root / "models/experts/code/adapter_model.safetensors").exists()
        gone, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"processes left behind after {sig.name}: {[p.cmdline() for p in alive]}"
        assert all(port_free(p) for p in ports), f"ports still taken after {sig.name}: {ports}"
        return proc, took
    finally:
        proc.stop()


@pytest.mark.slow
def test_sigterm_stops_training_at_a_step_and_the_next_run_resumes(tmp_path: Path, tiny_model_dir: Path):
    root = _project(tmp_path / "p", tiny_model_dir)
    _, took = _stop_during_training(root, signal.SIGTERM)
    assert took < 20, f"the stop took {took:.1f} s"  # a few seconds: one step plus the clean exit
    step = torch_step(root)

    again = _start(root, root / "resume.log")
    try:
        assert again.p.wait(timeout=600) == 0, again.tail()
    finally:
        again.stop()
    # the whole run's output, read as a user would: the table once, no warning spam, no raw colour codes
    out = again.tail(1_000_000)
    header = next(ln for ln in (root / "reports/eval.md").read_text().splitlines() if ln.startswith("| System |"))
    assert out.count(header + " Train time (s) |") == 1, out  # printed with the wall-clock column eval.md leaves out
    assert "\x1b[" not in out and "is_gradient_checkpointing" not in out and "input example" not in out, out
    assert "Downloading artifacts" not in out, out
    summary = json.loads((root / "metrics/train_expert_code.json").read_text())
    run_facts = json.loads((root / "metrics/timings/train_expert_code.json").read_text())  # untracked by DVC
    assert run_facts["resumed_from"] == step, (run_facts, step)
    assert summary["steps"] == EXPERT_STEPS
    assert (root / "models/experts/code/adapter_model.safetensors").exists()
    assert json.loads((root / "metrics/registered.json").read_text())["version"]


@pytest.mark.slow
def test_sigint_stops_training_at_a_step(tmp_path: Path, tiny_model_dir: Path):
    root = _project(tmp_path / "p", tiny_model_dir)
    _, took = _stop_during_training(root, signal.SIGINT)
    assert took < 20, f"the stop took {took:.1f} s"


def torch_step(root: Path) -> int:
    import torch

    return int(torch.load(root / CKPT, map_location="cpu", weights_only=True)["step"])


def test_evaluation_stops_between_batches_not_only_between_domains(tiny_base, tiny_tok, tiny_cfg):
    """Every test row of a large domain takes minutes on a GPU: a stop asked for inside a domain ends the
    evaluation at its next batch, not after the whole domain (the run would be killed before that)."""
    from conftest import toy_records
    from moa_core.evaluate import evaluate_system
    from moa_core.methods import build_mixture
    from moa_core.stopping import StopRequested, clear_stop, request_stop

    mm = build_mixture(tiny_cfg, "moa", tiny_base, "tiny")
    test = {name: recs for name, recs in zip(tiny_cfg.domain_names, toy_records(len(tiny_cfg.domain_names), 4))}
    first = next(iter(test))
    cfg = tiny_cfg.model_copy(update={"evaluate": tiny_cfg.evaluate.model_copy(update={"batch_size": 1})})
    try:  # the stop arrives once the first domain has begun
        with pytest.raises(StopRequested, match=f"in domain '{first}'"):
            evaluate_system(mm, tiny_tok, test, cfg, 0, progress=lambda name: request_stop())
    finally:
        clear_stop()
