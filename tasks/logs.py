"""Where a stage's progress lines go: the Prefect run's log (the UI shows it), or the `moa` logger outside a run."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import StageContext


def _run_logger():
    """The Prefect task/flow run's logger, or None outside a run."""
    import sys

    # Only a process that has imported Prefect can be inside one of its runs. Importing it just to find out cost
    # ~0.9 s at the start of every `moa stage` process (each DVC stage is one) that never runs a flow.
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - no active run context
        return None


def stage_logger():
    """The Prefect task/flow run's logger (its lines show in the Prefect UI), or outside a run (a DVC stage,
    a test) the standard `moa` logger."""
    import logging

    return _run_logger() or logging.getLogger("moa")


def progress(name: str, total: int):
    """An `on_log` callback for training loops: `name step 10/40 loss 2.31 ...` in the Prefect task's
    log (visible in the Prefect UI) or, outside a task run, on the standard logger."""
    log = stage_logger()

    def on_log(step: int, entry: dict[str, float]) -> None:
        if "val_loss" in entry:  # an early-stopping evaluation
            log.info("%s step %d/%d validation loss %.4f (best at step %d)", name, step, total, entry["val_loss"],
                     int(entry.get("best_step", 0)))
            return
        extra = " ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("step", "loss") and isinstance(v, float))
        log.info("%s step %d/%d loss %.4f %s", name, step, total, entry["loss"], extra)

    return on_log


def announce_stop(ctx: StageContext, rerun: str):
    """moa_core.stopping's `announce` callback: one line on stderr (and in the run's log) when a signal asks
    the running jobs to stop at their next step boundary."""
    import signal
    import sys

    def announce(sig: signal.Signals) -> None:
        line = (f"stop requested ({sig.name}): finishing the current step; the checkpoint goes under "
                f"{ctx.layout.checkpoints}; re-run `{rerun}` to resume (send the signal again to kill at once)")
        log = _run_logger()
        if log is not None:  # inside a flow run: its logger prints the line and keeps it in the Prefect UI
            try:
                log.warning(line)
                return
            except Exception:  # noqa: BLE001 - the log fails: plain stderr below; never a crash here
                pass
        print(f"moa: {line}", file=sys.stderr, flush=True)

    return announce


# Torch work of tasks that share one process runs one job at a time. Two trainings in two threads of one
