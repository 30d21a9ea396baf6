"""The artifact store (datasets, adapters, models on disk, and on object storage when `url` is set)
and the IO manager for asset manifests."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext
from pydantic import Field, ValidationError, field_validator

from loraflow.artifacts import write_json_atomic, write_text_atomic
from loraflow.manifests import MANIFESTS, EvaluationManifest, Manifest
from loraflow.merge import LATEST
from loraflow.mirror import BucketMirror, MirrorError, check_url


class ArtifactStore(ConfigurableResource):
    """A local folder holding every artifact, laid out by kind and pipeline, and optionally its copy
    on object storage.

    `<root>/base_models/<name>`, `<root>/datasets/<pipeline>/<version>`,
    `<root>/adapters/<pipeline>/<version>`, `<root>/models/<pipeline>/<version>` (+ `latest`),
    `<root>/reports/<pipeline>/`.

    With `url`, the root is this machine's working copy: each finished artifact is uploaded to the
    same relative place under the URL (ManifestIOManager does it when the asset that wrote it ends),
    and one missing here is downloaded from there when a later asset needs it (loraflow/mirror.py
    says how a reader never sees half of one).
    """

    root: str = Field(
        default=".loraflow",
        description="Folder for all artifacts (created if missing). With `url`, this machine's working "
        "copy, at the same path on every machine (manifests name artifacts by their path).",
    )
    url: str | None = Field(
        default=None,
        description="An fsspec URL of a folder on object storage (s3://bucket/loraflow/store) that keeps "
        "every finished artifact, for machines that share no volume: uploaded when its asset ends, "
        "downloaded when a machine's working copy lacks it. Unset: the local root only. s3:// needs the "
        "`s3` extra (s3fs).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the URL's fsspec filesystem, e.g. {endpoint_url: http://minio:9000} for "
        "an S3-compatible store. Credentials come from the environment (AWS_ACCESS_KEY_ID, a pod's role), "
        "not from here.",
    )

    @field_validator("url")
    @classmethod
    def _url_has_a_filesystem(cls, url: str | None) -> str | None:
        return check_url(url) if url is not None else None

    def folder(self, *parts: str) -> Path:
        """A folder under the store's root, created if missing."""
        path = Path(self.root).resolve().joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, *parts: str) -> Path:
        """A path under the store's root (its parent folders are created)."""
        path = Path(self.root).resolve().joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def relative(self, path: Path) -> str | None:
        """`path`'s place under the root (POSIX), None when it lies outside (a local base model)."""
        absolute = Path(os.path.abspath(path))  # not resolved: a linked folder in the store is the store's
        root = Path(self.root).resolve()
        return absolute.relative_to(root).as_posix() if absolute.is_relative_to(root) else None

    def upload(self, path: Path) -> None:
        """Copy a finished artifact under the root (a folder or one file) to `url`; a folder's
        `latest` pointer, when the folder beside it names this one, follows it. Nothing to do
        without `url` or for a path outside the root."""
        relative = self.relative(path)
        mirror = self._mirror()
        if mirror is None or relative is None:
            return
        path = Path(path)
        with _reporting(f"uploading {path} to {mirror.location(relative)}"):
            if path.is_dir():
                mirror.upload_folder(path, relative)
                pointer = path.parent / LATEST
                if pointer.is_file() and pointer.read_text().strip() == path.name:
                    mirror.upload_file(pointer, str(Path(relative).parent / LATEST))
            else:
                mirror.upload_file(path, relative)

    def fetch(self, path: Path) -> Path:
        """`path` from the working copy, downloaded from `url` first when it is missing here (a complete
        folder, or one object). FileNotFoundError when neither has it."""
        path = Path(path)
        if path.exists():
            return path
        relative = self.relative(path)
        mirror = self._mirror()
        if mirror is None or relative is None:
            raise FileNotFoundError(f"{path} does not exist")
        with _reporting(f"downloading {mirror.location(relative)}"):
            if mirror.download_folder(relative, path) or mirror.download_file(relative, path):
                return path
        raise FileNotFoundError(
            f"{path} is not in this working copy, and {mirror.location(relative)} holds no complete copy "
            "(never uploaded, or its upload did not finish)"
        )

    def fetch_latest(self, *parts: str) -> Path:
        """The folder `<root>/<parts>`, whose `latest` pointer and the version it names follow `url`'s
        when set (the pointer there is the one every machine shares); returns the local folder."""
        folder = self.folder(*parts)
        mirror = self._mirror()
        if mirror is None:
            return folder
        relative = self.relative(folder)
        with _reporting(f"reading {mirror.location(relative)}/{LATEST}"):
            pointer = mirror.read_text(f"{relative}/{LATEST}")
        if pointer is not None:
            self.fetch(folder / pointer.strip())
            write_text_atomic(folder / LATEST, pointer)
        return folder

    def _mirror(self) -> BucketMirror | None:
        return BucketMirror(self.url, self.storage_options) if self.url else None


@contextlib.contextmanager
def _reporting(action: str) -> Iterator[None]:
    """Whatever the URL's filesystem raises (each library has its own errors: botocore's, aiohttp's)
    as one MirrorError naming the setting to check."""
    try:
        yield
    except MirrorError:
        raise
    except Exception as err:
        raise MirrorError(
            f"store.url: {action} failed: {err}. Check store.url, store.storage_options (endpoint_url) "
            "and the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        ) from err


def artifact_paths(manifest: Manifest) -> list[Path]:
    """What a manifest points at in the store: its `path` (a folder), and for an evaluation the folder
    of its report."""
    if isinstance(manifest, EvaluationManifest):
        return [Path(manifest.report).parent]
    path = getattr(manifest, "path", None)
    return [Path(path)] if isinstance(path, str) else []


class ManifestIOManager(ConfigurableIOManager):
    """Stores each asset's value, a small JSON manifest (paths, versions, counts), as a JSON file.

    Heavy artifacts never pass through here: manifests point at them. JSON rather than pickle,
    so loading an upstream value can never run code.

    With `url` (the artifact store's), an output's artifacts under the root are uploaded when its
    asset ends, then its manifest, so a manifest on object storage only ever names whole artifacts;
    an input's manifest and artifacts missing from this machine's working copy are downloaded.
    """

    root: str = Field(
        default=".loraflow", description="The artifact store's root; manifests go under manifests/."
    )
    url: str | None = Field(
        default=None,
        description="The artifact store's `url`: manifests and the artifacts they name are kept there too.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="The artifact store's `storage_options`."
    )

    @field_validator("url")
    @classmethod
    def _url_has_a_filesystem(cls, url: str | None) -> str | None:
        return check_url(url) if url is not None else None

    def _store(self) -> ArtifactStore:
        return ArtifactStore(root=self.root, url=self.url, storage_options=self.storage_options)

    def _file(self, context: InputContext | OutputContext) -> Path:
        return Path(self.root).resolve() / "manifests" / Path(*context.asset_key.path).with_suffix(".json")

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        if obj is None:
            return
        model = MANIFESTS.get(context.asset_key.path[-1])
        if model is not None and not isinstance(obj, model):
            raise TypeError(
                f"{context.asset_key.to_user_string()} must output a {model.__name__}, not {type(obj).__name__}"
            )
        path = self._file(context)
        write_json_atomic(path, obj.model_dump(mode="json") if isinstance(obj, Manifest) else obj)
        if self.url:
            store = self._store()
            for artifact in artifact_paths(obj) if isinstance(obj, Manifest) else []:
                store.upload(artifact)
            store.upload(path)  # last: the manifest never names an artifact that is not up yet

    def load_input(self, context: InputContext) -> Any:
        """The upstream manifest, as its typed model (loraflow.manifests) where the stage has one."""
        path = self._file(context)
        name = context.asset_key.to_user_string()
        store = self._store()
        try:
            store.fetch(path)
        except FileNotFoundError:
            where = f" here or at {self.url}" if self.url else ""
            raise FileNotFoundError(f"{path}: no manifest for {name}{where}; materialize it first") from None
        value = json.loads(path.read_text())
        model = MANIFESTS.get(context.asset_key.path[-1])
        if model is None:
            return value
        try:
            manifest = model.model_validate(value)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors()
            )
            raise ValueError(
                f"{path}: the manifest of {name} does not match {model.__name__} ({problems}); it was written "
                f"by another version of loraflow: materialize {name} again"
            ) from None
        if self.url:
            for artifact in artifact_paths(manifest):
                try:
                    store.fetch(artifact)
                except FileNotFoundError as err:
                    raise FileNotFoundError(f"{name}: {err}; materialize {name} again") from None
        return manifest
