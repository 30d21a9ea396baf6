"""Hostile source files through the real ingestion and validation on a DuckDB file: each one ends as
rows with reasons or as a clear error naming the file, nothing stored before is lost or altered, and
per partition raw rows = valid rows + quarantined rows."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraflow.expectations import run_suite
from loraflow.ingest import IngestError, ingest_file
from loraflow.lake import MEMORY_LIMIT
from loraflow.spec import MAX_YAML_VALUES, QualitySpec, SourceSpec, SpecError, load_spec
from loraflow.validate import (
    NO_SCHEMA,
    PII_PATTERNS,
    PII_PATTERNS_PYTHON,
    classified_frame,
    partition_counts,
    partitions_not_adding_up,
    partitions_over_limit,
    validate_partition,
)

ANY = SourceSpec(path="*")
TABLES = ("raw_examples", "validated_examples", "quarantine")


def alpaca(i: int, **fields) -> dict:
    return {"instruction": "Classify.", "input": f"message number {i}", "output": f"label {i}", **fields}


def line(record: dict) -> bytes:
    return json.dumps(record).encode() + b"\n"


def stored(con, partition: str) -> dict[str, list[tuple]]:
    """Every row a partition holds in each table, in a fixed order."""
    return {
        table: con.execute(
            f"SELECT * FROM p.{table} WHERE partition = ? ORDER BY record_index, sub_index", [partition]
        ).fetchall()
        for table in TABLES
    }


class Warehouse:
    """A DuckDB file that already holds a good partition, to check that nothing of it is touched."""

    def __init__(self, folder: Path):
        self.folder = folder
        # the warehouse's own memory limit: beyond it DuckDB spills to disk or fails
        self.con = duckdb.connect(str(folder / "warehouse.duckdb"), config={"memory_limit": MEMORY_LIMIT})
        good = folder / "good.jsonl"
        good.write_bytes(b"".join(line(alpaca(i)) for i in range(4)) + line(alpaca(9, output="")))
        self.ingest_and_validate(good, "good")
        self.good = stored(self.con, "good")
        assert (len(self.good["validated_examples"]), len(self.good["quarantine"])) == (4, 1)

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def ingest_and_validate(self, path: Path, key: str, quality: QualitySpec | None = None, tokenizer=None):
        ingest_file(self.con, "p", key, path, ANY)
        return validate_partition(self.con, "p", key, ANY, quality or QualitySpec(), tokenizer)

    def reasons(self, key: str) -> dict[int, tuple[str, str | None]]:
        rows = self.con.execute(
            "SELECT record_index, reason, detail FROM p.quarantine WHERE partition = ? ORDER BY 1", [key]
        ).fetchall()
        return {index: (reason, detail) for index, reason, detail in rows}

    def assert_nothing_lost(self, key: str, raw: int) -> None:
        """The good partition is as it was; `key` holds `raw` rows; every partition adds up."""
        assert stored(self.con, "good") == self.good
        stored_raw, valid, quarantined = partition_counts(self.con, "p", key)
        assert stored_raw == raw == valid + quarantined
        assert partitions_not_adding_up(self.con, "p") == []


@pytest.fixture
def warehouse(tmp_path):
    store = Warehouse(tmp_path)
    yield store
    store.con.close()


def test_latin1_bytes_are_quarantined_as_undecodable_with_their_bytes_kept(warehouse):
    path = warehouse.write(
        "latin1.jsonl",
        line(alpaca(1)) + '{"instruction": "Café", "input": "", "output": "déjà vu"}\n'.encode("latin-1"),
    )
    result = warehouse.ingest_and_validate(path, "latin1")
    assert (result.valid, result.reasons["undecodable_bytes"]) == (1, 1)
    assert warehouse.reasons("latin1") == {2: ("undecodable_bytes", None)}
    kept = warehouse.con.execute("SELECT record FROM p.quarantine WHERE partition = 'latin1'").fetchone()[0]
    assert kept == '{"instruction": "Caf\\xe9", "input": "", "output": "d\\xe9j\\xe0 vu"}'
    warehouse.assert_nothing_lost("latin1", raw=2)


def test_a_utf8_byte_order_mark_is_accepted_and_not_part_of_the_text(warehouse):
    path = warehouse.write("bom.jsonl", b"\xef\xbb\xbf" + line(alpaca(1)) + line(alpaca(2)))
    result = warehouse.ingest_and_validate(path, "bom")
    assert (result.schema, result.valid, result.quarantined) == ("alpaca", 2, 0)
    first = warehouse.con.execute(
        "SELECT messages FROM p.validated_examples WHERE partition = 'bom' AND record_index = 1"
    ).fetchone()[0]
    assert json.loads(first)[0]["content"] == "Classify.\n\nmessage number 1"
    warehouse.assert_nothing_lost("bom", raw=2)


def test_nan_and_infinity_where_text_belongs_are_quarantined_as_wrong_type(warehouse):
    path = warehouse.write(
        "nan.jsonl",
        line(alpaca(1))
        + b'{"instruction": NaN, "input": "", "output": "y"}\n'
        + b'{"instruction": "x", "input": Infinity, "output": "y"}\n'
        + b'{"instruction": "x", "input": "", "output": -Infinity}\n',
    )
    result = warehouse.ingest_and_validate(path, "nan")
    assert (result.valid, result.reasons["wrong_type"]) == (1, 3)
    assert warehouse.reasons("nan") == {
        2: ("wrong_type", "instruction"),
        3: ("wrong_type", "input"),
        4: ("wrong_type", "output"),
    }
    warehouse.assert_nothing_lost("nan", raw=4)


@pytest.mark.parametrize(("content", "blank"), [(b"", 0), (b"\n  \n\r\n\t\n", 4)])
def test_an_empty_file_is_a_partition_of_no_rows(warehouse, content, blank):
    path = warehouse.write("empty.jsonl", content)
    ingested = ingest_file(warehouse.con, "p", "empty", path, ANY)
    assert (ingested.records, ingested.rows, ingested.blank_lines) == (0, 0, blank)
    result = validate_partition(warehouse.con, "p", "empty", ANY, QualitySpec())
    assert (result.schema, result.raw, result.valid, result.quarantined) == (NO_SCHEMA, 0, 0, 0)
    assert run_suite(classified_frame(warehouse.con), QualitySpec(), PII_PATTERNS_PYTHON).success
    warehouse.assert_nothing_lost("empty", raw=0)


def test_a_truncated_gzip_fails_its_partition_naming_the_file_and_keeps_what_it_held(warehouse):
    whole = gzip.compress(b"".join(line(alpaca(i)) for i in range(3000)))
    path = warehouse.write("rows.jsonl.gz", gzip.compress(b"".join(line(alpaca(i)) for i in range(3))))
    warehouse.ingest_and_validate(path, "gz")
    before = stored(warehouse.con, "gz")

    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(IngestError, match=re.escape(str(path)) + r": cannot be read as gzip \(cut short"):
        ingest_file(warehouse.con, "p", "gz", path, ANY)
    assert stored(warehouse.con, "gz") == before
    warehouse.assert_nothing_lost("gz", raw=3)


def test_random_bytes_are_quarantined_line_by_line_and_fail_the_invalid_share_check(warehouse):
    data = random.Random(7).randbytes(64 * 1024)
    path = warehouse.write("noise.jsonl", data)
    # what each line should get, decided by Python's own decoder and JSON parser
    expected: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.removesuffix(b"\r").removeprefix(b"\xef\xbb\xbf" if number == 1 else b"")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            reason = "undecodable_bytes"
        else:
            try:
                reason = "not_an_object" if not isinstance(json.loads(text), dict) else "?"
            except ValueError:
                reason = "malformed_json"
        expected[reason] = expected.get(reason, 0) + 1
    assert expected["undecodable_bytes"] > 100

    result = warehouse.ingest_and_validate(path, "noise")
    assert (result.schema, result.valid) == (NO_SCHEMA, 0)
    assert {reason: n for reason, n in result.reasons.items() if n} == expected
    # the blocking checks read these: over the invalid share, and the suite fails
    assert partitions_over_limit(warehouse.con, "p", 0.25) == [("noise", result.raw, result.raw)]
    suite = run_suite(classified_frame(warehouse.con), QualitySpec(), PII_PATTERNS_PYTHON)
    assert "expect_column_values_to_be_null(reason)" in suite.failing
    warehouse.assert_nothing_lost("noise", raw=sum(expected.values()))


def test_5000_deep_nesting_is_quarantined_without_breaking_the_parser(warehouse):
    deep_list = "[" * 5000 + "]" * 5000
    deep_object = '{"a": ' * 5000 + "1" + "}" * 5000
    path = warehouse.write(
        "deep.jsonl",
        line(alpaca(1))
        + f'{{"instruction": "x", "input": {deep_list}, "output": "y"}}\n'.encode()
        + f'{{"instruction": "x", "input": "", "output": {deep_object}}}\n'.encode()
        + deep_list.encode()
        + b"\n",
    )
    result = warehouse.ingest_and_validate(path, "deep")
    assert result.valid == 1
    assert warehouse.reasons("deep") == {
        2: ("wrong_type", "input"),
        3: ("wrong_type", "output"),
        4: ("not_an_object", None),
    }
    warehouse.assert_nothing_lost("deep", raw=4)


def letters(size: int) -> str:
    """Letters without a space or '@': the text on which a backtracking email search is quadratic."""
    return ("abcdefghijklmnopqrstuvwxyz" * (size // 26 + 1))[:size]


def test_a_60_mb_record_is_quarantined_as_too_long_without_being_parsed(warehouse):
    record = {"instruction": "Summarize.", "input": letters(60 * 2**20), "output": "ok"}
    path = warehouse.write("huge.jsonl", line(record) + line(alpaca(2)))
    result = warehouse.ingest_and_validate(path, "huge")
    assert (result.valid, result.reasons["record_too_long"]) == (1, 1)
    assert warehouse.reasons("huge") == {1: ("record_too_long", None)}
    kept = warehouse.con.execute("SELECT record FROM p.quarantine WHERE partition = 'huge'").fetchone()[0]
    assert kept == json.dumps(record)
    suite = run_suite(classified_frame(warehouse.con), QualitySpec(), PII_PATTERNS_PYTHON)
    assert suite.failing == ["expect_column_values_to_be_null(reason)"]
    warehouse.assert_nothing_lost("huge", raw=2)


def test_fields_of_megabytes_are_quarantined_as_too_long_and_the_data_checks_finish(warehouse):
    path = warehouse.write(
        "long.jsonl",
        line(alpaca(1, input=letters(5 * 2**20)))
        + line(alpaca(2))
        + line(alpaca(3, output=letters(5 * 2**20)))
        + b"".join(line(alpaca(i)) for i in range(4, 40)),
    )
    result = warehouse.ingest_and_validate(path, "long")
    assert warehouse.reasons("long") == {1: ("prompt_too_long", None), 3: ("response_too_long", None)}
    assert result.valid == 37

    # the asset's data checks judge the texts by their length, and finish
    suite = run_suite(
        classified_frame(warehouse.con), QualitySpec(max_invalid_fraction=0.0), PII_PATTERNS_PYTHON
    )
    assert suite.failing == [
        "expect_column_values_to_be_null(reason)",
        "expect_column_value_lengths_to_be_between(prompt)",
        "expect_column_value_lengths_to_be_between(response)",
    ]
    lengths = [
        s for s in suite.sample_failures if s["expectation"] == "expect_column_value_lengths_to_be_between"
    ]
    assert [(s["column"], s["record_index"]) for s in lengths] == [("prompt", 1), ("response", 3)]
    warehouse.assert_nothing_lost("long", raw=39)


def test_an_oversized_field_is_never_tokenized_for_the_token_limit(warehouse, tokenizer):
    seen: list[int] = []

    def counting(texts, **kwargs):  # the real tokenizer, recording how long its inputs are
        seen.extend(len(t) for t in texts)
        return tokenizer(texts, **kwargs)

    path = warehouse.write(
        "long.jsonl",
        line(alpaca(1, input=letters(2_000_000))) + line(alpaca(2)) + line(alpaca(3, output="word " * 300)),
    )
    result = warehouse.ingest_and_validate(path, "long", QualitySpec(max_tokens=64), counting)
    assert warehouse.reasons("long") == {1: ("prompt_too_long", None), 3: ("too_many_tokens", None)}
    assert result.valid == 1 and max(seen) < 4000 * 2
    warehouse.assert_nothing_lost("long", raw=3)


def test_a_csv_with_newlines_and_quotes_inside_fields_reads_each_record_whole(warehouse):
    path = warehouse.write(
        "quoted.csv",
        b"instruction,input,output\n"
        b'"Say ""hi"", politely","line one\nline two","a, b\r\nc"\n'
        b'plain,,"x"\n'
        b'"multi\n\nparagraph",,"""quoted"" answer"\n',
    )
    result = warehouse.ingest_and_validate(path, "csv")
    assert (result.raw, result.valid) == (3, 3)
    rows = warehouse.con.execute(
        "SELECT record_index, messages FROM p.validated_examples WHERE partition = 'csv' ORDER BY 1"
    ).fetchall()
    assert [(i, [m["content"] for m in json.loads(m)]) for i, m in rows] == [
        (1, ['Say "hi", politely\n\nline one\nline two', "a, b\r\nc"]),
        (2, ["plain", "x"]),
        (3, ["multi\n\nparagraph", '"quoted" answer']),
    ]
    warehouse.assert_nothing_lost("csv", raw=3)


def test_parquet_columns_of_the_wrong_type_are_quarantined_naming_the_column(warehouse):
    table = pa.table(
        {
            "instruction": pa.array([1, 2, 3], pa.int64()),
            "input": pa.array(["a", "b", "c"]),
            "output": pa.array(["x", "y", "z"]),
        }
    )
    pq.write_table(table, warehouse.folder / "ints.parquet")
    result = warehouse.ingest_and_validate(warehouse.folder / "ints.parquet", "ints")
    assert (result.valid, result.reasons["wrong_type"]) == (0, 3)
    assert set(warehouse.reasons("ints").values()) == {("wrong_type", "instruction")}
    assert partitions_over_limit(warehouse.con, "p", 0.25) == [("ints", 3, 3)]
    warehouse.assert_nothing_lost("ints", raw=3)

    lists = pa.table(
        {
            "instruction": pa.array(["a", "b"]),
            "output": pa.array([["x"], ["y", "z"]]),
        }
    )
    pq.write_table(lists, warehouse.folder / "lists.parquet")
    warehouse.ingest_and_validate(warehouse.folder / "lists.parquet", "lists")
    assert warehouse.reasons("lists") == {1: ("wrong_type", "output"), 2: ("wrong_type", "output")}
    warehouse.assert_nothing_lost("lists", raw=2)


def test_parquet_text_stored_as_bytes_is_decoded_and_bad_bytes_are_quarantined(warehouse):
    table = pa.table(
        {
            "instruction": pa.array([b"Classify.", b"Caf\xe9"], pa.binary()),
            "output": pa.array([b"label", b"fine"], pa.binary()),
        }
    )
    pq.write_table(table, warehouse.folder / "bytes.parquet")
    result = warehouse.ingest_and_validate(warehouse.folder / "bytes.parquet", "bytes")
    assert (result.valid, result.reasons["undecodable_bytes"]) == (1, 1)
    messages = warehouse.con.execute(
        "SELECT messages FROM p.validated_examples WHERE partition = 'bytes'"
    ).fetchone()[0]
    assert [m["content"] for m in json.loads(messages)] == ["Classify.", "label"]
    assert warehouse.reasons("bytes") == {2: ("undecodable_bytes", None)}
    warehouse.assert_nothing_lost("bytes", raw=2)


def test_the_suites_pii_patterns_find_what_validation_finds(warehouse):
    texts = [
        "write to jane.doe@example.com today",
        "a@b",
        "x" * 5000 + "@example.org",
        "no address here " * 50,
        "call +44 20 7946 0958",
        "key sk-abcdefghijklmnopqrstu",
        "order 2026-11-29",
    ]
    for kind, pattern in PII_PATTERNS.items():
        in_duckdb = [
            warehouse.con.execute("SELECT regexp_matches(?, ?)", [text, pattern]).fetchone()[0]
            for text in texts
        ]
        in_python = [re.search(PII_PATTERNS_PYTHON[kind], text) is not None for text in texts]
        assert in_python == in_duckdb, kind


def write_pipeline(folder: Path, body: str) -> Path:
    (folder / "pipelines").mkdir(exist_ok=True)
    path = folder / "pipelines" / "bomb.yaml"
    path.write_text("data:\n  sources:\n    - path: data/*.jsonl\n" + body)
    return path


def test_yaml_aliases_that_expand_without_bound_are_refused_naming_the_file_and_line(tmp_path):
    levels = ["  l0: &a0 [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"  l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = write_pipeline(
        tmp_path, "evaluation:\n  format_json_schema:\n" + "".join(f"  {x}\n" for x in levels)
    )
    with pytest.raises(SpecError) as refused:
        load_spec(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: line 11: ")  # l5, the first alias past the bound
    assert f"more than {MAX_YAML_VALUES:,} values once its aliases are expanded" in message


def test_yaml_aliases_within_the_bound_still_work_and_a_recursive_one_is_refused(tmp_path):
    shared = write_pipeline(
        tmp_path,
        "    - &other {path: more/*.jsonl, format: alpaca}\n    - *other\nquality: &q {max_prompt_chars: 100}\n",
    )
    spec = load_spec(shared)
    assert [s.path for s in spec.data.sources] == ["data/*.jsonl", "more/*.jsonl", "more/*.jsonl"]
    assert spec.quality.max_prompt_chars == 100

    recursive = write_pipeline(tmp_path, "description: &loop [1, *loop]\n")
    with pytest.raises(SpecError, match=r"line 4: alias \*loop refers to the node it is inside"):
        load_spec(recursive)


def test_a_huge_bad_value_in_a_pipeline_file_is_quoted_short(tmp_path):
    path = write_pipeline(tmp_path, "description: [" + ", ".join(str(i) for i in range(2_000)) + "]\n")
    with pytest.raises(SpecError) as refused:
        load_spec(path)
    assert "description (line 4): Input should be a valid string (got [0, 1, 2, 3, 4, 5, ...])" in str(
        refused.value
    )
    assert len(str(refused.value)) < 400
