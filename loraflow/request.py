"""A training request: everything one training needs, as plain data.

The adapter asset builds one; the trainer runs it in its own process, or hands it as JSON to
`python -m loraflow.worker` in a subprocess, under torchrun or in a Kubernetes pod. It lives in
the library so that the worker, which imports no Dagster, validates it with the same models.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from loraflow.spec import KubernetesSpec, TrainingSpec
from loraflow.train import TrainResult, train_adapter


class TrainRequest(BaseModel):
    """Everything one training needs, as plain data (it can be written to JSON for a worker)."""

    training: TrainingSpec
    base_model_dir: str
    dataset_dir: str
    adapter_dir: str
    trust_remote_code: bool = False
    pack_to: int | None = None
    record: dict = Field(default_factory=dict)
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)
    """The pipeline's pod placement; only the trainer's `kubernetes` mode reads it."""


def run_training(request: TrainRequest) -> TrainResult:
    """Train the adapter the request describes, in this process (one rank under torchrun)."""
    return train_adapter(
        request.training,
        Path(request.base_model_dir),
        Path(request.dataset_dir),
        Path(request.adapter_dir),
        request.trust_remote_code,
        request.pack_to,
        record=request.record,
    )


def read_result(adapter_dir: str | Path) -> TrainResult:
    """The TrainResult a finished training wrote into its adapter folder."""
    return TrainResult.read(adapter_dir)
