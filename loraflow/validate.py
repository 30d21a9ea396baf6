"""Validation: each raw line of a partition becomes a valid example or a quarantined row with a reason.

The rules run as one DuckDB query over the partition. The first rule a row breaks is its reason;
the quarantine keeps the original line so nothing is lost. Per partition,
raw rows = valid rows + quarantined rows, always.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import duckdb

from loraflow.ingest import RAW_TABLE, ensure_raw_table
from loraflow.spec import QualitySpec, SourceSpec

VALID_TABLE = "validated_examples"
QUARANTINE_TABLE = "quarantine"

# reason code -> what it means; the codes are stable (metadata keys, check results, reports).
REASONS: dict[str, str] = {
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the line is JSON but not an object",
    "missing_field": "a required field (instruction or output) is missing",
    "wrong_type": "instruction, input or output is not a string",
    "empty_prompt": "instruction and input are empty or only whitespace",
    "empty_response": "output is empty or only whitespace",
    "prompt_too_long": "instruction plus input is longer than quality.max_prompt_chars",
    "response_too_long": "output is longer than quality.max_response_chars",
    "duplicate": "an identical example appears earlier in the same file (the first copy is kept)",
}


@dataclass(frozen=True)
class ValidationResult:
    """Counts for one partition; raw == valid + quarantined."""

    partition: str
    raw: int
    valid: int
    quarantined: int
    reasons: dict[str, int]

    @property
    def invalid_fraction(self) -> float:
        return self.quarantined / self.raw if self.raw else 0.0


def ensure_tables(con: duckdb.DuckDBPyConnection, pipeline: str) -> None:
    """Create the validated and quarantine tables if missing."""
    con.execute(f'CREATE SCHEMA IF NOT EXISTS "{pipeline}"')
    con.execute(
        f"""
        CREATE TABLE IF NOT EXISTS "{pipeline}".{VALID_TABLE} (
            partition VARCHAR NOT NULL,
            source_file VARCHAR NOT NULL,
            line_number BIGINT NOT NULL,
            instruction VARCHAR NOT NULL,
            input VARCHAR NOT NULL,
            output VARCHAR NOT NULL,
            example_hash VARCHAR NOT NULL,
            ingested_at TIMESTAMP NOT NULL
        )
        """
    )
    con.execute(
        f"""
        CREATE TABLE IF NOT EXISTS "{pipeline}".{QUARANTINE_TABLE} (
            partition VARCHAR NOT NULL,
            source_file VARCHAR NOT NULL,
            line_number BIGINT NOT NULL,
            reason VARCHAR NOT NULL,
            record VARCHAR NOT NULL,
            quarantined_at TIMESTAMP NOT NULL
        )
        """
    )


def _json_path(key: str) -> str:
    return "$." + json.dumps(key)


def _classified_sql(pipeline: str, source: SourceSpec, quality: QualitySpec) -> tuple[str, list]:
    """A query over one partition's raw rows adding the parsed fields, the example hash and a reason."""
    paths = [_json_path(source.column(f)) for f in ("instruction", "input", "output")]
    sql = f"""
    WITH raw AS (
        SELECT partition, source_file, line_number, record, ingested_at,
               json_valid(record) AS is_json
        FROM "{pipeline}".{RAW_TABLE} WHERE partition = ?
    ),
    typed AS (
        -- invalid lines are parsed as an empty object so the JSON functions never see them; is_json keeps the truth
        SELECT *,
            json_type(doc) AS top_type,
            CASE WHEN json_type(doc) = 'OBJECT' THEN json_type(doc, ?) END AS t_instruction,
            CASE WHEN json_type(doc) = 'OBJECT' THEN json_type(doc, ?) END AS t_input,
            CASE WHEN json_type(doc) = 'OBJECT' THEN json_type(doc, ?) END AS t_output
        FROM (SELECT *, CASE WHEN is_json THEN record ELSE '{{}}' END AS doc FROM raw)
    ),
    parsed AS (
        SELECT *,
            CASE WHEN t_instruction = 'VARCHAR' THEN json_extract_string(doc, ?) END AS instruction,
            CASE WHEN t_input = 'VARCHAR' THEN json_extract_string(doc, ?) ELSE '' END AS input,
            CASE WHEN t_output = 'VARCHAR' THEN json_extract_string(doc, ?) END AS output
        FROM typed
    ),
    hashed AS (
        SELECT *,
            sha256(json_array(instruction, input, output)::VARCHAR) AS example_hash,
            row_number() OVER (
                PARTITION BY sha256(json_array(instruction, input, output)::VARCHAR) ORDER BY line_number
            ) AS copy_number
        FROM parsed
    )
    SELECT partition, source_file, line_number, record, ingested_at, instruction, input, output, example_hash,
        CASE
            WHEN NOT is_json THEN 'malformed_json'
            WHEN top_type <> 'OBJECT' THEN 'not_an_object'
            WHEN t_instruction IS NULL OR t_output IS NULL THEN 'missing_field'
            WHEN t_instruction <> 'VARCHAR' OR t_output <> 'VARCHAR'
                 OR (t_input IS NOT NULL AND t_input NOT IN ('VARCHAR', 'NULL')) THEN 'wrong_type'
            WHEN trim(instruction || input) = '' THEN 'empty_prompt'
            WHEN trim(output) = '' THEN 'empty_response'
            WHEN length(instruction) + length(input) > ? THEN 'prompt_too_long'
            WHEN length(output) > ? THEN 'response_too_long'
            WHEN copy_number > 1 THEN 'duplicate'
        END AS reason
    FROM hashed
    """
    return sql, [*paths, *paths, quality.max_prompt_chars, quality.max_response_chars]


def validate_partition(
    con: duckdb.DuckDBPyConnection,
    pipeline: str,
    partition: str,
    source: SourceSpec,
    quality: QualitySpec,
) -> ValidationResult:
    """Split one partition's raw rows into validated examples and quarantined rows (replacing both)."""
    ensure_tables(con, pipeline)
    sql, params = _classified_sql(pipeline, source, quality)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE classified AS " + sql, [partition, *params])
        for table in (VALID_TABLE, QUARANTINE_TABLE):
            con.execute(f'DELETE FROM "{pipeline}".{table} WHERE partition = ?', [partition])
        con.execute(
            f"""
            INSERT INTO "{pipeline}".{VALID_TABLE}
            SELECT partition, source_file, line_number, instruction, input, output, example_hash, ingested_at
            FROM classified WHERE reason IS NULL ORDER BY line_number
            """
        )
        con.execute(
            f"""
            INSERT INTO "{pipeline}".{QUARANTINE_TABLE}
            SELECT partition, source_file, line_number, reason, record, now()::TIMESTAMP
            FROM classified WHERE reason IS NOT NULL ORDER BY line_number
            """
        )
        counts = dict(
            con.execute("SELECT coalesce(reason, 'valid'), count(*) FROM classified GROUP BY 1").fetchall()
        )
        con.execute("DROP TABLE classified")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    valid = int(counts.pop("valid", 0))
    reasons = {reason: int(counts.get(reason, 0)) for reason in REASONS}
    return ValidationResult(
        partition=partition,
        raw=valid + sum(reasons.values()),
        valid=valid,
        quarantined=sum(reasons.values()),
        reasons=reasons,
    )


def partition_counts(con: duckdb.DuckDBPyConnection, pipeline: str, partition: str) -> tuple[int, int, int]:
    """(raw, valid, quarantined) rows stored for one partition, read back from the tables."""
    return con.execute(
        f"""
        SELECT (SELECT count(*) FROM "{pipeline}".{RAW_TABLE} WHERE partition = $p),
               (SELECT count(*) FROM "{pipeline}".{VALID_TABLE} WHERE partition = $p),
               (SELECT count(*) FROM "{pipeline}".{QUARANTINE_TABLE} WHERE partition = $p)
        """,
        {"p": partition},
    ).fetchone()


def quarantine_sample(
    con: duckdb.DuckDBPyConnection, pipeline: str, partition: str, limit: int = 10
) -> list[tuple]:
    """A few quarantined rows of a partition: (line_number, reason, record cut to 120 characters)."""
    return con.execute(
        f"""
        SELECT line_number, reason, left(record, 120) FROM "{pipeline}".{QUARANTINE_TABLE}
        WHERE partition = ? ORDER BY line_number LIMIT ?
        """,
        [partition, limit],
    ).fetchall()


def validated_fingerprint(con: duckdb.DuckDBPyConnection, pipeline: str, partition: str) -> str:
    """sha256 over a partition's accepted example hashes in line order: its content version."""
    accepted = con.execute(
        f"""
        SELECT coalesce(string_agg(example_hash, ',' ORDER BY line_number), '')
        FROM "{pipeline}".{VALID_TABLE} WHERE partition = ?
        """,
        [partition],
    ).fetchone()[0]
    return hashlib.sha256(accepted.encode()).hexdigest()


def source_lineage(con: duckdb.DuckDBPyConnection, pipeline: str) -> list[dict]:
    """Per source file: its sha256 at ingestion and how many rows were accepted and quarantined."""
    rows = con.execute(
        f"""
        SELECT r.source_file, any_value(r.file_sha256),
               (SELECT count(*) FROM "{pipeline}".{VALID_TABLE} v WHERE v.partition = r.partition),
               (SELECT count(*) FROM "{pipeline}".{QUARANTINE_TABLE} q WHERE q.partition = r.partition)
        FROM "{pipeline}".{RAW_TABLE} r GROUP BY r.source_file, r.partition ORDER BY r.source_file
        """
    ).fetchall()
    return [{"file": f, "sha256": h, "valid": int(v), "quarantined": int(q)} for f, h, v, q in rows]


def drop_partition(con: duckdb.DuckDBPyConnection, pipeline: str, partition: str) -> None:
    """Remove a partition's rows from the raw, validated and quarantine tables (its file is gone)."""
    ensure_raw_table(con, pipeline)
    ensure_tables(con, pipeline)
    for table in (RAW_TABLE, VALID_TABLE, QUARANTINE_TABLE):
        con.execute(f'DELETE FROM "{pipeline}".{table} WHERE partition = ?', [partition])
