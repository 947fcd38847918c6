"""Process-level faults: a training job killed with SIGKILL resumes from its checkpoint; two runs of one
project take turns on the project lock instead of interleaving their writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_raw_params
from helpers import curate_in_process


def _moa(root: Path, *args: str, **kw) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "moa"
    return subprocess.Popen([str(exe), *args, "--params", str(root / "params.yaml")], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes(tmp_path: Path, tiny_model_dir: Path):
    raw = tiny_raw_params(tiny_model_dir)
    raw["domains"] = {"code": raw["domains"]["code"]}
    raw["curate"]["max_rows"] = 30
    raw["train"].update({"expert_steps": 40, "checkpoint_every": 1, "batch_size": 2, "max_length": 64})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    curate_in_process(tmp_path / "params.yaml", "code")  # set-up only: the stage under test is train-expert

    ckpt = tmp_path / "models/checkpoints/expert-code/checkpoint.pt"
    job = _moa(tmp_path, "stage", "train-expert", "code")
    deadline = time.monotonic() + 300
    while not ckpt.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a few more steps, so the kill lands mid-run, possibly mid-write of the next checkpoint
    assert job.poll() is None, f"training finished before it could be killed:\n{job.stdout.read()}"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL
    assert not (tmp_path / "models/experts/code/adapter_model.safetensors").exists()
    assert ckpt.exists(), "the last complete checkpoint survives the kill"

    again = _moa(tmp_path, "stage", "train-expert", "code")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    # a stage run alone (as DVC runs it) shows its progress instead of nothing for minutes
    assert "train_expert:code step 40/40 loss" in out, out
    summary = json.loads((tmp_path / "metrics/train_expert_code.json").read_text())
    run_facts = json.loads((tmp_path / "metrics/timings/train_expert_code.json").read_text())  # untracked by DVC
    assert 0 < run_facts["resumed_from"] < 40, run_facts
    assert summary["steps"] == 40
    assert (tmp_path / "models/experts/code/adapter_model.safetensors").exists()
    assert not ckpt.parent.exists(), "the checkpoint is removed once the adapter is saved"


def test_two_runs_of_one_project_take_turns(tmp_path: Path):
    """Two processes that each hold the project lock for a while: their intervals never overlap, and the
    second one says whom it waited for."""
    script = textwrap.dedent(f"""
        import sys, time, json
        sys.path.insert(0, {str(ROOT)!r})
        from tasks.common import project_lock
        with project_lock(__import__("pathlib").Path({str(tmp_path)!r}), sys.argv[1]):
            t0 = time.time(); time.sleep(1.5); t1 = time.time()
        print(json.dumps([t0, t1]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, f"run-{i}"], stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    spans = sorted(json.loads(o.strip().splitlines()[-1]) for o in outs)
    assert spans[0][1] <= spans[1][0], f"the two runs overlapped: {spans}"
    assert sum("waits for pid" in o for o in outs) == 1, outs
    assert (tmp_path / ".moa.lock").read_text() == "", "the lock file is emptied when released"


def test_a_waiter_that_comes_before_the_holder_has_written_its_name_still_names_it(tmp_path: Path):
    """The holder writes "pid N: name" just after it takes the lock; a waiter that reads in between used to
    report "another process" (CI saw it once). It now waits a moment for the name."""
    import fcntl
    import threading

    from tasks.locks import _holder_of

    path = tmp_path / ".moa.lock"
    with open(path, "a+") as holder, open(path, "a+") as waiter:
        fcntl.flock(holder, fcntl.LOCK_EX)  # taken, nothing written yet

        def write_late() -> None:
            time.sleep(0.1)
            holder.write("pid 123: late\n")
            holder.flush()

        writer = threading.Thread(target=write_late)
        writer.start()
        try:
            seen = _holder_of(waiter)
        finally:
            writer.join()
        assert seen == "pid 123: late"
