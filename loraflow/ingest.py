"""Raw ingestion: every record of a source file into the warehouse, untouched, with where it came from.

One call loads one partition (one source file) into `<pipeline>.raw_examples`, replacing what that
partition held before. DuckDB reads the file: JSON Lines (also gzipped), a JSON array, CSV (also
gzipped) or Parquet. Nothing is judged here; validation does that, so a line that is not even JSON,
or not even UTF-8, still arrives and can be quarantined with a reason.

Each raw row carries the partition, the source file and its sha256, the record index (the line
number for JSON Lines, the 1-based position otherwise), a sub-index (the element of an exploded
list, 0 otherwise), the record as text, a read error if the bytes could not be decoded, and the
ingestion time.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from loraflow.spec import SourceSpec

RAW_TABLE = "raw_examples"
FILE_TYPES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
UNDECODABLE = "undecodable_bytes"


@dataclass(frozen=True)
class IngestResult:
    """What one partition's ingestion stored."""

    partition: str
    source_file: str
    file_sha256: str
    file_type: str
    records: int
    rows: int
    """Rows stored: records, or more when `explode` splits records into several examples."""
    blank_lines: int


class IngestError(RuntimeError):
    """A source file that cannot be read at all; the message names the file and what to do."""


def file_type_of(path: Path, source: SourceSpec) -> str:
    """The file type from the spec, or from the file name (`.gz` is looked through)."""
    if source.file_type != "auto":
        return source.file_type
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = FILE_TYPES.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise IngestError(
            f"{path}: cannot tell the file type from its name; name it .jsonl, .json, .csv or .parquet "
            "(optionally .gz), or set file_type on the source"
        )
    return kind


@contextlib.contextmanager
def replacing_rows(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """One transaction for replacing a partition's rows: all of them change, or none.

    Rows are always read back in an explicit order, so DuckDB may write them in any order (faster).
    """
    con.execute("BEGIN TRANSACTION")
    con.execute("SET preserve_insertion_order = false")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.execute("RESET preserve_insertion_order")


def ensure_raw_table(con: duckdb.DuckDBPyConnection, pipeline: str) -> None:
    """Create the pipeline's schema and raw table if missing."""
    con.execute(f'CREATE SCHEMA IF NOT EXISTS "{pipeline}"')
    con.execute(
        f"""
        CREATE TABLE IF NOT EXISTS "{pipeline}".{RAW_TABLE} (
            partition VARCHAR NOT NULL,
            source_file VARCHAR NOT NULL,
            file_sha256 VARCHAR NOT NULL,
            record_index BIGINT NOT NULL,
            sub_index INTEGER NOT NULL,
            record VARCHAR NOT NULL,
            read_error VARCHAR,
            ingested_at TIMESTAMP NOT NULL
        )
        """
    )


def ingest_file(
    con: duckdb.DuckDBPyConnection, pipeline: str, partition: str, path: Path, source: SourceSpec
) -> IngestResult:
    """Replace partition `partition` of the raw table with the records of `path`."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: source file not found (moved or deleted since the partition was added?)")
    kind = file_type_of(path, source)
    ensure_raw_table(con, pipeline)
    # hashing reads the file in Python while DuckDB parses it: both release the GIL, so they overlap
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest_and_lines = pool.submit(_digest_and_lines, path)
        blank = _load_incoming(con, path, kind)
        digest, lines = digest_and_lines.result()
    if blank is None:  # JSON Lines read by DuckDB: blank lines are the lines it did not keep
        blank = lines - con.execute("SELECT count(*) FROM incoming").fetchone()[0]
    records = con.execute("SELECT count(*) FROM incoming").fetchone()[0]
    try:
        with replacing_rows(con):
            con.execute(f'DELETE FROM "{pipeline}".{RAW_TABLE} WHERE partition = ?', [partition])
            con.execute(
                f'INSERT INTO "{pipeline}".{RAW_TABLE} ' + _exploded_sql(source.explode),
                [partition, str(path), digest],
            )
        rows = con.execute(f'SELECT count(*) FROM "{pipeline}".{RAW_TABLE} WHERE partition = ?', [partition])
        rows = rows.fetchone()[0]
    finally:
        con.execute("DROP TABLE IF EXISTS incoming")
    return IngestResult(
        partition=partition,
        source_file=str(path),
        file_sha256=digest,
        file_type=kind,
        records=int(records),
        rows=int(rows),
        blank_lines=blank,
    )


def _exploded_sql(explode: str | None) -> str:
    """SELECT of the raw rows from `incoming`, one per element of the `explode` list where there is one.

    A record whose list is missing, empty or not a list of objects stays one row as it is, so that
    validation can say what is wrong with it rather than it vanishing.
    """
    base = "SELECT ?, ?, ?, record_index, {sub}, {record}, read_error, now()::TIMESTAMP FROM {source}"
    if explode is None:
        return base.format(sub="0", record="record", source="incoming")
    key = ("$." + json.dumps(explode)).replace("'", "''")
    drop_key = json.dumps({explode: None}).replace("'", "''")
    return f"""
        WITH marked AS (
            SELECT *, read_error IS NULL AND json_valid(record) AS ok FROM incoming
        ),
        typed AS (
            SELECT *, CASE WHEN ok THEN record ELSE '{{}}' END AS doc FROM marked
        ),
        splittable AS (
            SELECT *, json_type(doc) = 'OBJECT' AND json_type(doc, '{key}') = 'ARRAY'
                      AND json_array_length(doc, '{key}') > 0
                      AND list_bool_and(list_transform(
                          json_type(doc, '{key}[*]'), lambda t: t = 'OBJECT')) AS split
            FROM typed
        ),
        exploded AS (
            SELECT record_index, element_index - 1 AS sub_index,
                   json_merge_patch(json_merge_patch(doc, '{drop_key}'), element)::VARCHAR AS record,
                   read_error
            FROM splittable,
                 unnest(json_extract(doc, '{key}[*]')) WITH ORDINALITY AS e(element, element_index)
            WHERE split
            UNION ALL
            SELECT record_index, 0, record, read_error FROM splittable WHERE NOT split
        )
        {base.format(sub="sub_index", record="record", source="exploded")}
    """


def _load_incoming(con: duckdb.DuckDBPyConnection, path: Path, kind: str) -> int | None:
    """Fill temp table `incoming(record_index, record, read_error)` from the file.

    Returns the number of blank lines skipped, or None where the caller must count them.
    """
    gzipped = path.suffix.lower() == ".gz"
    try:
        if kind == "jsonl":
            return _load_lines(con, path, gzipped)
        if kind == "json":
            _check_json_document(con, path)
            con.execute(
                """
                CREATE OR REPLACE TEMP TABLE incoming AS
                SELECT row_number() OVER () AS record_index, json::VARCHAR AS record, NULL::VARCHAR AS read_error
                FROM read_json_objects(?, format = 'array')
                """,
                [str(path)],
            )
        elif kind == "csv":
            con.execute(
                """
                CREATE OR REPLACE TEMP TABLE incoming AS
                SELECT row_number() OVER () AS record_index, to_json(t)::VARCHAR AS record,
                       NULL::VARCHAR AS read_error
                FROM read_csv(?, all_varchar = true, header = true) t
                """,
                [str(path)],
            )
        else:
            con.execute(
                """
                CREATE OR REPLACE TEMP TABLE incoming AS
                SELECT row_number() OVER () AS record_index, to_json(t)::VARCHAR AS record,
                       NULL::VARCHAR AS read_error
                FROM read_parquet(?) t
                """,
                [str(path)],
            )
    except duckdb.Error as err:
        what = {"json": "a JSON array of objects", "csv": "CSV with a header row", "parquet": "Parquet"}[kind]
        detail = str(err).split("\n")[0]
        raise IngestError(
            f"{path}: cannot be read as {what}: {detail}. Fix the file, or set file_type on the source if it "
            "is stored differently (e.g. file_type: jsonl for one JSON object per line)"
        ) from None
    return 0


def _check_json_document(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """A JSON array file must parse as a whole: DuckDB's array reader stops quietly at a truncation."""
    valid = con.execute("SELECT json_valid(content) FROM read_text(?)", [str(path)]).fetchone()[0]
    if valid:
        return
    try:  # only to say where it breaks
        json.loads(path.read_text(encoding="utf-8"))
        where = ""
    except json.JSONDecodeError as err:
        where = f" at line {err.lineno}, column {err.colno} ({err.msg})"
    except UnicodeDecodeError as err:
        where = f" at byte {err.start} (not UTF-8)"
    raise IngestError(
        f"{path}: is not valid JSON{where}. A .json source must be one JSON array of records; records of "
        "a broken array cannot be told apart, so the whole file is refused and nothing of it is used. "
        "Fix the file, or write one JSON object per line as .jsonl, where a bad line only costs itself"
    )


def _load_lines(con: duckdb.DuckDBPyConnection, path: Path, gzipped: bool) -> int | None:
    """JSON Lines: one row per non-blank line, numbered as in the file (1-based)."""
    if not gzipped:
        try:
            con.execute(
                """
                CREATE OR REPLACE TEMP TABLE incoming AS
                WITH file AS (SELECT string_split(content, chr(10)) AS lines FROM read_text(?)),
                numbered AS (
                    SELECT unnest(lines) AS line, generate_subscripts(lines, 1) AS record_index FROM file
                )
                SELECT record_index, record, NULL::VARCHAR AS read_error
                FROM (
                    -- byte-level tests (starts_with, ends_with) are far cheaper than trim() on long lines
                    SELECT record_index,
                        CASE WHEN ends_with(line, chr(13)) THEN left(line, -1) ELSE line END AS line_,
                        CASE WHEN record_index = 1 AND starts_with(line_, chr(65279)) THEN substr(line_, 2)
                             ELSE line_ END AS record
                    FROM numbered
                )
                WHERE NOT regexp_full_match(record, '\\s*')
                """,
                [str(path)],
            )
            return None
        except duckdb.InvalidInputException as err:
            if "UTF-8" not in str(err):
                raise
    return _load_lines_from_bytes(con, path, gzipped)


def _load_lines_from_bytes(con: duckdb.DuckDBPyConnection, path: Path, gzipped: bool) -> int:
    """The slow path for gzipped files and files with undecodable bytes: split and decode line by line.

    A line that is not UTF-8 keeps its bytes (as backslash escapes) and the read error
    `undecodable_bytes`, so it is quarantined rather than failing the whole file.
    """
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise IngestError(f"{path}: cannot be read{' as gzip' if gzipped else ''}: {err}") from None
    indices, records, errors = [], [], []
    blank = 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        raw = raw.rstrip(b"\r")
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            blank += 1
            continue
        try:
            text, error = raw.decode("utf-8"), None
        except UnicodeDecodeError:
            text, error = raw.decode("utf-8", errors="backslashreplace"), UNDECODABLE
        indices.append(number)
        records.append(text)
        errors.append(error)
    table = pa.table(
        {
            "record_index": pa.array(indices, pa.int64()),
            "record": pa.array(records, pa.string()),
            "read_error": pa.array(errors, pa.string()),
        }
    )
    con.register("incoming_lines", table)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE incoming AS SELECT * FROM incoming_lines")
    finally:
        con.unregister("incoming_lines")
    return blank


def _digest_and_lines(path: Path) -> tuple[str, int]:
    """sha256 of the file and its number of lines (the last counted whether or not it ends in a newline)."""
    digest, newlines, last = hashlib.sha256(), 0, b""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
            newlines += chunk.count(b"\n")
            last = chunk[-1:]
    return digest.hexdigest(), newlines + (1 if last not in (b"", b"\n") else 0)
