"""Plans for a pipeline: the spec's training settings, its base model's config and its dataset."""

from __future__ import annotations

import os
from pathlib import Path

from loraflow.plan.cost import TimeEstimate, dataset_summary, estimate_time, padding_efficiency
from loraflow.plan.memory import MemoryEstimate, Setup, estimate_memory
from loraflow.plan.preflight import FreeMemory, free_memory, preflight
from loraflow.plan.shapes import ModelShape, PlanError
from loraflow.runtime import installed, resolve_dtypes
from loraflow.spec import PipelineSpec, TrainingSpec

FULL_COPY_MODULES = ("lm_head", "embed_tokens")


def default_device() -> str:
    """`cuda` when this process sees a GPU, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_from_training(
    training: TrainingSpec,
    *,
    seq_len: int,
    packing: bool = False,
    padded: bool = True,
    trained_fraction: float = 1.0,
    device: str | None = None,
) -> Setup:
    """The planner's Setup for a pipeline's `training` section and the batch shape it will see.

    The adapter is this section's `adapter` (with `start_from`, the starting adapter's method and
    shape decide what trains; the planner assumes they are this section's). Preference objectives
    run the head on every position (TRL), so `trained_fraction` is 1 for them."""
    lora = training.lora
    unknown = [m for m in lora.modules_to_save if m not in FULL_COPY_MODULES]
    if unknown:
        raise PlanError(
            f"training.lora.modules_to_save {unknown}: the planner counts full copies of "
            f"{' and '.join(FULL_COPY_MODULES)} only"
        )
    qlora = training.method == "qlora"
    device = device or default_device()
    dtype, compute = resolve_dtypes(training, device)  # `auto` as it resolves on that device
    attention = training.attn_implementation
    if attention == "auto":
        fast = device == "cuda" and installed("flash_attn") and (compute or dtype) != "float32"
        attention = "flash_attention_2" if fast else "sdpa"
    adapter = training.adapter
    targets = ("all-linear",) if lora.target_modules == "all-linear" else tuple(lora.target_modules)
    rank, dropout = lora.r, lora.dropout
    if adapter == "adalora":
        rank = (
            training.adalora.init_r
        )  # the budget shrinks from init_r, but every layer stays allocated at it
    elif adapter == "ia3":
        targets, dropout = tuple(training.ia3.target_modules), 0.0
    elif adapter == "prefix":
        targets, dropout = (), 0.0
    preference = training.objective != "sft"
    return Setup(
        method=training.method,
        dtype=compute if qlora else dtype,
        double_quant=training.quantization.double_quant if qlora else True,
        lora_r=rank,
        target_modules=targets,
        lora_dropout=dropout,
        use_dora=lora.use_dora and adapter == "lora",
        modules_to_save=tuple(lora.modules_to_save) if adapter in ("lora", "adalora") else (),
        adapter=adapter,
        ia3_feedforward=tuple(training.ia3.feedforward_modules),
        prefix_tokens=training.prefix.num_virtual_tokens,
        prefix_projection=training.prefix.projection_hidden if training.prefix.projection else None,
        objective=training.objective,
        reference_adapter=training.objective == "dpo" and training.start_from is not None,
        optimizer=training.optimizer,
        batch_size=training.batch_size,
        seq_len=seq_len,
        gradient_checkpointing=training.gradient_checkpointing,
        packing=packing,
        padded=padded or packing,
        attention=attention,
        trained_fraction=1.0 if preference else trained_fraction,
        device=device,
    )


def setup_for_training(
    training: TrainingSpec,
    summary: dict | None,
    max_seq_len: int,
    packing: bool,
    device: str | None = None,
) -> Setup:
    """The Setup a training section trains with on a dataset. With the dataset's summary: the
    longest example (not max_seq_len) sets the padded length, the share of trained tokens sets the
    head's work, and data of one length needs no padding mask. For preference pairs the summary's
    lengths are both sequences' together: the longest pair's (up to max_seq_len) is taken as each
    sequence's padded length, an upper bound."""
    seq_len, padded, fraction = max_seq_len, True, 1.0
    if summary:
        percentiles = summary.get("token_percentiles", {})
        if percentiles.get("p100") and not packing:
            seq_len = min(max_seq_len, percentiles["p100"])
        padded = len(set(percentiles.values())) != 1
        if summary.get("train_tokens"):
            fraction = min(1.0, summary.get("trainable_tokens", 0) / summary["train_tokens"]) or 1.0
    return setup_from_training(
        training, seq_len=seq_len, packing=packing, padded=padded, trained_fraction=fraction, device=device
    )


def setup_for_spec(spec: PipelineSpec, summary: dict | None = None, device: str | None = None) -> Setup:
    """The Setup a pipeline trains with (see setup_for_training)."""
    return setup_for_training(spec.training, summary, spec.format.max_seq_len, spec.format.packing, device)


def _summary(dataset_dir: str | Path | None) -> dict | None:
    return dataset_summary(dataset_dir) if dataset_dir is not None else None


def estimate_for_spec(
    spec: PipelineSpec,
    base_model_dir: str | Path,
    dataset_dir: str | Path | None = None,
    device: str | None = None,
) -> MemoryEstimate:
    """Peak memory of the pipeline's training: the base model's config.json (no weights are read),
    the spec's settings, and the training dataset's summary when given."""
    shape = ModelShape.from_folder(base_model_dir)
    return estimate_memory(shape, setup_for_spec(spec, _summary(dataset_dir), device))


def time_for_spec(
    spec: PipelineSpec,
    base_model_dir: str | Path,
    dataset_dir: str | Path | None = None,
    tokens: float | None = None,
    gpu: str | None = None,
    price_per_hour: float | None = None,
) -> TimeEstimate:
    """Hours and cost of the pipeline's training on `gpu` (default: the spec's `plan.gpu`).

    Tokens: given, else from the dataset: `training.epochs` x its train tokens, or with
    `max_steps`, steps x examples per step x mean train tokens per example (packed: rows x
    max_seq_len x the packing efficiency)."""
    summary = _summary(dataset_dir)
    training, fmt = spec.training, spec.format
    setup = setup_for_spec(spec, summary, device="cuda")
    efficiency = 1.0
    if summary:
        efficiency = (
            summary.get("packing_efficiency") or 1.0
            if fmt.packing
            else padding_efficiency(summary, training.batch_size)
        )
    if tokens is None:
        if summary is None:
            raise PlanError(
                "no token count: give one (--tokens) or a training dataset folder (--dataset), or "
                "materialize the pipeline's training_dataset first"
            )
        per_step = training.batch_size * training.gradient_accumulation_steps
        if training.max_steps:
            if fmt.packing:
                tokens = training.max_steps * per_step * fmt.max_seq_len * efficiency
            else:
                per_example = summary["train_tokens"] / max(1, summary["train_examples"])
                tokens = training.max_steps * per_step * per_example
        else:
            tokens = training.epochs * summary["train_tokens"]
    plan = spec.plan
    return estimate_time(
        ModelShape.from_folder(base_model_dir),
        setup,
        tokens,
        gpu or plan.gpu,
        plan.price_per_hour if price_per_hour is None else price_per_hour,
        efficiency,
    )


def home_for(spec: PipelineSpec) -> Path:
    """The artifact store a pipeline uses: LORAFLOW_HOME, else `.loraflow` in its project root."""
    return Path(os.environ.get("LORAFLOW_HOME", spec.root / ".loraflow"))


def latest_dataset(spec: PipelineSpec) -> Path | None:
    """The newest training dataset folder built for the pipeline, or None."""
    folder = home_for(spec) / "datasets" / spec.name
    built = [p for p in folder.glob("*/summary.json")] if folder.is_dir() else []
    return max(built, key=lambda p: p.stat().st_mtime).parent if built else None


def base_model_folder(spec: PipelineSpec) -> Path:
    """The pipeline's base model folder (the built-in one is converted on first use)."""
    from loraflow.base_model import resolve_base_model

    return resolve_base_model(spec.base_model, home_for(spec), spec.root).path


def check_fits(
    spec: PipelineSpec,
    base_model_dir: str | Path,
    dataset_dir: str | Path | None = None,
    free: FreeMemory | None = None,
    device: str | None = None,
) -> MemoryEstimate:
    """The pipeline's training estimate, checked against the free memory where it will train
    (`free`, default: this process's GPU, else this machine's available memory). Reads only
    config.json and the dataset's summary.json, so it runs before the model is loaded; raises
    PlanError with the numbers and the settings that would fit."""
    device = device or default_device()
    free = free or free_memory(device)
    estimate = estimate_for_spec(
        spec, base_model_dir, dataset_dir, device="cuda" if device.startswith("cuda") else "cpu"
    )
    preflight(estimate, free.bytes, free.where)
    return estimate


def estimate_training(
    training: TrainingSpec,
    base_model_dir: str | Path,
    dataset_dir: str | Path,
    pack_to: int | None = None,
    device: str = "cuda",
) -> MemoryEstimate:
    """Peak memory of a training given train_adapter's own arguments (no pipeline spec): `pack_to`
    is the packed row length, or None for padded batches of the dataset's examples."""
    summary = dataset_summary(dataset_dir)
    longest = pack_to or summary.get("token_percentiles", {}).get("p100") or 1
    setup = setup_for_training(
        training, summary, longest, pack_to is not None, "cuda" if device.startswith("cuda") else "cpu"
    )
    return estimate_memory(ModelShape.from_folder(base_model_dir), setup)


def check_training_fits(
    training: TrainingSpec,
    base_model_dir: str | Path,
    dataset_dir: str | Path,
    pack_to: int | None = None,
    free: FreeMemory | None = None,
    device: str | None = None,
) -> MemoryEstimate:
    """check_fits with train_adapter's own arguments, for a process that has a training request
    rather than a pipeline spec (a worker about to train)."""
    device = device or default_device()
    free = free or free_memory(device)
    estimate = estimate_training(training, base_model_dir, dataset_dir, pack_to, device)
    preflight(estimate, free.bytes, free.where)
    return estimate
