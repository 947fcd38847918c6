"""Record schema and curation: raw source rows -> normalised, deduplicated, capped, split records + quarantine.

Pure stdlib so it runs (and is tested) anywhere. Every rejected row is kept in the quarantine with a
machine-readable reason code, never dropped silently, so `rows_in == kept + quarantined + capped` always
holds and a data problem shows up as a count on the data card instead of as a mysteriously small expert.

Splits and the row cap hash (seed, id), not list positions: adding rows to a source never moves an
existing row between train/val/test, so evaluations stay comparable as a domain grows.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write_text

if TYPE_CHECKING:
    from moa_core.config import CurateConfig

REASONS: tuple[str, ...] = (
    "parse_error", "wrong_type", "not_utf8", "too_large", "missing_field", "empty", "duplicate", "duplicate_id",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
_PREVIEW_CHARS = 500
_BLANK_RUN = re.compile(r"\n(?:[ \t]*\n){3,}")  # a line break followed by three or more blank lines
_LEADING_BLANK_LINES = re.compile(r"^(?:[ \t]*\n)+")


class EmptyDomainError(ValueError):
    """A domain has nothing to train on after curation; raised before any stage trains on nothing."""


@dataclass(frozen=True)
class Record:
    """One curated instruction/response pair; `domain` is the expert it trains."""

    id: str
    domain: str
    instruction: str
    response: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(id=str(d["id"]), domain=str(d["domain"]), instruction=str(d["instruction"]),
                   response=str(d["response"]))


@dataclass
class Curation:
    """Result of `curate`: the three splits, the quarantine and the counts for the data card and metrics."""

    domain: str
    train: list[Record] = field(default_factory=list)
    val: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[Record]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits are {SPLITS}")
        return getattr(self, name)


class _Reject(Exception):
    """Internal: a row fails a rule; carries the reason code and a human-readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class _Clean:
    record: Record
    truncated_instruction: bool
    truncated_response: bool


# ------------------------------------------------------------------------------------------ text rules

def normalise(text: str) -> str:
    """Canonical form used for training and for duplicate detection: NFC, \\n line ends, at most two blank
    lines in a row, no leading blank lines or trailing whitespace. The first line's indentation is kept:
    HumanEval solutions continue a function body and lose their meaning without it."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _BLANK_RUN.sub("\n\n\n", text)
    return _LEADING_BLANK_LINES.sub("", text).rstrip()


def truncate(text: str, limit: int) -> tuple[str, bool]:
    """Cut to at most `limit` characters, at the last whitespace if that keeps at least half the budget
    (a half word confuses the model more than a slightly shorter text). Returns (text, was_truncated)."""
    if len(text) <= limit:
        return text, False
    cut = text[:limit]
    if not text[limit].isspace():
        boundary = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        if boundary >= limit // 2:
            cut = cut[:boundary]
    return cut.rstrip(), True


def _sha1(*parts: object) -> str:
    return hashlib.sha1("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def _unit(seed: int, salt: str, rid: str) -> float:
    """A stable number in [0, 1) per (seed, purpose, id); separate salts keep the cap and the split independent."""
    return int(_sha1(seed, salt, rid)[:16], 16) / 16**16


def _row_bytes(row: dict[str, Any]) -> int:
    return len(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8"))


def _preview(row: Any) -> str:
    text = repr(row)
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 3] + "..."


# ------------------------------------------------------------------------------------------ row checks

def _field_text(row: dict[str, Any], name: str, required: bool) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise _Reject("missing_field", f"'{name}' is missing")
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Reject("not_utf8", f"'{name}' is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"'{name}' is {type(value).__name__}, expected text")
    return value


def _given_id(row: dict[str, Any]) -> str:
    """The row's own id as text ('' when absent); integer ids from tabular sources are accepted."""
    value = row.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None or isinstance(value, str | bytes):
        return normalise(_field_text(row, "id", required=False))
    raise _Reject("wrong_type", f"'id' is {type(value).__name__}, expected text or integer")


def _clean(row: Any, domain: str, cfg: CurateConfig) -> _Clean:
    """Apply the row rules in order (cheap structural ones first); raise `_Reject` on the first failure."""
    if not isinstance(row, dict):
        raise _Reject("wrong_type", f"row is {type(row).__name__}, expected a mapping")
    if "__error__" in row:
        raise _Reject("parse_error", str(row["__error__"]))
    size = _row_bytes(row)
    if size > cfg.max_row_bytes:
        raise _Reject("too_large", f"row is {size} bytes > curate.max_row_bytes={cfg.max_row_bytes}")
    instruction = normalise(_field_text(row, "instruction", required=True))
    response = normalise(_field_text(row, "response", required=True))
    extra = normalise(_field_text(row, "input", required=False))
    rid = _given_id(row)
    for name, text in (("instruction", instruction), ("response", response)):
        if len(text.strip()) < cfg.min_chars:
            raise _Reject("empty", f"'{name}' has {len(text.strip())} chars < curate.min_chars={cfg.min_chars}")
    if extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    instruction, cut_i = truncate(instruction, cfg.max_instruction_chars)
    response, cut_r = truncate(response, cfg.max_response_chars)
    rid = rid or f"{domain}-{_sha1(instruction, response)[:12]}"
    return _Clean(Record(rid, domain, instruction, response), cut_i, cut_r)


# ------------------------------------------------------------------------------------------ curate

def curate(rows: list[dict[str, Any]], domain: str, cfg: CurateConfig) -> Curation:
    """Clean, deduplicate, cap and split one domain's raw rows. Deterministic for a given input and seed."""
    result = Curation(domain=domain)
    kept: list[_Clean] = []
    seen_content: set[str] = set()
    seen_ids: set[str] = set()
    for index, row in enumerate(rows):
        try:
            clean = _clean(row, domain, cfg)
            rec = clean.record
            content = _sha1(rec.instruction, rec.response)
            if content in seen_content:
                raise _Reject("duplicate", "same instruction and response as an earlier row")
            if rec.id in seen_ids:
                raise _Reject("duplicate_id", f"id {rec.id!r} already used by an earlier row")
        except _Reject as rej:
            result.quarantine.append({"index": index, "reason": rej.reason, "detail": rej.detail, "row": _preview(row)})
            continue
        seen_content.add(content)
        seen_ids.add(rec.id)
        kept.append(clean)
    selected = _cap(kept, cfg)
    splits = _split([c.record for c in selected], cfg)
    result.train, result.val, result.test = splits["train"], splits["val"], splits["test"]
    result.counts = _counts(len(rows), selected, len(kept) - len(selected), result)
    return result


def _cap(kept: list[_Clean], cfg: CurateConfig) -> list[_Clean]:
    """Keep `max_rows` rows chosen by hash (a stable sample, not the file's first rows), in source order."""
    if len(kept) <= cfg.max_rows:
        return kept
    chosen = set(sorted(range(len(kept)), key=lambda i: _unit(cfg.seed, "cap", kept[i].record.id))[: cfg.max_rows])
    return [c for i, c in enumerate(kept) if i in chosen]


def _split(records: list[Record], cfg: CurateConfig) -> dict[str, list[Record]]:
    """Assign each record by a hash of (seed, id); test takes [0, t), val [t, t+v), train the rest."""
    t, v = cfg.test_fraction, cfg.val_fraction
    bounds = {"test": (0.0, t), "val": (t, t + v), "train": (t + v, 1.0)}
    units = {r.id: _unit(cfg.seed, "split", r.id) for r in records}
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for rec in records:
        name = next(s for s, (lo, hi) in bounds.items() if lo <= units[rec.id] < hi)
        out[name].append(rec)
    needed = ["train"] + (["val", "test"] if len(records) >= 3 else [])
    for target in needed:
        if not out[target] and records:
            _fill(out, target, bounds[target], units)
    order = {r.id: i for i, r in enumerate(records)}
    return {s: sorted(rs, key=lambda r: order[r.id]) for s, rs in out.items()}


def _fill(out: dict[str, list[Record]], target: str, bound: tuple[float, float], units: dict[str, float]) -> None:
    """Move into an empty split the record of the largest other split whose hash lies nearest to it, so a
    tiny domain still gets a train row (and val/test rows from 3 rows on) with a deterministic choice."""
    donor = max((s for s in SPLITS if s != target), key=lambda s: len(out[s]))
    lo, hi = bound

    def distance(rec: Record) -> tuple[float, str]:
        u = units[rec.id]
        return (max(lo - u, u - hi, 0.0), rec.id)

    rec = min(out[donor], key=distance)
    out[donor].remove(rec)
    out[target].append(rec)


def _counts(rows_in: int, selected: list[_Clean], capped: int, result: Curation) -> dict[str, int]:
    reasons = Counter(q["reason"] for q in result.quarantine)
    return {
        "rows_in": rows_in,
        "kept": len(selected),
        "quarantined": len(result.quarantine),
        "capped": capped,
        **{f"quarantined_{r}": reasons.get(r, 0) for r in REASONS},
        "truncated_instruction": sum(c.truncated_instruction for c in selected),
        "truncated_response": sum(c.truncated_response for c in selected),
        **{s: len(result.split(s)) for s in SPLITS},
    }


REJECTED_QUARANTINE = "quarantine.rejected.jsonl"  # a curation with nothing to train on leaves the splits alone


def require_rows(curation: Curation, domain: str, quarantine: str | Path | None = None) -> None:
    """Stop the pipeline with a useful message when a domain has no training rows (`quarantine`: where the
    rejected rows were written, default data/curated/<domain>/quarantine.jsonl)."""
    if curation.train:
        return
    c = curation.counts
    reasons = ", ".join(f"{r}={c[f'quarantined_{r}']}" for r in REASONS if c.get(f"quarantined_{r}")) or "none"
    raise EmptyDomainError(
        f"domain {domain!r} has no training rows after curation: {c.get('rows_in', 0)} rows in, "
        f"{c.get('kept', 0)} kept, {c.get('quarantined', 0)} quarantined (by reason: {reasons}). "
        f"See {quarantine or f'data/curated/{domain}/quarantine.jsonl'} for examples, then fix the domain's `source` in params.yaml "
        "(path, or a `fields` mapping to the right columns) or relax `curate` (min_chars, max_row_bytes)."
    )


# ------------------------------------------------------------------------------------------ IO

def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc}); re-run the curate stage") from None
    return rows


def read_records(path: Path) -> list[Record]:
    return [Record.from_dict(d) for d in read_jsonl(path)]


def write_curated(out_dir: Path, curation: Curation, card: dict[str, Any]) -> None:
    """Splits, quarantine and card.json; the card is written last, so its presence means a complete set."""
    out_dir = Path(out_dir)
    for name in SPLITS:
        write_jsonl_atomic(out_dir / f"{name}.jsonl", (r.to_dict() for r in curation.split(name)))
    write_jsonl_atomic(out_dir / "quarantine.jsonl", curation.quarantine)
    write_json_atomic(out_dir / "card.json", {**card, "counts": curation.counts})


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def data_card_markdown(cards: list[dict[str, Any]]) -> str:
    """DATA_CARD.md: one table row per domain from the card.json files, then each domain's origin."""
    lines = [
        "# Data card",
        "",
        "Rows per domain after curation (`moa` curate stage). Quarantined rows, with their reason, are in "
        "`data/curated/<domain>/quarantine.jsonl`; capped rows were valid but over `curate.max_rows`.",
        "",
        "| domain | rows in | kept | quarantined | quarantine reasons | capped | train / val / test | licence "
        "| attribution |",
        "|---|---:|---:|---:|---|---:|---|---|---|",
    ]
    for card in cards:
        c = card.get("counts", {})
        reasons = ", ".join(f"{r} {c[f'quarantined_{r}']}" for r in REASONS if c.get(f"quarantined_{r}")) or "-"
        cells = [
            card.get("domain", "?"), c.get("rows_in", 0), c.get("kept", 0), c.get("quarantined", 0), reasons,
            c.get("capped", 0), f"{c.get('train', 0)} / {c.get('val', 0)} / {c.get('test', 0)}",
            card.get("licence", "?"), card.get("attribution", "?"),
        ]
        lines.append("| " + " | ".join(_cell(x) for x in cells) + " |")
    lines += ["", "## Sources", ""]
    lines += [f"- **{_cell(card.get('domain', '?'))}**: {_cell(card.get('description', ''))} "
              f"(from {_cell(card.get('origin', '?'))})" for card in cards]
    return "\n".join(lines) + "\n"
