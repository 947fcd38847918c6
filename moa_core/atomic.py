"""Atomic writes: the one way artifacts, metrics and params.yaml are written. The content goes into a
temporary sibling of the target, then `os.replace` puts it in place, so a reader (DVC, MLflow, a concurrent
stage) or a crash sees the old version or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _sibling(path: Path) -> Path:
    """A temporary name beside `path`, unique per process and call (hidden, so no glob picks it up)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` writes the file's content at `tmp`; it is flushed to disk, then replaces `path`. On an
    error nothing changes at `path` and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """`obj` as indented JSON with sorted keys (the metrics files' format: stable bytes for DVC)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default))


def atomic_dir_write(target: str | Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills the empty directory `tmp`, which then replaces `target` (an old `target` is moved
    aside first and removed after), so a crash never leaves a half-written directory at `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target
