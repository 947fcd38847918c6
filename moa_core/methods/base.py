"""What a mixture method is, and the registry that finds one by name.

A method is one `MixtureMethod` subclass, registered once with `@register_method`. It owns everything that
differs between methods:

- `spec(cfg, base, model_id)`: the `MixtureSpec` it builds on a base model (experts, ranks, routing);
- `build(...)`: the mixture with its initial weights (`init_slots` for method-specific initialisation);
- `fit(...)`: its training stages after stage 1, as named phases;
- `extend(...)`: how a trained mixture gets one more domain (`onboardable` methods only);
- flags: `needs_experts` (trains on the stage-1 PEFT experts, so their stage runs first),
  `onboardable` (and `why_not_onboardable`), `config_sections` (the params.yaml sections it reads).

Tasks, flows, onboarding, evaluation and config validation ask the registry (`get_method`, `method_names`)
instead of comparing method names. This module imports no torch: validating params.yaml reads the names.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from ..config import MoAConfig
    from ..distributed import DataParallel
    from ..model import MixtureModel, MixtureSpec
    from ..train import LogFn, TrainResult


class UnknownMethodError(ValueError):
    """A method name no registered method has."""


@dataclass(frozen=True)
class DomainData:
    """The records a method trains on, one list per domain in mixture order (when onboarding, the new
    domain last). `val`: the validation split in the same order, or None; every stage passes it on with
    the train records, sliced the same way."""

    train: list[list[Any]]
    val: list[list[Any]] | None = None

    def __post_init__(self) -> None:
        if self.val is not None and len(self.val) != len(self.train):
            raise ValueError(f"val has {len(self.val)} domains, train {len(self.train)}; give both in the same order")

    def __len__(self) -> int:
        return len(self.train)

    def domain(self, k: int) -> DomainData:
        """Domain k alone (index as in a list: -1 is the last), for a phase that trains one expert."""
        return DomainData([self.train[k]], None if self.val is None else [self.val[k]])


@dataclass(frozen=True)
class StageRun:
    """Where a method's phases checkpoint, how they report, and how they are spread over processes.

    Each phase checkpoints under `ckpt_root/<name>` (resumed when `fingerprint` matches) and logs through
    `on_log` with its phase name added to every entry."""

    ckpt_root: Path | None = None
    on_log: LogFn | None = None
    fingerprint: str = ""
    dp: DataParallel | None = None

    def ckpt(self, name: str) -> Path | None:
        return self.ckpt_root / name if self.ckpt_root else None

    def log(self, phase: str) -> LogFn | None:
        on_log = self.on_log
        if on_log is None:
            return None
        return lambda step, entry: on_log(step, {**entry, "phase": phase})


class MixtureMethod:
    """One mixture method; subclass, set the class attributes, implement `spec` and `fit`, register."""

    name: ClassVar[str]
    needs_experts: ClassVar[bool] = False  # trains on the stage-1 PEFT experts (train_expert runs first)
    onboardable: ClassVar[bool] = False  # `extend` can add a domain without retraining the others
    why_not_onboardable: ClassVar[str] = "it has no onboarding recipe"
    # params.yaml sections its spec and stages read (checkpoint fingerprints; dvc.yaml's train_router params)
    config_sections: ClassVar[tuple[str, ...]] = ("base_model", "lora", "train", "router")

    # ------------------------------------------------------------------------------------- building
    def spec(self, cfg: MoAConfig, base: nn.Module, model_id: str) -> MixtureSpec:
        """The mixture this method needs on `base`, from params.yaml."""
        raise NotImplementedError

    def init_slots(self, mm: MixtureModel, cfg: MoAConfig, slots: slice | int) -> None:
        """Method-specific initialisation of freshly created expert slots (all of a new mixture's domain
        experts, or the one `extend` adds). Default: the experts' own random initialisation."""

    def build(self, cfg: MoAConfig, base: nn.Module, model_id: str) -> MixtureModel:
        """The untrained mixture on `base` (seeded by train.seed, so every build is the same)."""
        import torch

        from ..model import MixtureModel

        torch.manual_seed(cfg.train.seed)
        mm = MixtureModel(base, self.spec(cfg, base, model_id))
        self.init_slots(mm, cfg, slice(None))
        return mm

    @staticmethod
    def common_spec_fields(cfg: MoAConfig, base: nn.Module, model_id: str) -> dict[str, Any]:
        """The MixtureSpec fields every method fills the same way (provenance, domains, LoRA scaling, router)."""
        from ..model import base_config_hash

        return dict(base_model=model_id, base_config_hash=base_config_hash(base.config),
                    domains=list(cfg.domain_names), scaling=cfg.lora.scaling, dropout=cfg.lora.dropout,
                    pooling=cfg.router.pooling, inference=cfg.router.inference)

    @staticmethod
    def n_layers(base: nn.Module) -> int:
        from ..model import decoder_layers

        return len(decoder_layers(base))

    # ------------------------------------------------------------------------------------- training
    def fit(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData, run: StageRun,
            expert_dirs: list[Path] | None = None) -> dict[str, TrainResult]:
        """Train a freshly built mixture after stage 1; one TrainResult per phase, in order.
        `expert_dirs`: the stage-1 adapters, one per domain in domain order (`needs_experts` methods)."""
        raise NotImplementedError

    def extend(self, mm: MixtureModel, cfg: MoAConfig, tokenizer: Any, data: DomainData, k_new: int,
               frozen: list[int], run: StageRun, adapter_dir: Path | None = None) -> dict[str, TrainResult]:
        """Train the expert slot `k_new` just added to a trained mixture for the last domain of `data`
        (and what routes to it) while the slots `frozen` stay bit-identical. `adapter_dir`: the new domain's
        stage-1 adapter (`needs_experts` methods). Only for `onboardable` methods."""
        raise NotImplementedError(f"method {self.name!r} cannot be extended: {self.why_not_onboardable}")

    @staticmethod
    def train(mm: MixtureModel, tokenizer: Any, data: DomainData, cfg: MoAConfig, run: StageRun, phase: str,
              ckpt: str, **kw: Any) -> TrainResult:
        """One phase: `train_mixture` on `data` (train and validation records), checkpointed under `ckpt`,
        logged as `phase`, spread over `run.dp`. `kw`: train_mixture's keywords (steps, lr, route, ...)."""
        from ..train import train_mixture

        return train_mixture(mm, tokenizer, data.train, cfg, val_by_domain=data.val, ckpt_dir=run.ckpt(ckpt),
                             on_log=run.log(phase), fingerprint=run.fingerprint, dp=run.dp, **kw)


# ------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, MixtureMethod] = {}


def register_method(cls: type[MixtureMethod]) -> type[MixtureMethod]:
    """Class decorator: make `cls` (one instance of it) the method called `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"method {name!r} is already registered by {type(_REGISTRY[name]).__name__}")
    _REGISTRY[name] = cls()
    return cls


def unregister_method(name: str) -> None:
    """Remove a registered method (a test's own method, after the test)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def onboardable_methods() -> tuple[str, ...]:
    return tuple(n for n, m in _REGISTRY.items() if m.onboardable)


def unknown_method_message(name: str) -> str:
    close = difflib.get_close_matches(name, method_names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown method {name!r}; {hint}known methods: {', '.join(method_names())}"


def get_method(name: str) -> MixtureMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(unknown_method_message(name)) from None
