"""Dagster resources: where data, artifacts and training live. Configured, not coded into assets."""

from resources.hub import HubPublisher
from resources.store import ArtifactStore, ManifestIOManager
from resources.trainer import KubernetesSettings, Trainer, TrainRequest
from resources.warehouse import Warehouse

__all__ = [
    "ArtifactStore",
    "HubPublisher",
    "KubernetesSettings",
    "ManifestIOManager",
    "TrainRequest",
    "Trainer",
    "Warehouse",
]
