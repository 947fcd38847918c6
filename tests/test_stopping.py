"""Stopping a run: SIGTERM (kill, a Kubernetes pod's shutdown) and SIGINT (Ctrl-C) sent to `moa run` during
training end it within seconds at a step boundary, with a checkpoint the next `moa run` resumes, and leave no
process or port behind (the Prefect server the run started goes too). SIGINT goes to the whole process group, as
a terminal's Ctrl-C and coreutils `timeout` (infra/gpu/run_flow.sh) send it; SIGTERM reaches the process through
one of its other threads, which the kernel may pick for any signal sent to the process."""

from __future__ import annotations

import inspect
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


def _send(proc: Proc, sig: signal.Signals, to: str) -> None:
    if to == "group":  # Ctrl-C in a terminal, `timeout --signal=INT`: the Prefect server the run started gets it too
        os.killpg(proc.p.pid, sig)
        return
    assert to == "thread", to
    # kill() of a thread id other than the main one signals the whole process, but the kernel tries that thread
    # first: what it may do with any signal for the process (on the GPU, two of three runs never saw their SIGINT).
    # CPython runs signal handlers in the main thread only, which in a flow run sleeps in a lock until a job ends.
    def takes(tid: int) -> bool:  # the thread does not block the signal (jemalloc's background thread blocks all)
        status = Path(f"/proc/{proc.p.pid}/task/{tid}/status").read_text().splitlines()
        blocked = int(next(ln.split()[1] for ln in status if ln.startswith("SigBlk:")), 16)
        return not blocked >> (sig - 1) & 1

    others = [t for t in psutil.Process(proc.p.pid).threads() if t.id != proc.p.pid and takes(t.id)]
    assert others, "moa run should have threads besides the main one"
    os.kill(max(others, key=lambda t: t.user_time + t.system_time).id, sig)  # the busiest: the training thread


def _stop_during_training(root: Path, sig: signal.Signals, to: str) -> tuple[Proc, float]:
    """Start `moa run`, send `sig` once the expert trains (`to`: "group", the process group; "thread", the process
    through its busiest thread other than the main one); returns the process and the seconds from the signal to
    its exit. Asserts the exit code, the stop line, a quiet exit, the checkpoint and the clean-up."""
    proc = _start(root, root / f"run-{sig.name}.log")
    try:
        deadline = time.monotonic() + 420
        while "train_expert:code step" not in proc.tail(200_000):
            assert proc.p.poll() is None, f"moa run exited before training:\n{proc.tail()}"
            assert time.monotonic() < deadline, f"no training log line in time:\n{proc.tail()}"
            time.sleep(0.1)
        kids, ports = _descendants(proc)
        assert kids and ports, "the run should have started the Prefect API server (a child process on a port)"
        _send(proc, sig, to)
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
        # the Prefect server outlives the stop: no event or log retried against a dead API, nothing but the
        # stopped stages' end states at ERROR level
        assert "Unable to connect" not in log and "EventsWorker" not in log and "Traceback" not in log, log[-4000:]
        errors = [ln for ln in log.splitlines()
                  if "| ERROR" in ln and not ("Task run '" in ln and "Finished in state" in ln)]
        assert not errors, "\n".join(errors)[-4000:]
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
    _, took = _stop_during_training(root, signal.SIGTERM, to="thread")
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
def test_sigint_to_the_process_group_stops_training_at_a_step(tmp_path: Path, tiny_model_dir: Path):
    root = _project(tmp_path / "p", tiny_model_dir)
    _, took = _stop_during_training(root, signal.SIGINT, to="group")
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


_WATCHED = r"""
import os, threading
from moa_core import stopping

def say(line):  # one write per line: the threads print side by side
    os.write(1, (line + "\n").encode())

ready = threading.Event()

def job():  # polls the flag, as train_loop does once per step
    ready.set()
    while not stopping.stop_requested():
        sum(range(10_000))
    say("job stopped")

worker = threading.Thread(target=job)
idle = threading.Thread(target=threading.Event().wait, daemon=True)  # a thread the signals are sent through
with stopping.stop_on_signals(lambda sig: say(f"announced {sig.name}")):
    stopping.at_kill(lambda: say("at_kill ran"))
    idle.start()
    worker.start()
    ready.wait()
    say(str(idle.native_id))
    worker.join()  # the main thread asleep in a lock, as in a flow run waiting on its tasks
    say("joined")
    threading.Event().wait()  # until the second signal ends the process
"""


def test_a_signal_taken_by_another_thread_stops_the_jobs_and_a_later_repeat_kills(tmp_path: Path):
    """The stop reaches the jobs whichever thread the kernel gives the signal to, while the main thread sleeps in a
    lock (CPython would run a Python-level handler only once that lock is free: after the training); the repeat
    coreutils `timeout` sends at once is the same request; the same signal a second later ends the process at once
    (exit 130), after the at_kill hooks."""
    from procs import ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = Proc("stop_on_signals", [sys.executable, "-c", _WATCHED], tmp_path / "watched.log", env=env)

    def lines(n: int) -> list[str]:
        deadline = time.monotonic() + 30
        while len(out := proc.tail().splitlines()) < n:
            assert proc.p.poll() is None and time.monotonic() < deadline, f"{n} lines expected:\n{proc.tail()}"
            time.sleep(0.05)
        return out

    try:
        idle_tid = int(lines(1)[0])
        time.sleep(0.3)  # the main thread reaches its join
        os.kill(idle_tid, signal.SIGINT)  # to the process, but the kernel tries that thread first
        time.sleep(0.2)
        os.kill(idle_tid, signal.SIGINT)  # and again soon after, as `timeout` does (the process, then its group)
        assert sorted(lines(4)[1:]) == ["announced SIGINT", "job stopped", "joined"], proc.tail()
        time.sleep(1.2)
        assert proc.p.poll() is None, f"the repeat sent at once must not kill:\n{proc.tail()}"
        os.kill(proc.p.pid, signal.SIGINT)
        assert proc.p.wait(timeout=10) == 130, proc.tail()
        assert lines(5)[4] == "at_kill ran", proc.tail()
    finally:
        proc.stop()


def test_a_job_whose_turn_comes_after_a_stop_does_not_start():
    """After a stop request, the stages still waiting for their turn end at once (StopRequested, not retried)
    instead of loading the base model and training a step each before they notice it."""
    from flows import onboard
    from moa_core.stopping import StopRequested, clear_stop, request_stop
    from tasks.prefect_tasks import PIPELINE_STAGES, _retryable

    onboarding = [onboard.curate_new, onboard.train_new_expert, onboard.extend, onboard.evaluate, onboard.register]
    request_stop(signal.SIGINT)
    try:
        for stage in [*PIPELINE_STAGES.values(), *onboarding]:
            # no context: a job that started would fail on it with another error than StopRequested
            args = [None] * len(inspect.signature(stage.fn).parameters)
            with pytest.raises(StopRequested, match=f"{stage.name} not started") as caught:
                stage.fn(*args)

            class _State:  # what Prefect hands the retry condition: the failed state, re-raising on result()
                def result(self):
                    raise caught.value
            assert not _retryable(None, None, _State())
    finally:
        clear_stop()
