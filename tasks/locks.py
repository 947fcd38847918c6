"""Who may write at a time: one torch job per process, one writer per project."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

# Torch work of tasks that share one process runs one job at a time. Two trainings in two threads of one
# process produced a NaN loss on the second step here (each alone is finite), and on a 2-core machine
# they would only split the same cores anyway. Parallel training = separate processes (a work pool).
TORCH_LOCK = threading.Lock()


@contextlib.contextmanager
def project_lock(root: Path, holder: str, inheritable: bool = False) -> Iterator[None]:
    """One writer per project at a time: an exclusive lock on <root>/.moa.lock, held by a pipeline run,
    an onboarding run or a `moa stage` command for its whole duration. A second run waits (and says so)
    instead of interleaving its MLflow registration and DVC outputs with the first one's. The OS drops the
    lock when the holder dies, so a killed run never leaves a stale lock behind. `inheritable`: the lock
    survives an exec of this process (the torchrun launcher of `moa stage ... --nproc-per-node`)."""
    import fcntl
    import logging
    import time

    path = Path(root) / ".moa.lock"
    with open(path, "a+") as fh:
        if inheritable:
            os.set_inheritable(fh.fileno(), True)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _holder_of(fh)
            logging.getLogger("moa").warning("%s waits: %s holds %s", holder, other, path)
            print(f"moa: {holder} waits for {other} (lock {path})", flush=True)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            logging.getLogger("moa").warning("%s got the lock after %.1f s", holder, time.monotonic() - t0)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}: {holder}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _holder_of(fh) -> str:
    """Who holds the lock, as its holder wrote it ("pid N: name"). The holder writes that line just after it
    takes the lock, so a reader that comes in between sees an empty file: give it a moment before settling
    for an anonymous "another process"."""
    import time

    for _ in range(20):
        fh.seek(0)
        text = fh.read().strip()
        if text:
            return text
        time.sleep(0.025)
    return "another process"
