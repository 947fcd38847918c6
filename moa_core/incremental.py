"""Incremental retraining: a pipeline stage whose inputs did not change since its last successful run is skipped.

A stage's *fingerprint* hashes everything its output depends on: the params.yaml keys it reads (`STAGE_KEYS`, the
same keys dvc.yaml lists for it), the content of the files it reads (the domain's raw source rows for curation,
the curated splits, the upstream adapters and mixtures, the metrics files), the base model's identity and the
training seed. Upstream stages enter through their outputs' content rather than through their fingerprints: an
upstream stage that ran again and wrote other bytes (a forced rerun on a GPU, a hand edit, a `dvc checkout`)
re-runs what reads it, exactly as DVC decides.

After a stage has written its outputs, a `StageRecord` (the fingerprint, the content digest of each output, the
stage's result) is written atomically, last, under `.moa/stages/`. The next run skips the stage when the record's
fingerprint equals the new one and every recorded output still has the recorded content; a crash before the record
is written leaves no record, so the stage runs again. The records live outside the DVC-tracked outputs: they hold
the stage's result, wall-clock timings included, which must not change the tracked bytes.

Pure functions of paths and values: the Prefect tasks (tasks/incremental.py) decide, log and record.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json

# Bump when the fingerprint's recipe changes: every record then mismatches once and every stage runs again.
RECORD_FORMAT = 1

# The training keys the stage-1 adapters (experts, LoRA-mixed) and the mixtures share. Runtime-only keys
# (train.num_threads, parallel_jobs, log_every, checkpoint_every) change no output and appear nowhere.
_TRAINING = ("train.max_length", "train.batch_size", "train.lr", "train.weight_decay", "train.warmup_fraction",
             "train.grad_clip", "train.seed", "train.precision", "train.epochs", "train.eval_every",
             "train.patience", "train.val_rows", "train.min_delta", "train.min_steps")

# The params.yaml keys (a section, or a dotted key inside one) each stage reads. dvc.yaml lists exactly these as
# the stage's `params` (tests/test_incremental.py holds the two together), so the flow and `dvc repro` re-run a
# stage for the same changed keys. curate also reads its own domain's entry, `domains.<name>`.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "curate": ("curate",),
    "train_expert": ("base_model", "lora", *_TRAINING, "train.expert_steps", "train.experts_from"),
    "train_mixed": ("base_model", "lora", *_TRAINING, "train.mixed_steps", "train.mixed_sampling"),
    "train_router": ("method", "base_model", "lora", *_TRAINING, "train.expert_steps", "train.joint_steps",
                     "train.joint_lr", "train.clip_per_expert", "router", "mosld", "modula", "evaluate.baselines", "evaluate.compare_methods"),
    "evaluate": ("method", "evaluate", "train.max_length", "train.precision"),
    "intervals": ("method", "evaluate.bootstrap"),
    "register": ("registry", "evaluate.max_new_tokens", "train.max_length", "base_model.device", "serve"),
}

SKIPPED = "unchanged, skipped"  # the words the logs and MLflow tags use for a skipped stage


def config_values(config: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """`{key: value}` for dotted keys into a config dump (`cfg.model_dump()`); a key absent there maps to None."""
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        out[key] = node
    return out


def value_digest(value: Any) -> str:
    """sha256 of a JSON-able value in a canonical form (sorted keys; bytes and other odd leaves by their repr)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_digest(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or of a directory's files (their relative paths and bytes, in sorted order);
    None when the path does not exist."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0" + _file_digest(f).encode("ascii") + b"\n")
    return h.hexdigest()


def base_model_identity(path_or_id: str) -> str:
    """What identifies the base model's weights without reading them: for a local directory its config.json
    and the name and size of each weight file; for a hub id (a snapshot in the local HF cache) the id itself."""
    folder = Path(path_or_id)
    if not folder.is_dir():
        return path_or_id
    config = folder / "config.json"
    weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin", ".gguf", ".pt") and p.is_file())
    return value_digest({"config": path_digest(config), "weights": weights})


def stage_fingerprint(stage: str, config: Mapping[str, Any], keys: Sequence[str], inputs: Mapping[str, Any]) -> str:
    """The fingerprint of one run of `stage` (e.g. "train_expert:code"): the values of `keys` in `config` (a
    config dump) and `inputs` (content digests of the files it reads, the base model's identity, the seed...)."""
    return value_digest({"format": RECORD_FORMAT, "stage": stage, "config": config_values(config, keys),
                         "inputs": dict(inputs)})


@dataclass(frozen=True)
class StageRecord:
    """The last successful run of one stage: its fingerprint, the content digest of each output (path relative
    to the project root) and the stage's result (what the task returned: a skipped run returns it again)."""

    stage: str
    fingerprint: str
    outputs: dict[str, str]
    result: dict[str, Any]
    format: int = RECORD_FORMAT


def record_path(records_dir: Path, stage: str) -> Path:
    """`<records_dir>/<stage>.json`, the stage name made file-safe ("train_expert:code" -> train_expert.code.json)."""
    return Path(records_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '.', stage)}.json"


def read_record(path: Path) -> StageRecord | None:
    """The record at `path`, or None when there is none or it cannot be read (then the stage simply runs)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        record = StageRecord(**data)
    except (OSError, ValueError, TypeError):
        return None
    return record if record.format == RECORD_FORMAT else None


def make_record(stage: str, fingerprint: str, root: Path, outputs: Iterable[Path],
                result: Mapping[str, Any]) -> StageRecord:
    """The record of a stage that has just written `outputs` (files or directories under `root`)."""
    digests: dict[str, str] = {}
    for out in outputs:
        digest = path_digest(out)
        if digest is None:
            raise FileNotFoundError(f"{out} is missing: stage {stage} did not write it, so it cannot be recorded")
        digests[Path(out).resolve().relative_to(Path(root).resolve()).as_posix()] = digest
    # the result goes through JSON now, so that a skipped run returns what the first run returned, as JSON gives it
    return StageRecord(stage, fingerprint, digests, json.loads(json.dumps(dict(result), default=repr)))


def write_record(path: Path, record: StageRecord) -> Path:
    """Write the record atomically: called last, after every output is in place."""
    return atomic_write_json(path, asdict(record))


def is_unchanged(record: StageRecord | None, fingerprint: str, root: Path) -> bool:
    """True when the stage may be skipped: it ran before with this fingerprint and its outputs are still the
    bytes it wrote then (an output deleted, edited or checked out from another version makes it run again)."""
    if record is None or record.fingerprint != fingerprint or not record.outputs:
        return False
    return all(path_digest(Path(root) / rel) == digest for rel, digest in record.outputs.items())


# Keys of a training summary that describe this run rather than the model (wall-clock time, throughput, the step an
# interrupted run resumed from): they go to an untracked timings file and MLflow, never into a DVC-tracked output,
# whose bytes must repeat for the same inputs.
TIMING_KEYS = frozenset({"train_seconds", "seconds", "tokens_per_second", "resumed_from"})


def split_timings(summary: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the summary without timing keys, the timing keys alone), both nested as in `summary`."""
    kept: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for key, value in summary.items():
        if key in TIMING_KEYS:
            timings[key] = value
        elif isinstance(value, Mapping):
            inner_kept, inner_timings = split_timings(value)
            kept[key] = inner_kept
            if inner_timings:
                timings[key] = inner_timings
        else:
            kept[key] = value
    return kept, timings


# PEFT keeps these adapter_config.json fields as Python sets, so save_pretrained lists them in a hash-seed dependent
# order: the same adapter got other bytes on every run, and DVC saw a changed output.
_SET_VALUED_ADAPTER_KEYS = ("target_modules", "exclude_modules")


def sort_adapter_config(folder: str | Path) -> None:
    """Rewrite `<folder>/adapter_config.json` with its set-valued fields sorted (call it right after PEFT's
    save_pretrained, inside the same atomic directory write); the format is PEFT's own (indented, sorted keys)."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in _SET_VALUED_ADAPTER_KEYS:
        if isinstance(config.get(key), list) and all(isinstance(v, str) for v in config[key]):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def merge_timings(summary: Mapping[str, Any], timings: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `split_timings`: the timings put back into the summary, nested as they were."""
    merged = dict(summary)
    for key, value in timings.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_timings(merged[key], value)
        else:
            merged[key] = value
    return merged
