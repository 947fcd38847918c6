"""Where every artifact lives, relative to the project root. One place, so DVC, Prefect tasks and the CLI agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | Path = ".") -> "Layout":
        return cls(Path(root).resolve())

    # data
    def curated(self, domain: str) -> Path:
        """Directory with train.jsonl, val.jsonl, test.jsonl, quarantine.jsonl, card.json."""
        return self.root / "data" / "curated" / domain

    # models
    def expert(self, domain: str) -> Path:
        """Stage-1 PEFT LoRA adapter directory (adapter_model.safetensors + adapter_config.json)."""
        return self.root / "models" / "experts" / domain

    @property
    def mixed(self) -> Path:
        """LoRA-mixed baseline adapter: one PEFT LoRA trained on all domains."""
        return self.root / "models" / "mixed"

    def mixture(self, method: str) -> Path:
        """The trained expert mixture (mixture.safetensors + mixture.json)."""
        return self.root / "models" / "mixture" / method

    def onboarded(self, domain: str) -> Path:
        """The candidate mixture of `moa onboard <domain>` (old experts + the new one, updated routers)."""
        return self.root / "models" / "onboard" / domain

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / "checkpoints"

    # reports
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"
