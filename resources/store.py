"""The artifact store (datasets, adapters, models on disk) and the IO manager for asset manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dagster import ConfigurableIOManager, ConfigurableResource, InputContext, OutputContext
from pydantic import Field, ValidationError

from loraflow.artifacts import write_json_atomic
from loraflow.manifests import MANIFESTS, Manifest


class ArtifactStore(ConfigurableResource):
    """A local folder holding every artifact, laid out by kind and pipeline.

    `<root>/base_models/<name>`, `<root>/datasets/<pipeline>/<version>`,
    `<root>/adapters/<pipeline>/<version>`, `<root>/models/<pipeline>/<version>` (+ `latest`),
    `<root>/reports/<pipeline>/`.
    """

    root: str = Field(default=".loraflow", description="Folder for all artifacts (created if missing).")

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


class ManifestIOManager(ConfigurableIOManager):
    """Stores each asset's value, a small JSON manifest (paths, versions, counts), as a JSON file.

    Heavy artifacts never pass through here: manifests point at them. JSON rather than pickle,
    so loading an upstream value can never run code.
    """

    root: str = Field(
        default=".loraflow", description="The artifact store's root; manifests go under manifests/."
    )

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
        write_json_atomic(
            self._file(context), obj.model_dump(mode="json") if isinstance(obj, Manifest) else obj
        )

    def load_input(self, context: InputContext) -> Any:
        """The upstream manifest, as its typed model (loraflow.manifests) where the stage has one."""
        path = self._file(context)
        name = context.asset_key.to_user_string()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no manifest for {name}; materialize it first")
        value = json.loads(path.read_text())
        model = MANIFESTS.get(context.asset_key.path[-1])
        if model is None:
            return value
        try:
            return model.model_validate(value)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors()
            )
            raise ValueError(
                f"{path}: the manifest of {name} does not match {model.__name__} ({problems}); it was written "
                f"by another version of loraflow: materialize {name} again"
            ) from None
