"""Ingestion and validation in DuckDB: every raw line is a valid example or quarantined with a reason."""

from __future__ import annotations

import json

import duckdb
import pytest

from loraflow.ingest import ingest_jsonl
from loraflow.spec import QualitySpec, SourceSpec
from loraflow.validate import REASONS, drop_partition, partition_counts, validate_partition


def good(i: int) -> dict:
    return {"instruction": "Classify.", "input": f"message number {i}", "output": f"label {i}"}


LINES = [
    json.dumps(good(1)),
    "",  # blank lines are not records
    '{"instruction": "Classify.", "input": "x", "output": "y"',  # truncated
    "[1, 2]",
    json.dumps({"instruction": "Classify.", "input": "no answer"}),
    json.dumps({"instruction": "Classify.", "input": "x", "output": 5}),
    json.dumps({"instruction": "  ", "input": "", "output": "y"}),
    json.dumps({"instruction": "Classify.", "input": "x", "output": "   "}),
    json.dumps({"instruction": "Classify.", "input": "x" * 101, "output": "y"}),
    json.dumps({"instruction": "Classify.", "input": "x", "output": "y" * 51}),
    json.dumps(good(1)),  # duplicate of line 1
    json.dumps(good(2)),
    json.dumps({"instruction": "Classify.", "input": None, "output": "no input is fine"}),
]


@pytest.fixture
def con():
    connection = duckdb.connect()
    yield connection
    connection.close()


def test_every_line_is_valid_or_quarantined_with_its_reason(con, tmp_path):
    path = tmp_path / "drop.jsonl"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    ingested = ingest_jsonl(con, "p", "drop.jsonl", path)
    assert (ingested.rows, ingested.blank_lines) == (12, 1)

    result = validate_partition(
        con, "p", "drop.jsonl", SourceSpec(path="*"), QualitySpec(max_prompt_chars=100, max_response_chars=50)
    )
    assert result.raw == result.valid + result.quarantined == 12
    assert result.valid == 3
    assert result.reasons == {reason: 1 for reason in REASONS}
    assert partition_counts(con, "p", "drop.jsonl") == (12, 3, 9)
    by_line = dict(con.execute("SELECT line_number, reason FROM p.quarantine").fetchall())
    assert by_line == {
        3: "malformed_json",
        4: "not_an_object",
        5: "missing_field",
        6: "wrong_type",
        7: "empty_prompt",
        8: "empty_response",
        9: "prompt_too_long",
        10: "response_too_long",
        11: "duplicate",
    }
    # the original line is kept for every quarantined row
    assert con.execute("SELECT record FROM p.quarantine WHERE line_number = 3").fetchone()[0] == LINES[2]
    kept = con.execute("SELECT line_number, input FROM p.validated_examples ORDER BY 1").fetchall()
    assert kept == [(1, "message number 1"), (12, "message number 2"), (13, "")]


def test_column_mapping_reads_the_files_own_names(con, tmp_path):
    path = tmp_path / "roleplay.jsonl"
    path.write_text(json.dumps({"instruction": "Act.", "input": "", "response": "Aye."}) + "\n")
    ingest_jsonl(con, "p", "k", path)
    source = SourceSpec(path="*", columns={"output": "response"})
    result = validate_partition(con, "p", "k", source, QualitySpec())
    assert result.valid == 1
    assert con.execute("SELECT output FROM p.validated_examples").fetchone()[0] == "Aye."


def test_reingesting_a_partition_replaces_only_its_rows(con, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(good(i)) for i in range(3)))
    second.write_text(json.dumps(good(10)))
    for key, path in (("a", first), ("b", second)):
        ingest_jsonl(con, "p", key, path)
        validate_partition(con, "p", key, SourceSpec(path="*"), QualitySpec())
    first.write_text(json.dumps(good(0)))  # the file shrank
    ingest_jsonl(con, "p", "a", first)
    validate_partition(con, "p", "a", SourceSpec(path="*"), QualitySpec())
    assert partition_counts(con, "p", "a") == (1, 1, 0)
    assert partition_counts(con, "p", "b") == (1, 1, 0)
    drop_partition(con, "p", "b")
    assert partition_counts(con, "p", "b") == (0, 0, 0)


def test_demo_data_has_work_for_validation(con, tmp_path):
    from loraflow.demo_data import write_demo_data

    paths = write_demo_data(tmp_path, n=200)
    totals = {"raw": 0, "valid": 0, "quarantined": 0}
    for path in paths:
        ingest_jsonl(con, "demo", path.name, path)
        result = validate_partition(con, "demo", path.name, SourceSpec(path="*"), QualitySpec())
        totals = {k: totals[k] + getattr(result, k) for k in totals}
    assert totals["raw"] == totals["valid"] + totals["quarantined"]
    assert totals["quarantined"] >= 5
