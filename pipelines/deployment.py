"""The resources of a deployment: the embedded defaults, or those a resources YAML describes.

    LORAFLOW_DEPLOYMENT=deploy/resources.yaml dagster dev -m pipelines.definitions

Without LORAFLOW_DEPLOYMENT everything lives under the artifact home (a DuckDB file, a local
store, training in the step's process). With it, each top-level key of the file configures one
resource: `warehouse`, `store`, `trainer`, `io_manager` and `hub`, with the fields of their classes
in resources/; a key left out keeps its default under the home (`io_manager` follows `store`: its
root, url and storage options).

A field that takes a string or a number may be written `{env: NAME}`: the environment variable
NAME, read when the definitions load, so that the resources work outside runs too (the command-line
runner opens the warehouse itself). A secret field (the hub token) takes it as Dagster's EnvVar
instead: read only when a run that uses it starts, and shown by name in the UI; a secret's value is
never written in the file. Values inside mappings and lists (trainer.env, node_selector) are taken
as written.

An unknown key, a wrong value, an unset variable: one error naming the file and the key path.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from dagster import EnvVar
from pydantic import BaseModel, ValidationError

from resources import ArtifactStore, HubPublisher, ManifestIOManager, Trainer, Warehouse

DEPLOYMENT_ENV = "LORAFLOW_DEPLOYMENT"
RESOURCE_CLASSES: dict[str, type[BaseModel]] = {
    "warehouse": Warehouse,
    "store": ArtifactStore,
    "trainer": Trainer,
    "io_manager": ManifestIOManager,
    "hub": HubPublisher,
}
SCALARS = (str, int, float, bool)


class DeploymentError(ValueError):
    """A resources YAML that cannot be used; the message names the file and the key."""


def default_resources(home: Path) -> dict:
    """The embedded defaults: everything stored under `home`, training in the step's process."""
    return {
        "warehouse": Warehouse(path=str(home / "warehouse.duckdb")),
        "store": ArtifactStore(root=str(home)),
        "trainer": Trainer(),
        "io_manager": ManifestIOManager(root=str(home)),
        # read when a run that uploads starts; runs that do not upload never need HF_TOKEN
        "hub": HubPublisher(token=EnvVar("HF_TOKEN")),
    }


def deployment_resources(home: Path) -> dict:
    """The resources every pipeline shares: from the YAML that LORAFLOW_DEPLOYMENT names, else the
    defaults under `home`."""
    path = os.environ.get(DEPLOYMENT_ENV)
    if not path:
        return default_resources(home)
    return load_resources(Path(path), home)


def load_resources(path: Path, home: Path) -> dict:
    """The resources a deployment YAML describes; what it leaves out keeps its default under `home`."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DeploymentError(
            f"{path}: cannot read the deployment's resources file ({err.strerror}); "
            f"{DEPLOYMENT_ENV} must name a YAML file"
        ) from None
    except yaml.YAMLError as err:
        raise DeploymentError(f"{path}: not valid YAML: {err}") from None
    document = document or {}
    if not isinstance(document, dict):
        raise DeploymentError(
            f"{path}: expected a mapping of resources ({', '.join(RESOURCE_CLASSES)}), got a {type(document).__name__}"
        )
    resources = default_resources(home)
    for name, section in document.items():
        if name not in RESOURCE_CLASSES:
            raise DeploymentError(
                f"{path}: unknown resource {name!r}; the resources are: {', '.join(RESOURCE_CLASSES)}"
            )
        resources[name] = _build(path, name, RESOURCE_CLASSES[name], section or {})
    if "io_manager" not in document and "store" in document:
        # manifests live beside the artifacts they point at, on object storage too when the store is
        store = resources["store"]
        resources["io_manager"] = ManifestIOManager(
            root=store.root, url=store.url, storage_options=store.storage_options
        )
    _check_store_is_on_the_training_volume(path, resources["store"], resources["trainer"])
    _check_manifests_follow_the_store(path, resources["store"], resources["io_manager"])
    return resources


def _build(path: Path, name: str, cls: type[BaseModel], section: Any) -> BaseModel:
    """One resource: the section checked key by key, then the class's own validation."""
    values = _resolve(path, name, cls, section)
    try:
        return cls(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join([name, *(str(part) for part in error['loc'])])}: {error['msg']}"
            for error in err.errors()
        )
        raise DeploymentError(f"{path}: {problems}") from None


def _resolve(path: Path, where: str, cls: type[BaseModel], section: Any) -> dict:
    """The section's values with `{env: NAME}` resolved; an unknown key is an error."""
    if not isinstance(section, dict):
        raise DeploymentError(
            f"{path}: {where} must be a mapping of {cls.__name__}'s fields, got {section!r}"
        )
    fields = cls.model_fields
    values = {}
    for key, value in section.items():
        if key not in fields:
            raise DeploymentError(
                f"{path}: unknown key {where}.{key}; {cls.__name__} takes: {', '.join(sorted(fields))}"
            )
        field = fields[key]
        nested = _model_class(field.annotation)
        secret = field.repr is False  # a field kept out of reprs holds a credential
        if nested is not None and isinstance(value, dict):
            values[key] = _resolve(path, f"{where}.{key}", nested, value)
        elif _is_env_reference(value) and _is_scalar(field.annotation):
            values[key] = (
                EnvVar(value["env"]) if secret else _from_environment(path, f"{where}.{key}", value["env"])
            )
        elif secret and value is not None:
            raise DeploymentError(
                f"{path}: {where}.{key} is a secret: write {{env: NAME}} and set the variable NAME, "
                "never the value itself"
            )
        else:
            values[key] = value
    return values


def _from_environment(path: Path, where: str, variable: str) -> str:
    value = os.environ.get(variable)
    if value is None:
        raise DeploymentError(f"{path}: {where} reads the environment variable {variable}, which is not set")
    return value


def _is_env_reference(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str)


def _options(annotation: Any) -> list[Any]:
    """The types an annotation allows, `X | None` unwrapped."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return [annotation]


def _model_class(annotation: Any) -> type[BaseModel] | None:
    for option in _options(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def _is_scalar(annotation: Any) -> bool:
    return all(
        option in SCALARS or typing.get_origin(option) is typing.Literal for option in _options(annotation)
    )


def _check_store_is_on_the_training_volume(path: Path, store: ArtifactStore, trainer: Trainer) -> None:
    """In kubernetes mode the pod sees the store only through its volume: catch a mismatch at load,
    not an hour later when the first training starts."""
    mount = trainer.kubernetes.store_mount_path
    if trainer.mode != "kubernetes" or not mount:
        return
    if not PurePosixPath(store.root).is_relative_to(PurePosixPath(mount)):
        raise DeploymentError(
            f"{path}: store.root {store.root} is not on trainer.kubernetes.store_mount_path {mount}: the "
            "training pod sees the artifact store only through that volume. Mount the volume where the "
            "store's root is (or set store.root to the mount path)"
        )


def _check_manifests_follow_the_store(
    path: Path, store: ArtifactStore, io_manager: ManifestIOManager
) -> None:
    """The IO manager uploads what the store's assets wrote: with the store on object storage, an
    io_manager section pointing elsewhere would keep every artifact off the bucket."""
    if store.url and (io_manager.url, io_manager.storage_options) != (store.url, store.storage_options):
        raise DeploymentError(
            f"{path}: io_manager.url {io_manager.url} is not store.url {store.url}: manifests and the "
            "artifacts they name are uploaded together. Leave io_manager out (it follows store), or give "
            "it the store's url and storage_options"
        )
