"""Ingestion and validation in DuckDB: every raw record is a valid example or quarantined with a reason."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraflow.ingest import IngestError, ingest_file
from loraflow.spec import PiiSpec, QualitySpec, SourceSpec
from loraflow.validate import (
    REASONS,
    SchemaError,
    drop_partition,
    partition_counts,
    validate_partition,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"the shared third-party datasets are not beside the project ({SHARED})"
)
ANY = SourceSpec(path="*")


def alpaca(i: int, **fields) -> dict:
    return {"instruction": "Classify.", "input": f"message number {i}", "output": f"label {i}", **fields}


@pytest.fixture
def con():
    connection = duckdb.connect()
    yield connection
    connection.close()


def ingest_and_validate(
    con, path: Path, source: SourceSpec = ANY, quality: QualitySpec | None = None, key="k"
):
    ingest_file(con, "p", key, path, source)
    return validate_partition(con, "p", key, source, quality or QualitySpec())


def reasons_by_record(con) -> dict[int, str]:
    return dict(con.execute("SELECT record_index, reason FROM p.quarantine ORDER BY 1").fetchall())


def test_every_quarantine_reason_with_the_original_record_kept(con, tmp_path):
    lines = [
        json.dumps(alpaca(1)),
        "",  # blank lines are not records
        '{"instruction": "Classify.", "input": "x", "output": "y"',  # truncated
        "[1, 2]",
        json.dumps({"instruction": "Classify.", "input": "no answer"}),
        json.dumps(alpaca(5, output=5)),
        json.dumps(alpaca(6, instruction="  ", input="")),
        json.dumps(alpaca(7, output="   ")),
        json.dumps(alpaca(8, input="x" * 101)),
        json.dumps(alpaca(9, output="y" * 51)),
        json.dumps(alpaca(1)),  # duplicate of line 1
        json.dumps(alpaca(12, input="bell \u0007 in the text")),
        json.dumps(alpaca(13, input="write to jane.doe@example.com")),
        json.dumps(alpaca(14, input=None, output="no input is fine")),
    ]
    path = tmp_path / "drop.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff\xfe"}\n')
    result = ingest_and_validate(con, path, quality=QualitySpec(max_prompt_chars=100, max_response_chars=50))

    assert result.raw == result.valid + result.quarantined == 14
    assert result.valid == 2
    assert reasons_by_record(con) == {
        3: "malformed_json",
        4: "not_an_object",
        5: "missing_field",
        6: "wrong_type",
        7: "empty_prompt",
        8: "empty_response",
        9: "prompt_too_long",
        10: "response_too_long",
        11: "duplicate",
        12: "control_characters",
        13: "pii",
        15: "undecodable_bytes",
    }
    assert partition_counts(con, "p", "k") == (14, 2, 12)
    details = dict(con.execute("SELECT reason, detail FROM p.quarantine WHERE detail IS NOT NULL").fetchall())
    assert details == {"missing_field": "output", "wrong_type": "output", "pii": "email"}
    assert con.execute("SELECT record FROM p.quarantine WHERE record_index = 3").fetchone()[0] == lines[2]
    kept = con.execute("SELECT record_index, messages FROM p.validated_examples ORDER BY 1").fetchall()
    assert [index for index, _ in kept] == [1, 14]
    assert json.loads(kept[0][1]) == [
        {"role": "user", "content": "Classify.\n\nmessage number 1"},
        {"role": "assistant", "content": "label 1"},
    ]


def test_too_many_tokens_uses_the_base_models_tokenizer(con, tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(alpaca(1)) + "\n" + json.dumps(alpaca(2, input="word " * 80)) + "\n")
    ingest_file(con, "p", "k", path, ANY)
    result = validate_partition(con, "p", "k", ANY, QualitySpec(max_tokens=40), tokenizer)
    assert result.reasons["too_many_tokens"] == 1
    assert reasons_by_record(con) == {2: "too_many_tokens"}
    assert set(REASONS) >= set(result.reasons)


def test_pii_is_redacted_when_the_yaml_says_so(con, tmp_path):
    path = tmp_path / "pii.jsonl"
    text = "call +1 415 555 0134 or mail bob@example.org, key sk-abcdefghijklmnop1234"
    path.write_text(json.dumps(alpaca(1, input=text)) + "\n")
    result = ingest_and_validate(con, path, quality=QualitySpec(pii=PiiSpec(action="redact")))
    assert (result.valid, result.redacted) == (1, {"rows": 1})
    messages = json.loads(con.execute("SELECT messages FROM p.validated_examples").fetchone()[0])
    assert messages[0]["content"].endswith("call [PHONE] or mail [EMAIL], key [API_KEY]")


def test_order_numbers_and_dates_are_not_taken_for_phone_numbers(con, tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(alpaca(1, input="order #257368 placed on 2026-11-29 for 49.99")) + "\n")
    assert ingest_and_validate(con, path).valid == 1


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("rows.jsonl", lambda p, rows: p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")),
        (
            "rows.jsonl.gz",
            lambda p, rows: p.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode())),
        ),
        ("rows.json", lambda p, rows: p.write_text(json.dumps(rows, indent=2))),
        (
            "rows.csv",
            lambda p, rows: p.write_text(
                "instruction,input,output\n"
                + "".join(f'"{r["instruction"]}","{r["input"]}","{r["output"]}"\n' for r in rows)
            ),
        ),
        ("rows.parquet", lambda p, rows: pq.write_table(pa.Table.from_pylist(rows), p)),
    ],
)
def test_every_file_type_is_read(con, tmp_path, name, write):
    rows = [alpaca(i) for i in range(5)] + [alpaca(9, output="")]
    write(tmp_path / name, rows)
    result = ingest_and_validate(con, tmp_path / name)
    assert (result.schema, result.raw, result.valid, result.reasons["empty_response"]) == ("alpaca", 6, 5, 1)
    indices = [r[0] for r in con.execute("SELECT record_index FROM p.raw_examples ORDER BY 1").fetchall()]
    assert indices == [1, 2, 3, 4, 5, 6]


def test_chat_schema_with_system_turns(con, tmp_path):
    good = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    no_answer = {"messages": [{"role": "user", "content": "Hi"}]}
    bad_role = {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    not_text = {"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good, no_answer, bad_role, not_text)))
    result = ingest_and_validate(con, path)
    assert result.schema == "chat"
    assert reasons_by_record(con) == {2: "bad_conversation", 3: "bad_conversation", 4: "wrong_type"}
    stored = json.loads(con.execute("SELECT messages FROM p.validated_examples").fetchone()[0])
    assert stored == good["messages"]


def test_sharegpt_roles_map_to_chat_roles(con, tmp_path):
    record = {
        "id": "a",
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ],
    }
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([record]))
    result = ingest_and_validate(con, path)
    assert (result.schema, result.valid) == ("sharegpt", 1)
    roles = [
        m["role"] for m in json.loads(con.execute("SELECT messages FROM p.validated_examples").fetchone()[0])
    ]
    assert roles == ["system", "user", "assistant"]


def test_completion_schema_keeps_plain_text(con, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "Once upon a time."}) + "\n" + json.dumps({"text": ""}) + "\n")
    result = ingest_and_validate(con, path)
    assert (result.schema, result.valid, result.reasons["empty_response"]) == ("completion", 1, 1)
    assert con.execute("SELECT text, messages FROM p.validated_examples").fetchone() == (
        "Once upon a time.",
        None,
    )
    # texts have no prompt: the data checks must not count that against them
    from loraflow.expectations import run_suite
    from loraflow.validate import PII_PATTERNS, classified_frame

    suite = run_suite(classified_frame(con), QualitySpec(max_invalid_fraction=0.5), PII_PATTERNS)
    assert suite.success, suite.failing


def test_ambiguous_file_names_the_candidates(con, tmp_path):
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"text": "a", "messages": [], "instruction": "b", "output": "c"}) + "\n")
    ingest_file(con, "p", "k", path, ANY)
    with pytest.raises(
        SchemaError, match=r"several schemas: alpaca \(1 of 1 records\), chat .*completion.*Set `format`"
    ):
        validate_partition(con, "p", "k", ANY, QualitySpec())
    assert (
        validate_partition(con, "p", "k", SourceSpec(path="*", format="completion"), QualitySpec()).valid == 1
    )


def test_unknown_schema_lists_the_keys_found(con, tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    ingest_file(con, "p", "k", path, ANY)
    with pytest.raises(SchemaError, match=r"their keys are: answer, question.*columns"):
        validate_partition(con, "p", "k", ANY, QualitySpec())


def test_explode_turns_nested_instances_into_examples(con, tmp_path):
    record = {
        "instruction": "Antonym?",
        "instances": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}],
    }
    empty = {"instruction": "Nothing here", "instances": []}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(empty) + "\n")
    source = SourceSpec(path="*", format="alpaca", explode="instances")
    result = ingest_and_validate(con, path, source)
    assert (result.raw, result.valid, result.reasons["missing_field"]) == (3, 2, 1)
    rows = con.execute("SELECT record_index, sub_index FROM p.validated_examples ORDER BY 1, 2").fetchall()
    assert rows == [(1, 0), (1, 1)]


def test_a_broken_json_array_is_refused_whole_with_where_it_breaks(con, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c"')
    with pytest.raises(IngestError, match=r"broken\.json: is not valid JSON at line 2, column"):
        ingest_file(con, "p", "k", path, ANY)


def test_reingesting_a_partition_replaces_only_its_rows(con, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(json.dumps(alpaca(i)) for i in range(3)))
    second.write_text(json.dumps(alpaca(10)))
    ingest_and_validate(con, first, key="a")
    ingest_and_validate(con, second, key="b")
    first.write_text(json.dumps(alpaca(0)))  # the file shrank
    ingest_and_validate(con, first, key="a")
    assert partition_counts(con, "p", "a") == (1, 1, 0)
    assert partition_counts(con, "p", "b") == (1, 1, 0)
    drop_partition(con, "p", "b")
    assert partition_counts(con, "p", "b") == (0, 0, 0)


def test_cross_file_duplicates_keep_the_first_file_whatever_the_ingestion_order(con, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(alpaca(1)) + "\n" + json.dumps(alpaca(2)))
    (tmp_path / "b.jsonl").write_text(json.dumps(alpaca(3)) + "\n" + json.dumps(alpaca(1)))
    for key in ("b", "a", "b"):  # b first, then a, then b re-ingested
        ingest_and_validate(con, tmp_path / f"{key}.jsonl", key=key)
    kept = con.execute("SELECT partition, record_index FROM p.examples ORDER BY 1, 2").fetchall()
    assert kept == [("a", 1), ("a", 2), ("b", 1)]
    dropped = con.execute("SELECT partition, record_index, reason FROM p.duplicates_across_files").fetchall()
    assert dropped == [("b", 2, "duplicate")]


@needs_shared_data
def test_real_datasets_in_their_own_schemas(con):
    cases = [
        (
            "gpteacher_roleplay_simple_deduped.json",
            SourceSpec(path="*", columns={"output": "response"}),
            "alpaca",
            1923,
        ),
        ("fastchat_dummy_conversation.json", ANY, "sharegpt", 500),
        ("selfinstruct_seed_tasks.jsonl", SourceSpec(path="*", explode="instances"), "alpaca", 175),
    ]
    for name, source, schema, records in cases:
        result = ingest_and_validate(con, SHARED / name, source, key=name)
        assert result.schema == schema
        assert result.raw == records == result.valid + result.quarantined
        assert result.valid >= 0.95 * records


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@needs_shared_data
@pytest.mark.parametrize("name", ["roleplay", "conversations", "seed_tasks"])
def test_example_pipelines_read_the_real_datasets_through_their_yaml_alone(con, name):
    from loraflow.spec import load_spec

    spec = load_spec(EXAMPLES / f"{name}.yaml")
    partitions = spec.partitions()
    assert len(partitions) == 1
    for key, (path, source) in partitions.items():
        ingested = ingest_file(con, spec.name, key, path, source)
        result = validate_partition(con, spec.name, key, source, spec.quality)
        assert ingested.rows == result.raw == result.valid + result.quarantined
        assert result.valid >= 0.95 * result.raw


def test_schema_drift_names_added_removed_and_retyped_keys():
    from loraflow.validate import schema_drift

    before = {"instruction": "VARCHAR", "input": "VARCHAR", "output": "VARCHAR", "score": "UBIGINT"}
    after = {"instruction": "VARCHAR", "output": "VARCHAR", "score": "DOUBLE", "ticket_id": "UBIGINT"}
    assert schema_drift(before, after) == {
        "added": ["ticket_id"],
        "removed": ["input"],
        "changed_type": ["score"],
    }
    assert schema_drift(before, dict(before)) == {}
    assert schema_drift(None, after) == {}  # the first validation has nothing to drift from
