"""What every stage is given: the validated config, where artifacts live, the MLflow parent run, the seed; the
training stages' metrics files and their checkpoint fingerprint."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_core.atomic import atomic_write_json
from moa_core.config import MoAConfig, load_config
from moa_core.data import Record, read_records
from moa_core.incremental import merge_timings, split_timings
from moa_core.layout import Layout


@dataclass(frozen=True)
class StageContext:
    """Passed to every stage: config validated once, the artifact layout, and the parent MLflow run."""

    cfg: MoAConfig
    root: Path
    parent_run_id: str | None = None
    flow_run_id: str | None = None
    seed: int | None = None  # set for each seed of a run over several training seeds (train.seeds)
    # The pipeline flow skips a stage whose inputs did not change since its last successful run (tasks/incremental.py);
    # `moa run --force` and `moa stage` (DVC decides there) run every stage they are asked to.
    skip_unchanged: bool = False

    @classmethod
    def load(cls, params: str | Path = "params.yaml", profile: str | None = None, **kw: Any) -> "StageContext":
        path = Path(params).resolve()
        return cls(cfg=load_config(path, profile), root=path.parent, **kw)

    @property
    def layout(self) -> Layout:
        return Layout.at(self.root, self.seed)

    @property
    def seeds(self) -> list[int]:
        return self.cfg.train.all_seeds

    def for_seed(self, seed: int) -> "StageContext":
        """The context of one training seed: train.seed set, and its own models/metrics folders when the run
        has several seeds (a one-seed run keeps the plain layout)."""
        cfg = self.cfg.model_copy(update={"train": self.cfg.train.model_copy(update={"seed": seed})})
        return dataclasses.replace(self, cfg=cfg, seed=seed if len(self.seeds) > 1 else None)

    def split_path(self, domain: str, split: str) -> Path:
        path = self.layout.curated(domain) / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the curate stage for {domain!r} first (moa stage curate {domain})")
        return path

    def split(self, domain: str, split: str) -> list[Record]:
        return read_records(self.split_path(domain, split))

    def splits(self, split: str, domains: list[str] | None = None) -> dict[str, list[Record]]:
        return {d: self.split(d, split) for d in (domains or self.cfg.domain_names)}


@contextlib.contextmanager
def data_parallel_group() -> Iterator[Any]:
    """The torchrun process group of a `moa stage ... --nproc-per-node N` job (a moa_core.distributed
    DataParallel), or None when the stage runs as one process."""
    from moa_core.distributed import init_from_env, shutdown

    dp = init_from_env()
    try:
        yield dp
    finally:
        shutdown(dp)


def write_training_metrics(ctx: StageContext, name: str, summary: dict[str, Any]) -> None:
    """A training stage's summary -> metrics/<name>.json (DVC-tracked: the same bytes for the same inputs) and its
    wall-clock timings -> metrics/timings/<name>.json (untracked; the evaluation table's training time)."""
    tracked, timings = split_timings(summary)
    atomic_write_json(ctx.layout.metrics / f"{name}.json", tracked)
    atomic_write_json(ctx.layout.timings / f"{name}.json", timings)


def read_training_metrics(ctx: StageContext, name: str) -> dict[str, Any]:
    """What `write_training_metrics` wrote, merged again ({} when the stage has not run)."""
    tracked, timings = (json.loads(p.read_text()) if p.exists() else {}
                        for p in (ctx.layout.metrics / f"{name}.json", ctx.layout.timings / f"{name}.json"))
    return merge_timings(tracked, timings) if tracked else {}


def fingerprint(ctx: StageContext, *sections: str, domains: list[str] | None = None) -> str:
    """Hash of the config sections and curated train data a training job depends on: a checkpoint from
    other settings or data is not resumed."""
    h = hashlib.sha256()
    dump = ctx.cfg.model_dump()
    for s in sections:
        h.update(repr(dump.get(s)).encode())
    for d in domains or []:
        path = ctx.layout.curated(d) / "train.jsonl"
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:16]
