"""A training request: everything one training needs, as plain data.

The adapter asset builds one; the trainer runs it in its own process, or hands it as JSON to
`python -m loraflow.worker` in a subprocess, under torchrun or in a Kubernetes pod. It lives in
the library so that the worker, which imports no Dagster, validates it with the same models.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import BaseModel, Field

from loraflow.plan import FreeMemory, MemoryEstimate, PlanError, estimate_training, free_memory, preflight
from loraflow.plan.memory import GIB
from loraflow.spec import KubernetesSpec, PlanSpec, TrainingSpec
from loraflow.tracking import Tracking
from loraflow.train import TrainResult, train_adapter

log = logging.getLogger("loraflow")


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
    plan: PlanSpec = Field(default_factory=PlanSpec)
    """The pipeline's `plan` section: whether to check the memory estimate first, and any limit."""
    tracking: Tracking = Field(default_factory=Tracking)
    """Where the training's run is tracked (MLflow's store under the artifact home, by default)."""
    root: str | None = None
    """The project root, which a relative `training.deepspeed_config` is relative to."""
    start_adapter_dir: str | None = None
    """The adapter this training starts from (`training.start_from`: another pipeline's adapter)."""


def training_device() -> str:
    """Where this process trains: its rank's GPU (LOCAL_RANK under torchrun), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def memory_available(plan: PlanSpec, device: str) -> FreeMemory:
    """The device's free memory, or `plan.memory_limit_gib` when that is less."""
    free = free_memory(device)
    if plan.memory_limit_gib is not None and plan.memory_limit_gib * GIB < free.bytes:
        return FreeMemory(
            int(plan.memory_limit_gib * GIB), f"plan.memory_limit_gib ({plan.memory_limit_gib:g} GiB)"
        )
    return free


def plan_request(request: TrainRequest, device: str = "cuda") -> MemoryEstimate | None:
    """The training's peak memory estimate on `device` (`cuda` or `cpu`), or None, with a warning,
    when the planner cannot estimate this model or these settings (a layout or module it does not
    know): training then goes ahead and reports its own errors."""
    try:
        return estimate_training(
            request.training, request.base_model_dir, request.dataset_dir, request.pack_to, device
        )
    except PlanError as err:
        log.warning("no memory plan for this training: %s", err)
        return None


def check_request_fits(request: TrainRequest, device: str | None = None) -> MemoryEstimate | None:
    """The training's peak memory estimate, checked against what `device` (default: where this
    process trains) has free, or `plan.memory_limit_gib` when less: raises PlanError, with the
    settings that would fit, before any weight is loaded. No check with `plan.preflight: false`;
    None when there is no estimate (see plan_request)."""
    device = device or training_device()
    estimate = plan_request(request, device)
    if estimate is not None and request.plan.preflight:
        free = memory_available(request.plan, device)
        preflight(estimate, free.bytes, free.where)
    return estimate


def run_training(request: TrainRequest, preflight: bool = True) -> TrainResult:
    """Train the adapter the request describes, in this process (one rank under torchrun), after
    checking that it fits (see check_request_fits); `preflight=False` when the caller has checked."""
    if preflight:
        check_request_fits(request)
    return train_adapter(
        request.training,
        Path(request.base_model_dir),
        Path(request.dataset_dir),
        Path(request.adapter_dir),
        request.trust_remote_code,
        request.pack_to,
        record=request.record,
        tracking=request.tracking,
        root=Path(request.root) if request.root else None,
        start_adapter_dir=Path(request.start_adapter_dir) if request.start_adapter_dir else None,
    )


def read_result(adapter_dir: str | Path) -> TrainResult:
    """The TrainResult a finished training wrote into its adapter folder."""
    return TrainResult.read(adapter_dir)
