"""Helpers for tests that start real servers (Prefect server/worker, MLflow serve/UI): loopback ports, process
groups that are always killed, waiting on HTTP with the server's log in the failure message."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (a server that was stopped let it go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the closed connections' TIME_WAIT is no holder
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Proc:
    """A command in its own process group (session), output to a log file; `stop()` kills the whole group."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.name, self.cmd, self.log = name, cmd, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log, "wb")
        self.p = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        if self.p.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children that outlived the leader (uvicorn workers, flow-run subprocesses)
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._fh.close()

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every TCP socket in LISTEN state held by this process or its descendants."""
        import psutil

        try:
            root = psutil.Process(self.p.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return set()
        out = set()
        for pr in procs:
            try:
                conns = pr.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            out |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
        return out


def wait_http(proc: Proc, url: str, timeout: float, expect: int = 200) -> httpx.Response:
    """Poll `url` until it answers `expect`; fail with the server's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            pytest.fail(f"{proc.name} exited with {proc.p.returncode} before {url} answered; "
                        f"command {proc.cmd}; log {proc.log}:\n{proc.tail()}")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == expect:
                return r
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer {expect} within {timeout:.0f}s ({last}); {proc.name} log {proc.log}:\n{proc.tail()}")


@pytest.fixture
def spawn(request: pytest.FixtureRequest):
    """spawn(name, cmd, log, env=..., cwd=...) -> Proc; every process is killed at teardown (last started first)."""
    started: list[Proc] = []

    def _spawn(*args, **kw) -> Proc:
        p = Proc(*args, **kw)
        started.append(p)
        return p

    yield _spawn
    for p in reversed(started):
        p.stop(grace=3.0)  # teardown, nothing left to check: a Prefect worker can take 10 s+ to honour SIGTERM
