"""Dagster resources: where data, artifacts and training live. Configured, not coded into assets."""

from resources.store import ArtifactStore, ManifestIOManager
from resources.trainer import Trainer, TrainRequest
from resources.warehouse import Warehouse

__all__ = ["ArtifactStore", "ManifestIOManager", "TrainRequest", "Trainer", "Warehouse"]
