"""Raw ingestion: every record of a source file into the warehouse, untouched, with where it came from.

One call loads one partition (one source file) into `<pipeline>.raw_examples`, replacing what that
partition held before. JSON Lines (also gzipped) are split into lines here, 64 MiB at a time, and
stored by DuckDB block by block, so memory stays bounded whatever the file's size; DuckDB reads a
JSON array, CSV (also gzipped) or Parquet itself. Nothing is judged here; validation does that, so a
line that is not even JSON, or not even UTF-8, still arrives and can be quarantined with a reason.
A file that cannot be read at all (a truncated .gz) raises IngestError before anything is replaced.

Each raw row carries the partition, the source file and its sha256, the record index (the line
number for JSON Lines, the 1-based position otherwise), a sub-index (the element of an exploded
list, 0 otherwise), the record as text, a read error if the bytes could not be decoded, and the
ingestion time.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from loraflow.artifacts import file_sha256
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
LINE_BLOCK_BYTES = 1 << 26
"""JSON Lines are read this many bytes (64 MiB) at a time, in whole lines."""


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
    try:
        # hashing reads the file in Python while DuckDB parses it: both release the GIL, so they overlap
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashing = pool.submit(file_sha256, path)
            blank = _load_incoming(con, path, kind)
            digest = hashing.result()
        records = con.execute("SELECT count(*) FROM incoming").fetchone()[0]
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


def _load_incoming(con: duckdb.DuckDBPyConnection, path: Path, kind: str) -> int:
    """Fill temp table `incoming(record_index, record, read_error)` from the file; returns the number
    of blank lines skipped (JSON Lines only)."""
    gzipped = path.suffix.lower() == ".gz"
    if kind == "jsonl":
        return _load_lines(con, path, gzipped)
    try:
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
            _load_parquet(con, path)
    except duckdb.Error as err:
        what = {"json": "a JSON array of objects", "csv": "CSV with a header row", "parquet": "Parquet"}[kind]
        detail = str(err).split("\n")[0]
        raise IngestError(
            f"{path}: cannot be read as {what}: {detail}. Fix the file, or set file_type on the source if it "
            "is stored differently (e.g. file_type: jsonl for one JSON object per line)"
        ) from None
    return 0


def _load_parquet(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Parquet: one record per row, the row's columns as a JSON object.

    A binary column (text written without Parquet's UTF-8 annotation, as some writers do) is decoded
    as UTF-8; a row whose bytes are not UTF-8 keeps them as backslash escapes and the read error
    `undecodable_bytes`. Other types stay what they are: a number where text belongs is `wrong_type`
    in validation, like the same number in a JSON Lines record.
    """
    columns = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(path)]).fetchall()
    fields, undecodable = [], []
    for name, kind, *_ in columns:
        column = '"' + name.replace('"', '""') + '"'
        if kind == "BLOB":
            fields.append(f"{column} := coalesce(try(decode({column})), {column}::VARCHAR)")
            undecodable.append(f"({column} IS NOT NULL AND try(decode({column})) IS NULL)")
        else:
            fields.append(f"{column} := {column}")
    error = f"CASE WHEN {' OR '.join(undecodable)} THEN '{UNDECODABLE}' END" if undecodable else "NULL"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE incoming AS
        SELECT row_number() OVER () AS record_index, to_json(struct_pack({", ".join(fields)}))::VARCHAR AS record,
               {error}::VARCHAR AS read_error
        FROM read_parquet(?)
        """,
        [str(path)],
    )


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


def _load_lines(con: duckdb.DuckDBPyConnection, path: Path, gzipped: bool) -> int:
    """JSON Lines, a block of whole lines at a time: one row per non-blank line, numbered as in the
    file (1-based). Returns the number of blank lines.

    Reading in blocks keeps memory bounded whatever the file's size (DuckDB spills `incoming` to disk
    beyond its memory limit). A block that is not UTF-8 is decoded line by line: a line that is not
    UTF-8 keeps its bytes (as backslash escapes) and the read error `undecodable_bytes`, so it is
    quarantined rather than failing the whole file.
    """
    con.execute(
        "CREATE OR REPLACE TEMP TABLE incoming (record_index BIGINT, record VARCHAR, read_error VARCHAR)"
    )
    lines = kept = 0
    for table in _numbered_blocks(path, gzipped):
        con.register("incoming_block", table)
        try:
            kept += con.execute(
                """
                INSERT INTO incoming
                SELECT record_index, record, read_error
                FROM (
                    -- byte-level tests (starts_with, ends_with) are far cheaper than trim() on long lines
                    SELECT record_index, read_error,
                        CASE WHEN record_index = 1 AND starts_with(line_, chr(65279)) THEN substr(line_, 2)
                             ELSE line_ END AS record
                    FROM (
                        SELECT *, CASE WHEN ends_with(line, chr(13)) THEN left(line, -1) ELSE line END AS line_
                        FROM incoming_block
                    )
                )
                WHERE NOT regexp_full_match(record, '\\s*')
                """
            ).fetchone()[0]
        finally:
            con.unregister("incoming_block")
        lines += table.num_rows
    return lines - kept


def _numbered_blocks(path: Path, gzipped: bool) -> Iterator[pa.Table]:
    """The file's lines as tables of about LINE_BLOCK_BYTES, numbered from 1; the next block is read
    and split in a thread while the caller stores the current one (both release the GIL)."""
    blocks = _line_blocks(path, gzipped)
    first = 1

    def next_table(first: int) -> pa.Table | None:
        block = next(blocks, None)
        return None if block is None else _block_lines(block, first)

    with ThreadPoolExecutor(max_workers=1) as pool:
        coming = pool.submit(next_table, first)
        while (table := coming.result()) is not None:
            first += table.num_rows
            coming = pool.submit(next_table, first)
            yield table


def _line_blocks(path: Path, gzipped: bool) -> Iterator[bytes]:
    """The file's bytes (decompressed for .gz) in blocks of about LINE_BLOCK_BYTES that end at a line's
    end (a line longer than a block ends its block); the last block may lack the final newline."""
    opener = gzip.open if gzipped else open
    try:
        handle = opener(path, "rb")
    except OSError as err:
        raise IngestError(f"{path}: cannot be opened: {err}") from None
    with handle:
        while True:
            try:
                block = handle.read(LINE_BLOCK_BYTES)
                if block and not block.endswith(b"\n"):
                    block += handle.readline()
            except (OSError, EOFError, zlib.error) as err:
                what = " as gzip (cut short or damaged?)" if gzipped else ""
                raise IngestError(
                    f"{path}: cannot be read{what}: {err}. Nothing of the file is stored; the partition "
                    "keeps what it held before. Copy or compress the file again and re-run the partition"
                ) from None
            if not block:
                return
            yield block


def _block_lines(block: bytes, first: int) -> pa.Table:
    """The lines of one block as a table (record_index, line, read_error), numbered from `first`."""
    whole = pa.LargeBinaryArray.from_buffers(  # the block's bytes as one value, not copied
        pa.large_binary(), 1, [None, pa.array([0, len(block)], pa.int64()).buffers()[1], pa.py_buffer(block)]
    )
    try:
        text = whole.cast(pa.large_string())  # checks that the bytes are UTF-8
    except pa.ArrowInvalid:
        lines, errors = _decoded_line_by_line(block)
    else:
        # split in Arrow: no Python object per line
        lines = pc.split_pattern(text, "\n").flatten()
        if block.endswith(b"\n"):  # the empty piece after the last newline is not a line
            lines = lines.slice(0, len(lines) - 1)
        errors = pa.nulls(len(lines), pa.string())
    table = pa.table(
        {
            "record_index": pa.array(range(first, first + len(lines)), pa.int64()),
            "line": lines,
            "read_error": errors,
        }
    )
    # DuckDB scans a registered table's record batches in parallel: one batch would use one thread
    return pa.Table.from_batches(table.to_batches(max_chunksize=16_384))


def _decoded_line_by_line(block: bytes) -> tuple[pa.Array, pa.Array]:
    """A block that is not all UTF-8: each line decoded alone; one that is not UTF-8 keeps its bytes as
    backslash escapes and the read error `undecodable_bytes`."""
    pieces = block.split(b"\n")
    if block.endswith(b"\n"):
        pieces.pop()
    lines, errors = [], []
    for raw in pieces:
        try:
            lines.append(raw.decode("utf-8"))
            errors.append(None)
        except UnicodeDecodeError:
            lines.append(raw.decode("utf-8", errors="backslashreplace"))
            errors.append(UNDECODABLE)
    return pa.array(lines, pa.large_string()), pa.array(errors, pa.string())
