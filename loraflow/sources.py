"""Which source files exist, what their content hash is, and what changed since they were ingested.

Hashing is cached by (size, modification time), so a scan of unchanged files reads no bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraflow.artifacts import file_sha256
from loraflow.spec import PipelineSpec


@dataclass(frozen=True)
class SourceFile:
    key: str
    """The partition key: the path relative to the project root, or absolute outside it."""
    path: Path
    sha256: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SourceChanges:
    added: list[str]
    """Files with no partition yet."""
    changed: list[str]
    """Files with a partition whose content differs from what was last ingested (or never ingested)."""
    removed: list[str]
    """Partitions whose file is gone."""

    @property
    def to_ingest(self) -> list[str]:
        return sorted(self.added + self.changed)


def scan_sources(spec: PipelineSpec, cache: dict[str, dict] | None = None) -> dict[str, SourceFile]:
    """Every source file of the pipeline with its sha256; `cache` maps key -> {sha256, size, mtime_ns}."""
    cache = cache or {}
    files = {}
    for key, (path, _) in spec.partitions().items():
        stat = path.stat()
        known = cache.get(key)
        if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
            digest = known["sha256"]
        else:
            digest = file_sha256(path)
        files[key] = SourceFile(
            key=key, path=path, sha256=digest, size=stat.st_size, mtime_ns=stat.st_mtime_ns
        )
    return files


def hash_cache(files: dict[str, SourceFile]) -> dict[str, dict]:
    """The cache to keep for the next scan."""
    return {f.key: {"sha256": f.sha256, "size": f.size, "mtime_ns": f.mtime_ns} for f in files.values()}


def diff_sources(
    files: dict[str, SourceFile],
    partitions: set[str],
    ingested: dict[str, str],
    rules_changed: set[str] = frozenset(),
) -> SourceChanges:
    """Compare files on disk with the known partitions and the sha256 each partition was ingested from.

    `rules_changed` names partitions validated under other rules than the current ones: they count
    as changed even when their file is not.
    """
    added = sorted(k for k in files if k not in partitions)
    changed = sorted(
        k for k, f in files.items() if k in partitions and (ingested.get(k) != f.sha256 or k in rules_changed)
    )
    removed = sorted(partitions - set(files))
    return SourceChanges(added=added, changed=changed, removed=removed)
