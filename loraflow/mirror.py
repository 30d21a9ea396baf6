"""The artifact store's copy on object storage: finished artifacts go up, missing ones come down.

Layout under the URL (s3://bucket/prefix, file:///folder, memory://name, any fsspec protocol): the
local store's own, `<kind>/<pipeline>/<version>/...` (datasets, adapters, models, reports, base
models) beside `manifests/<pipeline>/<asset>.json` and each `models/<pipeline>/latest`.

A folder is complete on object storage once its marker object `_SUCCESS` exists, listing the
folder's files with their sizes and sha256. An upload removes the marker first, puts every file,
and puts the marker last; a download takes only a folder with a marker, exactly the files the
marker lists, and checks their sizes. So a reader never takes an upload that is under way, or one
that died halfway, for a whole version. A folder the bucket already holds, file for file (the
marker's listing equals the local one), is not uploaded again: readers of it are never interrupted.
A single object (a manifest, a `latest` pointer) is replaced in one PUT. Whoever writes a pointer
writes it after the folder it names, and a manifest after the artifacts it points at.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from loraflow.artifacts import atomic_dir, file_sha256

MARKER = "_SUCCESS"
"""The object that makes a folder complete on object storage: written last, it lists the folder's files."""


class MirrorError(RuntimeError):
    """Object storage cannot be reached or holds an artifact that is not whole; the message says which."""


def check_url(url: str) -> str:
    """`url`, when fsspec knows its protocol and the protocol's package is installed; else a
    ValueError saying what to install or write instead."""
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ValueError(
            f"{url}: fsspec knows no protocol {protocol!r} (s3://, gs://, file://, ...)"
        ) from None
    except ImportError as err:
        raise ValueError(f"{url}: {err}; for s3:// install the `s3` extra: pip install '.[s3]'") from None
    return url


class BucketMirror:
    """Folders and files under one fsspec URL, copied to and from local paths."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.fs._strip_protocol(root).rstrip("/")

    def location(self, relative: str) -> str:
        """The URL of an object or folder, for messages."""
        return f"{self.url}/{relative}"

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    # -- writing ---------------------------------------------------------------------------------

    def upload_folder(self, local: Path, relative: str) -> None:
        """Put every file of `local` under `relative`, then the marker that makes it complete;
        nothing when the bucket holds these very files there already."""
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        names = [p.relative_to(local).as_posix() for p in files]
        if MARKER in names:
            raise MirrorError(f"{local}: a file named {MARKER} would be taken for the completion marker")
        listing = {
            name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            for name, path in zip(names, files, strict=True)
        }
        if self._listing(relative) == listing:
            return
        # until the new marker is written, readers see the folder as incomplete, never as half old, half new
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(f"{relative}/{MARKER}"))
        if files:
            self.fs.put([str(p) for p in files], [self._path(f"{relative}/{n}") for n in names])
        marker = json.dumps({"files": listing}, indent=1, sort_keys=True).encode()
        self.fs.pipe_file(self._path(f"{relative}/{MARKER}"), marker)

    def upload_file(self, local: Path, relative: str) -> None:
        """Put one file as one object (replaced whole)."""
        self.fs.put_file(str(local), self._path(relative))

    # -- reading ---------------------------------------------------------------------------------

    def download_folder(self, relative: str, local: Path) -> bool:
        """The complete folder at `relative` into `local` (a temporary sibling renamed into place);
        False when there is none. A file missing or of another size than the marker says raises."""
        listing = self._listing(relative)
        if listing is None:
            return False
        with atomic_dir(Path(local)) as tmp:
            targets = [tmp / name for name in listing]
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if listing:
                    self.fs.get([self._path(f"{relative}/{n}") for n in listing], [str(t) for t in targets])
            except FileNotFoundError as err:
                raise MirrorError(
                    f"{self.location(relative)}: a file its {MARKER} lists is missing ({err}); "
                    "materialize the asset that wrote it again"
                ) from None
            wrong = [
                name
                for name, target in zip(listing, targets, strict=True)
                if target.stat().st_size != listing[name]["bytes"]
            ]
            if wrong:
                raise MirrorError(
                    f"{self.location(relative)}: {', '.join(wrong)} differ in size from what {MARKER} lists; "
                    "another upload of this folder is under way, or it was changed by hand"
                )
        return True

    def download_file(self, relative: str, local: Path) -> bool:
        """One object into `local` (a temporary sibling renamed into place); False when there is none."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.tmp-", dir=local.parent)
        os.close(fd)
        try:
            self.fs.get_file(self._path(relative), tmp)
            os.replace(tmp, local)
            return True
        except FileNotFoundError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_text(self, relative: str) -> str | None:
        """The text of one small object (a pointer), or None when there is none."""
        try:
            return self.fs.cat_file(self._path(relative)).decode()
        except FileNotFoundError:
            return None

    def _listing(self, relative: str) -> dict[str, dict[str, Any]] | None:
        """What the marker of the folder at `relative` lists, or None when the folder is not complete."""
        try:
            return json.loads(self.fs.cat_file(self._path(f"{relative}/{MARKER}")))["files"]
        except FileNotFoundError:
            return None
