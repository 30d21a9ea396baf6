"""The warehouse: one DuckDB file holding every pipeline's raw, validated and quarantined rows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
from dagster import ConfigurableResource
from pydantic import Field


class Warehouse(ConfigurableResource):
    """A DuckDB database file; each pipeline gets a schema named after it."""

    path: str = Field(
        default=".loraflow/warehouse.duckdb", description="The DuckDB file (created if missing)."
    )
    lock_timeout_seconds: float = Field(
        default=120.0,
        description="How long to wait for another process's write lock on the file before failing.",
    )

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection to the file. DuckDB lets one process write at a time: wait for the lock."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout_seconds
        delay = 0.2
        while True:
            try:
                con = duckdb.connect(self.path)
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
