"""Where and how training runs. The adapter asset asks the trainer; it never decides this itself."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

from loraflow.spec import TrainingSpec
from loraflow.train import TrainResult, train_adapter


class Trainer(ConfigurableResource):
    """Runs the training loop. `in_process` trains inside the step's own process."""

    mode: Literal["in_process"] = Field(default="in_process", description="Where training runs.")

    def train(
        self,
        training: TrainingSpec,
        base_model_dir: Path,
        dataset_dir: Path,
        adapter_dir: Path,
        trust_remote_code: bool = False,
        pack_to: int | None = None,
    ) -> TrainResult:
        return train_adapter(training, base_model_dir, dataset_dir, adapter_dir, trust_remote_code, pack_to)
