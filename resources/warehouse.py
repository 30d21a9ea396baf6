"""The warehouse: every pipeline's raw, validated and quarantined rows, in one DuckDB file (the
default) or as Parquet objects on object storage (`url`, see loraflow/lake.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
from dagster import ConfigurableResource
from pydantic import Field, field_validator

from loraflow.lake import MEMORY_LIMIT, open_lake
from loraflow.mirror import check_url


class Warehouse(ConfigurableResource):
    """A DuckDB database file, or Parquet objects under a URL; each pipeline gets a schema named after it."""

    path: str = Field(
        default=".loraflow/warehouse.duckdb",
        description="The DuckDB file (created if missing); not used when `url` is set.",
    )
    url: str | None = Field(
        default=None,
        description="An fsspec URL of a folder on object storage (s3://bucket/loraflow/warehouse, "
        "file:///srv/lake, memory://test): the tables are Parquet objects there, one per pipeline, "
        "table and partition, so runs on several machines can write different partitions at once. "
        "Unset: the DuckDB file at `path`. s3:// needs the `s3` extra (s3fs).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the URL's fsspec filesystem, e.g. {endpoint_url: http://minio:9000} for "
        "an S3-compatible store. Credentials come from the environment (AWS_ACCESS_KEY_ID, a pod's role), "
        "not from here.",
    )
    memory_limit: str = Field(
        default=MEMORY_LIMIT,
        description="DuckDB's memory limit (e.g. 2GiB, 8GiB); beyond it DuckDB spills to a temporary "
        "folder (beside the database file, `<file>.tmp`), so a large partition slows down rather than "
        "taking the machine's memory.",
    )
    lock_timeout_seconds: float = Field(
        default=120.0,
        description="How long to wait for another process's write lock on the file before failing.",
    )

    @field_validator("url")
    @classmethod
    def _url_has_a_filesystem(cls, url: str | None) -> str | None:
        return check_url(url) if url is not None else None

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection to the warehouse.

        The DuckDB file: DuckDB lets one process write at a time, so this waits for the lock.
        With `url`: an in-memory database loaded from the objects; leaving the block without an
        exception writes back the partitions that changed (concurrent runs may write different
        partitions; for the same partition the last to finish wins)."""
        if self.url:
            with open_lake(self.url, self.storage_options, self.memory_limit) as con:
                yield con
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_seconds
        delay = 0.2
        while True:
            try:
                con = duckdb.connect(self.path, config={"memory_limit": self.memory_limit})
                break
            except duckdb.IOException as err:
                if "lock" not in str(err).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            yield con
        finally:
            con.close()
