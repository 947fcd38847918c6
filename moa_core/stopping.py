"""A process-wide stop request: SIGINT/SIGTERM (Ctrl-C, `kill`, a Kubernetes pod's shutdown) ask the running
job to stop at its next step boundary instead of killing it mid-step or waiting for hours of training.

The signal only sets a flag (`request_stop`); `train_loop` polls it once per step, writes a checkpoint and raises
`StopRequested`, which ends the stage, the flow run and the command; the next run resumes from the checkpoint.
Evaluation polls it before every batch. Stdlib only, like the rest of `moa_core`'s plumbing.

The flag is set by a thread that reads the signals from Python's wakeup fd, not by the Python-level handler: the
kernel may hand a signal for the process to any of its threads, and CPython runs Python-level handlers only in the
main thread, at its next bytecode; in a flow run the main thread sleeps in a lock until a job ends, so a signal
that landed on another thread was seen only when training was over (two of three GPU runs ignored their SIGINT).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
# coreutils `timeout` (infra/gpu/run_flow.sh) sends its signal to the command and then to its process group, so the
# command gets it twice at once: a repeat this soon after the first is the same request, not the one that kills
REPEAT_AFTER_S = 1.0

_requested = threading.Event()
_signal: signal.Signals | None = None
_lock = threading.Lock()
_first_seen: dict[int, float] = {}  # signal number -> when it first arrived (monotonic), since the last clear_stop
_at_kill: list[Callable[[], None]] = []


class StopRequested(Exception):
    """A stop was requested (a signal): the job stopped at a step boundary; re-running resumes it.
    An Exception, not a BaseException: the orchestrator must see it as this job's end, not as its own crash."""


def request_stop(sig: int | None = None) -> None:
    global _signal
    if sig is not None and _signal is None:
        _signal = signal.Signals(sig)
    _requested.set()


def stop_requested() -> bool:
    return _requested.is_set()


def stop_signal() -> signal.Signals | None:
    """The signal that asked for the stop (None: none did, or it was requested in code)."""
    return _signal


def clear_stop() -> None:
    """Forget a stop request (tests, and a long-lived process that starts a new job after one stopped)."""
    global _signal
    with _lock:
        _requested.clear()
        _signal = None
        _first_seen.clear()


def at_kill(hook: Callable[[], None]) -> None:
    """Run `hook` (quickly, best effort) before a repeated signal ends the process at once: atexit does not run
    then, so e.g. a server this process started and shielded from its process group's signals is stopped here."""
    _at_kill.append(hook)


def raise_if_stop_requested(where: str) -> None:
    if _requested.is_set():
        raise StopRequested(f"stop requested ({_name()}): {where}")


def exit_code() -> int:
    """The shell's convention for a command ended by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(_signal or signal.SIGINT)


def _name() -> str:
    return _signal.name if _signal is not None else "requested"


@contextlib.contextmanager
def stop_on_signals(announce: Callable[[signal.Signals], None] | None = None) -> Iterator[None]:
    """While inside: the first SIGINT/SIGTERM requests a stop (and calls `announce` once, in this block's context, e.g.
    a flow run's logger); the same signal again, REPEAT_AFTER_S or more later, ends the process at once (exit
    128 + its number, after the `at_kill` hooks), for when the step boundary is too far away. Whatever thread the
    kernel delivers a signal to, a watcher thread acts on it at once (module docstring). The previous handlers and
    wakeup fd come back on exit. Outside the main thread signals cannot be handled: this does nothing there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    context = contextvars.copy_context()

    def on_signal(signum: int) -> None:
        with _lock:
            now = time.monotonic()
            first = not _requested.is_set()
            request_stop(signum)
            repeated = now - _first_seen.setdefault(signum, now) >= REPEAT_AFTER_S
        if repeated:
            _kill_now(signum)
        elif first and announce is not None:
            context.run(announce, signal.Signals(signum))

    reader, writer = socket.socketpair()  # a socket: what set_wakeup_fd takes on every platform
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    # a Python-level handler makes CPython's C handler run (and write the signal's number to the wakeup fd) in
    # whichever thread gets the signal; it replaces any inherited disposition (SIG_IGN in a background job too)
    previous = {s: signal.signal(s, _noted) for s in STOP_SIGNALS}
    watcher = threading.Thread(target=_watch, args=(reader, previous_fd, on_signal), name="moa-stop-signals",
                               daemon=True)
    watcher.start()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(previous_fd)
        writer.close()  # the watcher reads the end of the stream and returns
        watcher.join(timeout=5)


def _noted(_signum: int, _frame: object) -> None:
    """The Python-level handler: nothing to do here, the watcher thread acts on the signal (stop_on_signals)."""


def _watch(reader: socket.socket, forward_fd: int, on_signal: Callable[[int], None]) -> None:
    """Act on each stop signal written to the wakeup fd; pass the other signals' bytes on to the previous one."""
    with reader:
        while data := reader.recv(512):
            for signum in data:
                if signum not in STOP_SIGNALS:
                    if forward_fd != -1:
                        with contextlib.suppress(OSError):
                            os.write(forward_fd, bytes([signum]))
                    continue
                try:
                    on_signal(signum)
                except Exception as exc:  # noqa: BLE001 - the watcher must outlive a failing announcement
                    print(f"moa: stop on {signal.Signals(signum).name}: {exc!r}", file=sys.stderr, flush=True)


def _kill_now(signum: int) -> None:
    """End the process at once (no atexit, no interpreter shutdown): the user asked for it with a second signal."""
    for hook in reversed(_at_kill):
        with contextlib.suppress(Exception):
            hook()
    with contextlib.suppress(Exception):
        print(f"moa: {signal.Signals(signum).name} again: killed", file=sys.stderr, flush=True)
        sys.stdout.flush()
    os._exit(128 + signum)
