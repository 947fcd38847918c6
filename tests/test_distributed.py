"""Data-parallel training with torch DDP under torchrun (gloo on this CPU machine; NCCL on GPUs):
two processes, each on half of every batch, reproduce the one-process loss curve and weights, and the
`moa stage ... --nproc-per-node 2` command trains and saves through rank 0 only."""

from __future__ import annotations

import fcntl
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import ROOT, tiny_raw_params
from helpers import curate_in_process
from moa_cli.main import app
from moa_core.distributed import DataParallel


def _torchrun(nproc: int, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_ddp_processes_reproduce_one_process(tmp_path: Path, tiny_model_dir: Path):
    import ddp_worker

    # One process is the worker run alone, here: under torchrun with one process (WORLD_SIZE=1) it takes the same
    # no-DDP path (moa_core.ranks), so a launcher and a worker process would add only their start-up.
    threads = torch.get_num_threads()
    try:
        ddp_worker.main(tiny_model_dir, tmp_path / "world1")
    finally:
        torch.set_num_threads(threads)  # the worker pins one thread, as each DDP rank does
    proc = _torchrun(2, str(ROOT / "tests/ddp_worker.py"), str(tiny_model_dir), str(tmp_path / "world2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for recipe in ("peft", "moa"):
        one, two = (json.loads((tmp_path / f"world{n}/{recipe}/history.json").read_text()) for n in (1, 2))
        assert (one["world_size"], two["world_size"]) == (1, 2)
        assert one["tokens"] == two["tokens"], "both saw the same global batches"
        curve1, curve2 = [h["loss"] for h in one["history"]], [h["loss"] for h in two["history"]]
        assert len(curve1) == len(curve2) == 6
        assert curve1[-1] < curve1[0], f"{recipe} did not learn: {curve1}"
        assert curve2 == pytest.approx(curve1, rel=1e-5), recipe
        w1, w2 = (load_file(tmp_path / f"world{n}/{recipe}/params.safetensors") for n in (1, 2))
        assert set(w1) == set(w2) and w1
        for name in w1:  # AdamW's early steps amplify float-order noise of tiny gradients, hence 1e-4
            torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4, msg=f"{recipe} {name}")


def test_batch_rows_are_split_between_ranks_and_must_divide():
    batch = {"input_ids": torch.arange(12).view(4, 3), "expert": torch.tensor([0, 1, 0, 1])}
    r0 = DataParallel(rank=0, world_size=2, local_rank=0, device=torch.device("cpu")).shard(batch)
    r1 = DataParallel(rank=1, world_size=2, local_rank=1, device=torch.device("cpu")).shard(batch)
    assert r0["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8]] and r1["expert"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="multiple of 3"):
        DataParallel(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")).shard(batch)


@pytest.mark.slow
def test_moa_stage_trains_an_expert_over_two_processes(tmp_path: Path, tiny_model_dir: Path):
    raw = tiny_raw_params(tiny_model_dir)
    raw["domains"] = {"code": raw["domains"]["code"]}
    raw["curate"]["max_rows"] = 30
    raw["train"].update({"expert_steps": 4, "batch_size": 2, "max_length": 64})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def moa(*args: str) -> subprocess.Popen:
        return subprocess.Popen([str(Path(sys.executable).parent / "moa"), "stage", *args, "--params",
                                 str(tmp_path / "params.yaml")], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    curate_in_process(tmp_path / "params.yaml", "code")  # set-up only: the stage under test is train-expert
    # refused before torchrun starts: in this process (the run below covers the command as a process of its own)
    moa_log = logging.getLogger("moa")
    kept = (list(moa_log.handlers), moa_log.level, moa_log.propagate)
    try:
        odd = CliRunner().invoke(app, ["stage", "train-expert", "code", "--nproc-per-node", "3",
                                       "--params", str(tmp_path / "params.yaml")])
    finally:  # `moa stage` gives the `moa` logger a handler on CliRunner's stderr, closed after invoke
        moa_log.handlers[:], moa_log.level, moa_log.propagate = kept
    err = " ".join(odd.stderr.split())  # rich wraps long lines
    assert odd.exit_code == 2 and "train.batch_size=2 does not split over 3 processes" in err, odd.output

    job = moa("train-expert", "code", "--nproc-per-node", "2")
    lock = tmp_path / ".moa.lock"
    deadline = time.monotonic() + 120
    while "torchrun" not in (lock.read_text() if lock.exists() else "") and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with open(lock) as fh:  # the torchrun group holds the project lock while it trains
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, out + err
    assert "torchrun: 2 processes" in err
    summary = json.loads((tmp_path / "metrics/train_expert_code.json").read_text())
    assert summary["ddp_world_size"] == 2 and summary["steps"] == 4, summary
    assert (tmp_path / "models/experts/code/adapter_model.safetensors").exists()
    assert err.count('"ddp_world_size": 2') == 1, "rank 0 alone prints the result"
