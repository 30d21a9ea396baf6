"""Experiment tracking: each training is one run in MLflow, Weights & Biases or TensorBoard.

The Trainer's own integrations log the figures (every step's loss, learning rate, grad norm,
tokens/s and tokens seen, and the eval loss); loraflow opens the run itself, so that it can log
its own settings and lineage as parameters and tags, resume the same run after a crash, attach
the loss curve, and hand back a link for the adapter asset. Only the main process tracks.

MLflow, the embedded default, keeps a SQLite store and the artifacts under the artifact home
(`<home>/mlflow/`), with no server; `make mlflow` starts its UI on that store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from loraflow.runtime import TrainingError, installed

log = logging.getLogger("loraflow")

MLFLOW_UI = "http://127.0.0.1:5000"
"""Where `make mlflow` serves the UI; run links point there."""


class Tracking(BaseModel):
    """Where a training's run goes (part of a TrainRequest, so a worker tracks the same way)."""

    backend: Literal["mlflow", "wandb", "tensorboard", "none"] = "none"
    folder: str | None = None
    """The tracking folder under the artifact home: MLflow's store, or TensorBoard's event files."""
    experiment: str = "loraflow"
    """The experiment (MLflow), project (W&B) or subfolder (TensorBoard): the pipeline's name."""
    run_name: str | None = None
    """The run's name: the adapter's version."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Lineage for the run: pipeline, dataset version, base model hash."""

    @property
    def report_to(self) -> list[str]:
        return [] if self.backend == "none" else [self.backend]

    def mlflow_uri(self) -> str:
        return f"sqlite:///{Path(self.folder or 'mlflow').resolve() / 'mlflow.db'}"

    def logging_dir(self) -> str | None:
        if self.backend != "tensorboard" or not self.folder:
            return None
        return str(Path(self.folder) / self.experiment / (self.run_name or "run"))


class TrackedRun(BaseModel):
    """The run a training was tracked in, as the adapter asset shows it."""

    backend: str
    run_id: str | None = None
    url: str | None = None
    """The run's page (MLflow: in `make mlflow`'s UI; W&B: on its site)."""
    location: str | None = None
    """The store or folder the run lives in."""


def check_installed(tracking: Tracking) -> None:
    """Refuse, before any weight loads, a tracker whose package is missing."""
    package = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}.get(tracking.backend)
    if package and not installed(package):
        extra = {"wandb": "wandb", "tensorboard": "tensorboard"}.get(tracking.backend)
        hint = f"pip install 'loraflow[{extra}]'" if extra else f"pip install {package}"
        raise TrainingError(
            f"tracking: {tracking.backend} needs the {package} package ({hint}), or set tracking: none"
        )


@contextlib.contextmanager
def tracked_run(
    tracking: Tracking, params: dict, main: bool, resume_run_id: str | None = None
) -> Iterator[TrackedRun]:
    """Open the training's run for the block (a resumed training continues `resume_run_id`), log
    loraflow's parameters and tags, and close it: finished, or failed when the block raises."""
    if tracking.backend == "none" or not main:
        yield TrackedRun(backend=tracking.backend)
        return
    if tracking.backend == "mlflow":
        with _mlflow_run(tracking, params, resume_run_id) as run:
            yield run
        return
    if tracking.backend == "wandb":
        os.environ.setdefault("WANDB_PROJECT", tracking.experiment)
        yield TrackedRun(backend="wandb", location=os.environ["WANDB_PROJECT"])
        return
    # the Trainer's TensorBoard callback writes where this says (else into the checkpoint folder)
    os.environ["TENSORBOARD_LOGGING_DIR"] = tracking.logging_dir() or "tensorboard"
    yield TrackedRun(backend="tensorboard", location=os.environ["TENSORBOARD_LOGGING_DIR"])


@contextlib.contextmanager
def _mlflow_run(tracking: Tracking, params: dict, resume_run_id: str | None) -> Iterator[TrackedRun]:
    import mlflow

    folder = Path(tracking.folder or "mlflow").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking.mlflow_uri())
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else mlflow.create_experiment(tracking.experiment, artifact_location=(folder / "artifacts").as_uri())
    )
    active = mlflow.start_run(
        run_id=resume_run_id,
        experiment_id=None if resume_run_id else experiment_id,
        run_name=tracking.run_name,
    )
    run_id = active.info.run_id
    if not resume_run_id:
        mlflow.log_params({f"loraflow.{k}": _param(v) for k, v in params.items()})
        mlflow.set_tags(tracking.tags)
    run = TrackedRun(
        backend="mlflow",
        run_id=run_id,
        url=f"{MLFLOW_UI}/#/experiments/{active.info.experiment_id}/runs/{run_id}",
        location=tracking.mlflow_uri(),
    )
    try:
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


def log_artifact(run: TrackedRun, path: Path) -> None:
    """Attach a file (the loss curve) to the open MLflow run; other trackers get the figures only."""
    if run.backend == "mlflow" and run.run_id:
        import mlflow

        mlflow.log_artifact(str(path))


def _param(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:500]


def flatten(settings: dict, prefix: str = "") -> dict:
    """A nested settings dict as dotted keys (MLflow parameters are flat)."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
