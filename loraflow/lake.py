"""The warehouse on object storage: every table as Parquet objects under one fsspec URL.

Layout under the URL (s3://bucket/prefix, file:///folder, memory://name, any fsspec protocol):

    <schema>/_catalog.json                      the schema's CREATE TABLE and CREATE VIEW statements
    <schema>/<table>/partition=<key>.parquet    a table with a `partition` column: one object per partition
    <schema>/<table>/table.parquet              a table without one: one object for the whole table

`<key>` is the partition key percent-encoded, so a key such as `data/a.jsonl` is one object name
and no character of it is a glob pattern. A partition without rows has no object.

`open_lake` yields a DuckDB connection to an in-memory database that holds every table, loaded
from the objects, so SQL written for the DuckDB file runs on it unchanged. When the block ends
without an exception, each partition whose rows changed is written back as its object, the
objects of partitions that no longer have rows are deleted, and every other object is left alone.
A block that raises writes nothing. Each connection reads every table, so this suits warehouses
that fit a run pod's memory (DuckDB spills beyond it to a temporary folder).

Concurrency: runs that change different partitions (one source file each) at the same time are
safe, since each partition is its own object and a run writes back only what it changed. Two runs
that change the same partition at the same time: the last to finish wins, whole (an object is
replaced in one piece: a PUT on an object store, a rename on a local disk). A run that reads while
another is writing back may see some of the other run's partitions updated and some not yet.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import duckdb
import fsspec
from fsspec.implementations.local import LocalFileSystem

PARTITION_COLUMN = "partition"
CATALOG_OBJECT = "_catalog.json"
WHOLE_TABLE_OBJECT = "table.parquet"
LOAD_ATTEMPTS = 3
"""Loads retried when an object vanishes between listing and reading (another run deleted it)."""
MEMORY_LIMIT = "2GiB"
"""DuckDB's memory limit for a warehouse connection; beyond it DuckDB spills to a temporary folder.
DuckDB's own default, 80% of the machine's memory, lets one large partition take the machine."""

Fingerprint = tuple[int, int]
"""(rows, sum of row hashes) of one partition: equal before and after means unchanged."""


class LakeError(RuntimeError):
    """The lake cannot be read or written; the message names the URL and what failed."""


@dataclass(frozen=True)
class Catalog:
    """One schema's DDL: tables by name, views in creation order (a view may read an earlier one)."""

    tables: tuple[tuple[str, str], ...]
    views: tuple[tuple[str, str], ...]

    def to_json(self) -> str:
        return json.dumps({"tables": self.tables, "views": self.views}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        data = json.loads(text)
        return cls(
            tables=tuple((name, sql) for name, sql in data["tables"]),
            views=tuple((name, sql) for name, sql in data["views"]),
        )


@dataclass(frozen=True)
class Snapshot:
    """What the database holds: each schema's catalog, and each table's partitions' fingerprints."""

    catalogs: dict[str, Catalog]
    partitioned: dict[tuple[str, str], bool]
    fingerprints: dict[tuple[str, str], dict[Any, Fingerprint]]


def object_name(key: Any, partitioned: bool) -> str:
    """The object holding one partition of a table (or the whole table)."""
    if not partitioned:
        return WHOLE_TABLE_OBJECT
    if key is None:
        return f"{PARTITION_COLUMN}-null.parquet"
    return f"{PARTITION_COLUMN}={quote(str(key), safe='')}.parquet"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table(schema: str, table: str) -> str:
    return f"{_ident(schema)}.{_ident(table)}"


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Lake:
    """The objects under one URL, read and written by DuckDB through the URL's fsspec filesystem."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.fs._strip_protocol(root).rstrip("/")

    def _fs_path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _duckdb_path(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    # -- reading ---------------------------------------------------------------------------------

    def list_objects(self) -> dict[str, dict[str, list[str]]]:
        """schema -> table -> relative paths of its Parquet objects; a schema's catalog is listed
        under the table name CATALOG_OBJECT. Other objects (temporary uploads) are skipped."""
        try:
            found = self.fs.find(self.root, withdirs=False, detail=False)
        except FileNotFoundError:
            return {}
        layout: dict[str, dict[str, list[str]]] = {}
        prefix = self.root + "/"
        for path in found:
            path = self.fs._strip_protocol(path)
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if len(parts) == 2 and parts[1] == CATALOG_OBJECT:
                layout.setdefault(parts[0], {}).setdefault(CATALOG_OBJECT, []).append("/".join(parts))
            elif len(parts) == 3 and parts[2].endswith(".parquet"):
                layout.setdefault(parts[0], {}).setdefault(parts[1], []).append("/".join(parts))
        return layout

    def load(self, con: duckdb.DuckDBPyConnection) -> None:
        """Create every schema's tables and views in `con` and fill the tables from their objects."""
        for schema, tables in sorted(self.list_objects().items()):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema)}")
            catalog = Catalog((), ())
            if CATALOG_OBJECT in tables:
                catalog = Catalog.from_json(
                    self.fs.cat_file(self._fs_path(f"{schema}/{CATALOG_OBJECT}")).decode()
                )
            declared = dict(catalog.tables)
            for table in sorted(set(declared) | (set(tables) - {CATALOG_OBJECT})):
                files = [self._duckdb_path(p) for p in sorted(tables.get(table, []))]
                if table in declared:
                    con.execute(declared[table])
                    if files:
                        con.execute(
                            f"INSERT INTO {_table(schema, table)} BY NAME "
                            "SELECT * FROM read_parquet(?, union_by_name = true)",
                            [files],
                        )
                else:  # objects put there without a catalog entry: their own columns make the table
                    con.execute(
                        f"CREATE TABLE {_table(schema, table)} AS "
                        "SELECT * FROM read_parquet(?, union_by_name = true)",
                        [files],
                    )
            for _, sql in catalog.views:
                con.execute(sql)

    # -- writing ---------------------------------------------------------------------------------

    def write_back(self, con: duckdb.DuckDBPyConnection, before: Snapshot) -> None:
        """Write the partitions that changed since `before` and delete those that emptied."""
        after = snapshot(con)
        for schema in sorted(set(before.catalogs) | set(after.catalogs)):
            if schema not in after.catalogs:
                self._remove(schema, recursive=True)
                continue
            catalog = after.catalogs[schema]
            if catalog != before.catalogs.get(schema):
                # the catalog first: no reader ever finds objects of a table it has no DDL for
                self._write_catalog(schema, catalog)
            old_tables = dict(before.catalogs[schema].tables) if schema in before.catalogs else {}
            for table in sorted(set(old_tables) - dict(catalog.tables).keys()):
                self._remove(f"{schema}/{table}", recursive=True)
            for table, _ in catalog.tables:
                self._write_table(con, schema, table, before, after)

    def _write_catalog(self, schema: str, catalog: Catalog) -> None:
        data = catalog.to_json().encode()
        self._replace(
            f"{schema}/{CATALOG_OBJECT}", lambda written: self.fs.pipe_file(self._fs_path(written), data)
        )

    def _write_table(self, con, schema: str, table: str, before: Snapshot, after: Snapshot) -> None:
        key = (schema, table)
        partitioned = after.partitioned[key]
        old = before.fingerprints.get(key, {})
        if before.partitioned.get(key, partitioned) != partitioned:
            # the partition column came or went: every old object is named the other way
            for partition in old:
                self._remove(f"{schema}/{table}/{object_name(partition, not partitioned)}")
            old = {}
        new = after.fingerprints[key]
        for partition, fingerprint in new.items():
            if old.get(partition) != fingerprint:
                self._write_partition(con, schema, table, partition, partitioned)
        for partition in old.keys() - new.keys():
            self._remove(f"{schema}/{table}/{object_name(partition, partitioned)}")

    def _write_partition(self, con, schema: str, table: str, partition: Any, partitioned: bool) -> None:
        query, params = f"SELECT * FROM {_table(schema, table)}", []
        if partitioned:
            query += f" WHERE {_ident(PARTITION_COLUMN)} IS NOT DISTINCT FROM ?"
            params = [partition]
        self._replace(
            f"{schema}/{table}/{object_name(partition, partitioned)}",
            lambda written: con.execute(
                f"COPY ({query}) TO {_sql_literal(self._duckdb_path(written))} (FORMAT parquet, COMPRESSION zstd)",
                params,
            ),
        )

    def _replace(self, relative: str, write: Callable[[str], object]) -> None:
        """Put an object in one piece: `write(path)` writes it. An object store replaces an object in
        one PUT already; a local file is written beside its place and renamed over it."""
        if not isinstance(self.fs, LocalFileSystem):
            write(relative)
            return
        self.fs.makedirs(self._fs_path(relative.rsplit("/", 1)[0]), exist_ok=True)
        written = f"{relative}.{uuid.uuid4().hex}.tmp"
        write(written)
        self.fs.mv(self._fs_path(written), self._fs_path(relative))

    def _remove(self, relative: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):  # another run removed it first
            self.fs.rm(self._fs_path(relative), recursive=recursive)


def snapshot(con: duckdb.DuckDBPyConnection) -> Snapshot:
    """The catalogs and partition fingerprints of every persistent table and view in `con`."""
    # temporary tables and registered frames live in the `temp` database: never written back
    persistent = "database_name = current_database() AND NOT internal"
    tables = con.execute(
        f"SELECT schema_name, table_name, sql FROM duckdb_tables() WHERE {persistent} ORDER BY 1, 2"
    ).fetchall()
    views = con.execute(
        f"SELECT schema_name, view_name, sql FROM duckdb_views() WHERE {persistent} ORDER BY view_oid"
    ).fetchall()
    with_partitions = set(
        con.execute(
            f"SELECT schema_name, table_name FROM duckdb_columns() WHERE {persistent} AND column_name = ?",
            [PARTITION_COLUMN],
        ).fetchall()
    )
    table_ddl: dict[str, list[tuple[str, str]]] = {}
    view_ddl: dict[str, list[tuple[str, str]]] = {}
    for schema, name, sql in tables:
        table_ddl.setdefault(schema, []).append((name, sql))
    for schema, name, sql in views:
        view_ddl.setdefault(schema, []).append((name, sql))
    catalogs = {
        schema: Catalog(tuple(table_ddl.get(schema, ())), tuple(view_ddl.get(schema, ())))
        for schema in set(table_ddl) | set(view_ddl)
    }
    partitioned = {(schema, name): (schema, name) in with_partitions for schema, name, _ in tables}
    fingerprints = {key: _fingerprints(con, *key, partitioned[key]) for key in partitioned}
    return Snapshot(catalogs, partitioned, fingerprints)


def _fingerprints(con, schema: str, table: str, partitioned: bool) -> dict[Any, Fingerprint]:
    """Per partition (None for an unpartitioned table): rows and the sum of the rows' hashes."""
    key = _ident(PARTITION_COLUMN) if partitioned else "NULL"
    rows = con.execute(
        f"SELECT {key}, count(*), sum(hash(lake_row)::HUGEINT) FROM {_table(schema, table)} AS lake_row "
        "GROUP BY ALL"
    ).fetchall()
    return {partition: (int(count), int(total)) for partition, count, total in rows}


@contextlib.contextmanager
def open_lake(
    url: str, storage_options: dict[str, Any] | None = None, memory_limit: str = MEMORY_LIMIT
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to an in-memory database holding the lake at `url`; a clean exit writes the
    changed partitions back (see the module's docstring for what is written and when)."""
    lake = Lake(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="loraflow-lake-") as spill:
        con = _loaded(lake, spill, memory_limit)
        try:
            before = snapshot(con)
            yield con
            try:
                lake.write_back(con, before)
            except (duckdb.Error, OSError) as err:
                raise LakeError(
                    f"{lake.url}: writing the warehouse's changed partitions back failed: {err}. "
                    "Partitions written before the failure are stored; materialize the failed ones again"
                ) from err
        finally:
            con.close()


def _loaded(lake: Lake, spill: str, memory_limit: str) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory database with the lake loaded, retrying a load that raced a deletion."""
    error: Exception | None = None
    for _ in range(LOAD_ATTEMPTS):
        # beyond memory, DuckDB spills to a private folder rather than to the working directory
        con = duckdb.connect(config={"temp_directory": spill, "memory_limit": memory_limit})
        try:
            con.register_filesystem(lake.fs)
            lake.load(con)
            return con
        except (duckdb.IOException, OSError) as err:
            con.close()
            error = err
        except BaseException:
            con.close()
            raise
    raise LakeError(f"{lake.url}: cannot load the warehouse: {error}") from error
