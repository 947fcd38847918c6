"""Where this process stands in a torchrun group, from the environment alone. Apart from moa_core.distributed
(which re-exports them) because that module imports torch, ~2 s at start-up, and the CLI asks these in every
stage process, also in those that never load torch (moa stage curate)."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun group, or a process running alone (before the group is joined, from the env)."""
    return int(os.environ.get("RANK", "0")) == 0
