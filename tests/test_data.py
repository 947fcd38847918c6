"""Curation rules of moa_core.data on hand-made rows: every quarantine reason, counts, determinism, IO."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from moa_core.config import CurateConfig
from moa_core.data import (
    REASONS,
    SPLITS,
    Curation,
    EmptyDomainError,
    Record,
    curate,
    data_card_markdown,
    normalise,
    read_jsonl,
    read_records,
    require_rows,
    truncate,
    write_curated,
    write_jsonl_atomic,
)

CFG = CurateConfig(max_rows=10_000, min_chars=2, max_instruction_chars=200, max_response_chars=200)


def good(i: int) -> dict[str, Any]:
    return {"instruction": f"Question number {i}?", "response": f"Answer number {i}."}


def ids_by_split(c: Curation) -> dict[str, list[str]]:
    return {s: [r.id for r in c.split(s)] for s in SPLITS}


def assert_counts_add_up(c: Curation) -> None:
    n = c.counts
    assert n["kept"] + n["quarantined"] + n["capped"] == n["rows_in"]
    assert n["train"] + n["val"] + n["test"] == n["kept"]
    assert sum(n[f"quarantined_{r}"] for r in REASONS) == n["quarantined"] == len(c.quarantine)


BAD_ROWS = [
    pytest.param({"response": "an answer"}, "missing_field", id="no-instruction"),
    pytest.param({"instruction": "a question", "response": None}, "missing_field", id="none-response"),
    pytest.param({"instruction": " \n\t  \n", "response": "an answer"}, "empty", id="whitespace"),
    pytest.param({"instruction": "a question", "response": "x"}, "empty", id="below-min-chars"),
    pytest.param({"instruction": b"caf\xe9 latin-1", "response": "an answer"}, "not_utf8", id="latin1-bytes"),
    pytest.param({"instruction": "a question", "response": "word " * 200_000}, "too_large", id="1MB-text"),
    pytest.param({"instruction": 42, "response": "an answer"}, "wrong_type", id="int"),
    pytest.param({"instruction": "a question", "response": ["an", "answer"]}, "wrong_type", id="list"),
    pytest.param({"instruction": "a question", "response": "an answer", "id": 1.5}, "wrong_type", id="float-id"),
    pytest.param("just a string", "wrong_type", id="not-a-mapping"),
    pytest.param({"__raw__": '{"instruction": "a', "__error__": "invalid JSON"}, "parse_error", id="parse-error"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_ROWS)
def test_each_bad_row_is_quarantined_with_its_reason(bad: Any, reason: str) -> None:
    rows = [good(0), good(1), bad, good(2)]
    c = curate(rows, "toy", CurateConfig(max_row_bytes=200_000))
    assert c.counts[f"quarantined_{reason}"] == 1
    assert c.counts["quarantined"] == 1 and c.counts["kept"] == 3
    [q] = c.quarantine
    assert (q["index"], q["reason"]) == (2, reason)
    assert q["detail"] and len(q["row"]) <= 500
    assert_counts_add_up(c)


def test_utf8_bytes_and_integer_ids_are_accepted() -> None:
    c = curate([{"instruction": "café?".encode(), "response": b"yes, caf\xc3\xa9", "id": 7}], "toy", CFG)
    [rec] = c.train
    assert (rec.id, rec.instruction, rec.response) == ("7", "café?", "yes, café")


def test_duplicates_are_detected_after_normalisation() -> None:
    nfd = unicodedata.normalize("NFD", "Qu'est-ce qu'un café ?")
    rows = [
        {"instruction": "Qu'est-ce qu'un café ?", "response": "A drink.\nHot."},
        {"instruction": nfd + "  \n", "response": "A drink.\r\nHot."},  # same text: NFD, CRLF, trailing space
        {"instruction": "Qu'est-ce qu'un café ?", "response": "A place."},  # different response: kept
    ]
    c = curate(rows, "toy", CFG)
    assert [q["index"] for q in c.quarantine] == [1]
    assert c.counts["quarantined_duplicate"] == 1 and c.counts["kept"] == 2


def test_duplicate_ids_keep_the_first_row() -> None:
    rows = [dict(good(0), id="x"), dict(good(1), id="x"), dict(good(2), id="y")]
    c = curate(rows, "toy", CFG)
    assert c.counts["quarantined_duplicate_id"] == 1
    assert c.quarantine[0]["index"] == 1
    kept = {r.id: r for s in SPLITS for r in c.split(s)}
    assert kept["x"].instruction == "Question number 0?"


def test_rows_without_id_get_a_stable_content_id() -> None:
    a = curate([good(0), good(1)], "med", CFG)
    b = curate([good(1), good(0)], "med", CFG)
    ids_a = sorted(r.id for s in SPLITS for r in a.split(s))
    assert ids_a == sorted(r.id for s in SPLITS for r in b.split(s))
    assert all(i.startswith("med-") and len(i) == len("med-") + 12 for i in ids_a)
    assert len(set(ids_a)) == 2


def test_input_is_appended_to_the_instruction() -> None:
    c = curate([{"instruction": "Translate to French.", "input": "Good morning", "response": "Bonjour"}], "t", CFG)
    assert c.train[0].instruction == "Translate to French.\n\nGood morning"


def test_normalise() -> None:
    assert normalise("a\r\nb\rc") == "a\nb\nc"
    assert normalise("a\n\n\n\n\n\nb") == "a\n\n\nb"  # five blank lines -> two
    assert normalise("a\n\n\nb") == "a\n\n\nb"  # two blank lines stay
    assert normalise(unicodedata.normalize("NFD", "é")) == "é"
    assert normalise("\n\n    return x  \n\n") == "    return x"  # code indentation survives


def test_truncation_cuts_at_a_word_boundary_and_is_counted() -> None:
    long = " ".join(f"word{i}" for i in range(100))
    cfg = CurateConfig(max_instruction_chars=30, max_response_chars=50)
    c = curate([{"instruction": "short question", "response": long}], "t", cfg)
    resp = c.train[0].response
    assert len(resp) <= 50 and long.startswith(resp) and long[len(resp)] == " "
    assert (c.counts["truncated_response"], c.counts["truncated_instruction"]) == (1, 0)
    assert truncate("x" * 40, 16) == ("x" * 16, True)  # no whitespace: hard cut
    assert truncate("short", 16) == ("short", False)


def test_counts_add_up_on_a_mixed_batch() -> None:
    rows: list[Any] = [good(i) for i in range(30)]
    rows += [good(3), {"response": "r r"}, {"instruction": 1, "response": "r r"}, {"__error__": "invalid JSON"}]
    c = curate(rows, "toy", CFG)
    assert c.counts["rows_in"] == 34 and c.counts["kept"] == 30 and c.counts["quarantined"] == 4
    assert c.counts["kept"] + c.counts["quarantined"] == c.counts["rows_in"]
    assert_counts_add_up(c)


def test_splits_are_deterministic_and_stable_when_rows_are_added() -> None:
    rows = [dict(good(i), id=f"r{i}") for i in range(200)]
    first = curate(rows, "toy", CFG)
    assert ids_by_split(first) == ids_by_split(curate(list(rows), "toy", CFG))
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    grown = curate(shuffled + [dict(good(i), id=f"r{i}") for i in range(200, 400)], "toy", CFG)
    where = {i: s for s, ids in ids_by_split(grown).items() for i in ids}
    assert all(where[i] == s for s, ids in ids_by_split(first).items() for i in ids)
    assert 5 <= first.counts["val"] <= 40 and 5 <= first.counts["test"] <= 40  # 10% of 200, loosely
    assert first.counts["train"] > 120


def test_seed_changes_the_split() -> None:
    rows = [dict(good(i), id=f"r{i}") for i in range(100)]
    other = CFG.model_copy(update={"seed": 1})
    assert ids_by_split(curate(rows, "toy", CFG)) != ids_by_split(curate(rows, "toy", other))


@pytest.mark.parametrize(("n", "sizes"), [(1, (1, 0, 0)), (3, (1, 1, 1)), (4, (2, 1, 1))])
def test_tiny_domains_get_train_and_from_three_rows_val_and_test(n: int, sizes: tuple[int, int, int]) -> None:
    c = curate([good(i) for i in range(n)], "toy", CFG)
    assert (c.counts["train"], c.counts["val"], c.counts["test"]) == sizes


def test_max_rows_cap_is_a_deterministic_hash_sample() -> None:
    rows = [dict(good(i), id=f"r{i}") for i in range(50)]
    cfg = CurateConfig(max_rows=10)
    c = curate(rows, "toy", cfg)
    assert (c.counts["kept"], c.counts["capped"], c.counts["quarantined"]) == (10, 40, 0)
    kept = sorted(r.id for s in SPLITS for r in c.split(s))
    assert kept == sorted(r.id for s in SPLITS for r in curate(rows, "toy", cfg).split(s))
    assert kept != [f"r{i}" for i in range(10)]  # a sample, not the head of the file
    assert_counts_add_up(c)


def test_empty_domain_error_names_the_domain_and_the_reasons() -> None:
    c = curate([{"response": "r r"}, {"instruction": "   ", "response": "r r"}], "cardiology", CFG)
    with pytest.raises(EmptyDomainError) as err:
        require_rows(c, "cardiology")
    msg = str(err.value)
    assert "'cardiology'" in msg and "missing_field=1" in msg and "empty=1" in msg and "params.yaml" in msg
    require_rows(curate([good(0)], "ok", CFG), "ok")


def test_write_curated_round_trip(tmp_path: Path) -> None:
    rows = [good(i) for i in range(20)] + [{"instruction": "q q"}]
    c = curate(rows, "toy", CFG)
    out = tmp_path / "curated" / "toy"
    write_curated(out, c, {"domain": "toy", "licence": "MIT", "attribution": "me", "origin": "test"})
    for s in SPLITS:
        assert read_records(out / f"{s}.jsonl") == c.split(s)
    [q] = read_jsonl(out / "quarantine.jsonl")
    assert q["reason"] == "missing_field"
    card = json.loads((out / "card.json").read_text())
    assert card["counts"] == c.counts and card["licence"] == "MIT"
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "quarantine.jsonl", "test.jsonl", "train.jsonl",
                                                     "val.jsonl"]


def test_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"a": 2}, {"b": object()}])
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_failed_atomic_writes_of_a_file_or_directory_leave_the_old_one(tmp_path: Path) -> None:
    import torch

    from moa_core.atomic import atomic_dir_write, atomic_write, atomic_write_json

    def half_then_fail(tmp: Path) -> None:
        (tmp / "weights.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    target = atomic_dir_write(tmp_path / "adapter", lambda tmp: (tmp / "weights.bin").write_bytes(b"old"))
    with pytest.raises(OSError, match="No space"):
        atomic_dir_write(target, half_then_fail)
    ckpt = atomic_write(tmp_path / "checkpoint.pt", lambda tmp: torch.save({"step": 1}, tmp))
    with pytest.raises(TypeError):
        atomic_write(ckpt, lambda tmp: torch.save({"step": 2}, tmp) or json.dumps(object()))
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "metrics.json", {"x": object()})
    assert (target / "weights.bin").read_bytes() == b"old"
    assert torch.load(ckpt, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoint.pt"]  # no temporaries left


def test_read_jsonl_names_the_corrupt_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"train.jsonl:2"):
        read_jsonl(path)


def test_record_dict_round_trip() -> None:
    rec = Record(id="1", domain="d", instruction="i", response="r")
    assert Record.from_dict(rec.to_dict()) == rec


def test_data_card_markdown_has_a_row_per_domain() -> None:
    c = curate([good(i) for i in range(5)] + [{"response": "r r"}], "law", CFG)
    md = data_card_markdown([{"domain": "law", "licence": "CC0 | public", "attribution": "SPDX",
                              "origin": "file x", "description": "licences", "counts": c.counts}])
    row = next(line for line in md.splitlines() if line.startswith("| law |"))
    assert "| 6 | 5 | 1 | missing_field 1 |" in row and "CC0 \\| public" in row and "SPDX" in row
