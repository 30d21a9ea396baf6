"""Where and how training runs. The adapter asset asks the trainer; it never decides this itself."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource
from pydantic import BaseModel, Field

from loraflow.spec import TrainingSpec
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


class Trainer(ConfigurableResource):
    """Runs the training loop. `in_process` trains inside the step's own process."""

    mode: Literal["in_process"] = Field(default="in_process", description="Where training runs.")

    def train(self, context, request: TrainRequest) -> TrainResult:
        return train_adapter(
            request.training,
            Path(request.base_model_dir),
            Path(request.dataset_dir),
            Path(request.adapter_dir),
            request.trust_remote_code,
            request.pack_to,
            record=request.record,
        )
