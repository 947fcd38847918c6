"""A process-wide stop request: SIGINT/SIGTERM (Ctrl-C, `kill`, a Kubernetes pod's shutdown) ask the running
job to stop at its next step boundary instead of killing it mid-step or waiting for hours of training.

The signal handler only sets a flag (`request_stop`); `train_loop` polls it once per step, writes a checkpoint
and raises `StopRequested`, which ends the stage, the flow run and the command; the next run resumes from the
checkpoint. Evaluation polls it before every batch. Stdlib only, like the rest of `moa_core`'s plumbing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

_requested = threading.Event()
_signal: signal.Signals | None = None


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
    _requested.clear()
    _signal = None


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
    """While inside: the first SIGINT/SIGTERM requests a stop (and calls `announce` once); a second one of the
    same kind kills the process the default way, for when the step boundary is too far away. The previous
    handlers come back on exit. Outside the main thread signals cannot be handled: this does nothing there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        first = not _requested.is_set()
        request_stop(signum)
        signal.signal(signum, signal.SIG_DFL)  # the next one of this kind is not caught
        if first and announce is not None:
            announce(signal.Signals(signum))

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
