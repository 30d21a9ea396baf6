"""Raw ingestion: every line of a source file into the warehouse, untouched, with where it came from.

One call loads one partition (one source file) into `<pipeline>.raw_examples`, replacing what
that partition held before. Nothing is parsed or judged here; validation does that, so a line
that is not even JSON still arrives and can be quarantined with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from loraflow.artifacts import file_sha256

RAW_TABLE = "raw_examples"


@dataclass(frozen=True)
class IngestResult:
    """What one partition's ingestion stored."""

    partition: str
    source_file: str
    file_sha256: str
    rows: int
    blank_lines: int


class IngestError(RuntimeError):
    """A source file that cannot be read at all."""


def ensure_raw_table(con: duckdb.DuckDBPyConnection, pipeline: str) -> None:
    """Create the pipeline's schema and raw table if missing."""
    con.execute(f'CREATE SCHEMA IF NOT EXISTS "{pipeline}"')
    con.execute(
        f"""
        CREATE TABLE IF NOT EXISTS "{pipeline}".{RAW_TABLE} (
            partition VARCHAR NOT NULL,
            source_file VARCHAR NOT NULL,
            file_sha256 VARCHAR NOT NULL,
            line_number BIGINT NOT NULL,
            record VARCHAR NOT NULL,
            ingested_at TIMESTAMP NOT NULL
        )
        """
    )


def ingest_jsonl(con: duckdb.DuckDBPyConnection, pipeline: str, partition: str, path: Path) -> IngestResult:
    """Replace partition `partition` of the raw table with the lines of `path` (1-based line numbers).

    Blank lines are not records: they are counted, not stored.
    """
    path = Path(path)
    if not path.is_file():
        raise IngestError(
            f"{path}: source file not found (was it moved or deleted since the partition was added?)"
        )
    digest = file_sha256(path)
    ensure_raw_table(con, pipeline)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f'DELETE FROM "{pipeline}".{RAW_TABLE} WHERE partition = ?', [partition])
        con.execute(
            f"""
            INSERT INTO "{pipeline}".{RAW_TABLE}
            WITH file AS (SELECT string_split(content, chr(10)) AS lines FROM read_text(?)),
            numbered AS (
                SELECT rtrim(unnest(lines), chr(13)) AS record, generate_subscripts(lines, 1) AS line_number
                FROM file
            )
            SELECT ?, ?, ?, line_number, record, now()::TIMESTAMP
            FROM numbered WHERE trim(record) <> ''
            """,
            [str(path), partition, str(path), digest],
        )
        rows, total_lines = con.execute(
            f"""
            SELECT (SELECT count(*) FROM "{pipeline}".{RAW_TABLE} WHERE partition = ?),
                   (SELECT len(string_split(content, chr(10))) FROM read_text(?))
            """,
            [partition, str(path)],
        ).fetchone()
        con.execute("COMMIT")
    except duckdb.Error as err:
        con.execute("ROLLBACK")
        raise IngestError(f"{path}: could not be read as text: {err}") from err
    # A file ending in a newline splits into one trailing empty string; that is not a blank line.
    trailing = 1 if _ends_with_newline(path) else 0
    return IngestResult(
        partition=partition,
        source_file=str(path),
        file_sha256=digest,
        rows=int(rows),
        blank_lines=int(total_lines) - int(rows) - trailing,
    )


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        if handle.tell() == 0:
            return False
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"
