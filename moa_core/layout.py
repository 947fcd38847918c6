"""Where every artifact lives, relative to the project root. One place, so DVC, Prefect tasks and the CLI agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """`seed`: in a run over several training seeds (train.seeds), each seed's models and metrics live under
    `models/seed-<n>/` and `metrics/seed-<n>/`; the curated data and reports are shared. A one-seed run
    (seed None) keeps the plain paths."""

    root: Path
    seed: int | None = None

    @classmethod
    def at(cls, root: str | Path = ".", seed: int | None = None) -> "Layout":
        return cls(Path(root).resolve(), seed)

    @property
    def _models(self) -> Path:
        return self.root / "models" / ("" if self.seed is None else f"seed-{self.seed}")

    # data
    def curated(self, domain: str) -> Path:
        """Directory with train.jsonl, val.jsonl, test.jsonl, quarantine.jsonl, card.json."""
        return self.root / "data" / "curated" / domain

    # models
    def expert(self, domain: str) -> Path:
        """Stage-1 PEFT LoRA adapter directory (adapter_model.safetensors + adapter_config.json)."""
        return self._models / "experts" / domain

    @property
    def mixed(self) -> Path:
        """LoRA-mixed baseline adapter: one PEFT LoRA trained on all domains."""
        return self._models / "mixed"

    def mixture(self, method: str) -> Path:
        """The trained expert mixture (mixture.safetensors + mixture.json)."""
        return self._models / "mixture" / method

    def export(self, method: str) -> Path:
        """`moa export`: the mixture's experts as PEFT adapter folders + the standalone router."""
        return self._models / "export" / method

    def onboarded(self, domain: str) -> Path:
        """The candidate mixture of `moa onboard <domain>` (old experts + the new one, updated routers)."""
        return self.root / "models" / "onboard" / domain

    @property
    def checkpoints(self) -> Path:
        return self._models / "checkpoints"

    # reports
    @property
    def metrics(self) -> Path:
        return self.root / "metrics" / ("" if self.seed is None else f"seed-{self.seed}")

    @property
    def timings(self) -> Path:
        """Wall-clock timings of the training stages (seconds, tokens/s): outside the DVC-tracked metrics files,
        whose bytes must repeat for the same inputs (moa_core.incremental.split_timings)."""
        return self.metrics / "timings"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    # incremental retraining
    @property
    def stage_records(self) -> Path:
        """One record per stage's last successful run (moa_core.incremental): skipped when nothing it reads changed."""
        return self.root / ".moa" / "stages" / ("" if self.seed is None else f"seed-{self.seed}")
