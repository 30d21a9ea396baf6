"""Training a LoRA or QLoRA adapter: loraflow's rows and loss on TRL's SFTTrainer.

    settings resolved for this device (loraflow.runtime), refused before any weight loads if they
    cannot run here -> base model (4-bit NF4 for qlora) -> LoRA adapters (peft) -> loraflow's
    tokenized rows as a datasets.Dataset, padded per batch or packed -> LoraflowTrainer
    (loraflow.engine: SFTTrainer with loraflow's collators, loss and step figures) -> adapter folder

The Trainer and accelerate run the loop: one process, or N under torchrun or `accelerate launch`
(`training.distributed`: DDP, FSDP2 or DeepSpeed), gradient accumulation, clipping, mixed
precision, checkpoints. The loss of a step is the sum over all its trained tokens divided by their
count, whichever rank or micro-batch a token fell in, so N processes follow the loss curve of one
process with the same global batch.

Checkpoints are the Trainer's (adapter, optimizer, scheduler, every rank's RNG states, the data
position), in `<adapter>.checkpoints/checkpoint-<step>/`, plus `loraflow_checkpoint.json`: the
run's fingerprint (settings, dataset, base model), loraflow's figures so far and the tracking
run. Only a checkpoint with this run's fingerprint is resumed, and a resumed run ends with the
adapter an uninterrupted one ends with, bit for bit on a CPU. The Trainer loads them with
`torch.load(weights_only=True)`.

Progress (step, loss, learning rate, grad norm, tokens/s, ETA) goes to the "loraflow" logger,
which Dagster shows in the run's log, to the tracker (MLflow by default in a pipeline), and to an
optional `progress` callback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from loraflow.adapters import (
    adapter_callbacks,
    adapter_record,
    adapter_regularization,
    attach_adapter,
    lora_config,
)
from loraflow.artifacts import atomic_dir, write_json_atomic
from loraflow.base_model import load_causal_lm, load_tokenizer, torch_dtype
from loraflow.curves import save_loss_curve
from loraflow.dataset import dataset_tokenizer, load_split, stored_template
from loraflow.engine import (
    CHECKPOINT_MARKER,
    LoraflowTrainer,
    collate_pairs,
    kept,
    make_collator,
    targets_of,
    token_loss_sum,
    trainer_class,
)
from loraflow.hashing import content_hash
from loraflow.packing import pack_examples, packing_efficiency
from loraflow.runtime import Runtime, TrainingError, resolve_dtypes, resolve_runtime
from loraflow.spec import TrainingSpec
from loraflow.tracking import Tracking, check_installed, flatten, log_artifact, tracked_run

log = logging.getLogger("loraflow")

TRAINING_SUMMARY = "training_summary.json"
TRAINING_RECORD = "training_record.json"
LOSS_CURVE = "loss_curve.png"
EVAL_EXAMPLES = 256
"""Eval rows the training's own eval loss is measured on (the evaluation asset scores its own set)."""

__all__ = [
    "LOSS_CURVE",
    "lora_config",
    "TRAINING_SUMMARY",
    "TrainResult",
    "TrainingError",
    "targets_of",
    "token_loss_sum",
    "train_adapter",
]


@dataclass
class TrainResult:
    adapter_dir: str
    steps: int
    examples_seen: int
    tokens_seen: int
    final_loss: float
    tokens_per_second: float
    wall_seconds: float
    peak_memory_mb: float
    """Peak CUDA memory allocated during training on a GPU, else the process's peak resident set."""
    trainable_params: int
    total_params: int
    packing_efficiency: float | None = None
    """Real tokens over row tokens of the packed rows; None when not packing."""
    resumed_from_step: int = 0
    final_training_eval_loss: float | None = None
    """The training's own held-out loss at its last step, on up to 256 eval rows (`eval_every`); the
    evaluation asset's eval_loss is measured on its own examples."""
    best_training_eval_loss: float | None = None
    world_size: int = 1
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    peak_reserved_mb: float | None = None
    """Peak CUDA memory the caching allocator reserved (what the GPU had to hold); None on a CPU."""
    runtime: str = ""
    """The resolved settings: device, dtype, attention, optimizer, kernels."""
    tracking: dict = field(default_factory=dict)
    """The tracked run: backend, run id, link."""
    objective: str = "sft"
    reward_accuracy: float | None = None
    """Preference trainings: the mean reward accuracy of the last steps (up to 10) on the train pairs."""
    reward_margin: float | None = None
    """Preference trainings: the mean reward margin of those steps."""
    reward_curve: list[tuple] = field(default_factory=list)
    """Preference trainings: (step, reward accuracy, reward margin) of every step."""

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.total_params

    @classmethod
    def read(cls, adapter_dir: str | Path) -> TrainResult:
        """The result a finished training wrote into its adapter folder."""
        path = Path(adapter_dir) / TRAINING_SUMMARY
        if not path.is_file():
            raise TrainingError(f"the training finished, but {path} does not exist; see the training's log")
        fields = json.loads(path.read_text(encoding="utf-8"))
        for curve in ("loss_curve", "eval_curve", "reward_curve"):
            fields[curve] = [tuple(point) for point in fields[curve]]
        return cls(**fields)


# ---------------------------------------------------------------------------------------------
# the pieces a training is made of


def lr_at(step: int, total: int, warmup: int, peak: float, schedule: str = "cosine") -> float:
    """Linear warm-up to `peak`, then cosine or linear decay to a tenth of it, or constant."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return peak * (1 - 0.9 * progress)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit packed weights at their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state"):  # bitsandbytes packs two 4-bit values per byte of storage
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def load_model(training: TrainingSpec, runtime: Runtime, base_model_dir: Path, trust_remote_code: bool):
    """The base model for this training: in `runtime.dtype`, 4-bit for QLoRA, on this process's
    device (FSDP: on the CPU, for the Trainer to shard, unless 4-bit)."""
    qlora = training.method == "qlora"
    fsdp = training.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    model = load_causal_lm(
        base_model_dir,
        dtype=runtime.dtype,
        quantization=training.quantization if qlora else None,
        compute_dtype=runtime.compute_dtype,
        # FSDP shards the packed 4-bit weights with the others: they must share the others' dtype
        quant_storage=runtime.dtype if qlora and fsdp else None,
        trust_remote_code=trust_remote_code,
        attn_implementation=runtime.attention,
        device_map=None if fsdp and not qlora else "process",
    )
    model.config.use_cache = False
    return model


def adapter_version(
    training: TrainingSpec, dataset_version: str, base_model_hash: str, pack_to: int | None, device_kind: str
) -> str:
    """An adapter's version: what decides its weights (the dataset, the base, the training settings,
    the row length when packing) and, where the spec says `auto`, the dtypes resolved on `device_kind`:
    the same YAML trained on a CPU and on a GPU is two adapters."""
    quantization = training.quantization
    compute = quantization.compute_dtype if training.method == "qlora" and quantization else None
    dtypes = [list(resolve_dtypes(training, device_kind))] if "auto" in (training.dtype, compute) else []
    return content_hash(
        [dataset_version, base_model_hash, training.model_dump(mode="json"), pack_to, *dtypes]
    )


def run_fingerprint(
    training: TrainingSpec, dataset_dir: Path, base_model_dir: Path, pack_to: int | None, runtime: Runtime
) -> str:
    """What a checkpoint must match to be resumed: the settings (as resolved here), the data and
    the base model."""
    return content_hash(
        [
            training.model_dump(mode="json"),
            Path(dataset_dir).name,
            str(base_model_dir),
            pack_to,
            [runtime.dtype, runtime.compute_dtype, runtime.attention],
        ]
    )


def latest_checkpoint(folder: Path, fingerprint: str) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of this run, with loraflow's marker, or None. Checkpoints of
    other settings are removed (this folder belongs to one adapter); an incomplete one (no marker:
    the run died while saving it) is skipped."""
    if not folder.is_dir():
        return None
    found = None
    for path in sorted(folder.glob("checkpoint-*"), key=lambda p: _step_of(p), reverse=True):
        marker = path / CHECKPOINT_MARKER
        try:
            state = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s", path.name)
            continue
        if state.get("fingerprint") != fingerprint:
            log.info("checkpoint %s belongs to other settings; not resuming from it", path.name)
            shutil.rmtree(path, ignore_errors=True)
            continue
        if found is None:
            found = (path, state)
    return found


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[-1])
    except ValueError:
        return -1


def peak_memory() -> tuple[float, float | None]:
    """(peak allocated, peak reserved) CUDA memory in MiB since the last reset on a GPU; on a CPU,
    the process's peak resident set size and None."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None


def training_args(
    training: TrainingSpec,
    runtime: Runtime,
    checkpoint_dir: Path,
    tracking: Tracking,
    total_steps: int,
    has_eval: bool,
    root: Path | None = None,
    max_length: int | None = None,
):
    """The TRL config for a training (SFTConfig, DPOConfig or ORPOConfig, by `training.objective`):
    every setting explicit, TRL's defaults (bf16, checkpointing on) never decide."""
    from trl import DPOConfig, SFTConfig

    distributed: dict = {}
    if training.distributed == "fsdp":
        distributed = {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 2, "reshard_after_forward": True, "cpu_ram_efficient_loading": False},
        }
    elif training.distributed == "deepspeed":
        config = Path(training.deepspeed_config)
        if not config.is_absolute() and root is not None:
            config = Path(root) / config
        if not config.is_file():
            raise TrainingError(f"training.deepspeed_config: no DeepSpeed config at {config}")
        distributed = {"deepspeed": str(config)}
    checkpoints = training.checkpoint_every and training.checkpoint_every < total_steps
    objective: dict = {"dataset_kwargs": {"skip_prepare_dataset": True}}
    config_class = SFTConfig
    pairs = training.preference
    if training.objective == "dpo":
        config_class = DPOConfig
        objective = {
            "beta": pairs.beta,
            "loss_type": [pairs.loss],
            "label_smoothing": pairs.label_smoothing,
            "max_length": None,  # loraflow's dataset already applied format.max_seq_len and overlong
            "precompute_ref_log_probs": False,
            "padding_free": False,
        }
    elif training.objective == "orpo":
        from trl.experimental.orpo import ORPOConfig

        config_class = ORPOConfig
        objective = {"beta": pairs.beta, "max_length": max_length}
    return config_class(
        output_dir=str(checkpoint_dir),
        max_steps=total_steps,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=runtime.optimizer,
        bf16=runtime.bf16,
        fp16=runtime.fp16,
        use_cpu=runtime.device == "cpu",
        gradient_checkpointing=training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if training.gradient_checkpointing else None,
        torch_compile=runtime.torch_compile,
        use_liger_kernel=runtime.liger_kernel,
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=training.eval_every if has_eval else None,
        save_strategy="steps" if checkpoints else "no",
        save_steps=training.checkpoint_every if checkpoints else 500,
        save_total_limit=training.keep_checkpoints,
        save_only_model=False,
        report_to=tracking.report_to,
        run_name=tracking.run_name,
        seed=training.seed,
        data_seed=training.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=runtime.device == "cuda",
        remove_unused_columns=False,
        disable_tqdm=True,
        log_level="warning",
        ddp_find_unused_parameters=False,
        **objective,
        **distributed,
    )


def _rows_dataset(rows: list, packed: bool, pairs: bool = False):
    """loraflow's rows as a datasets.Dataset, columns named for the collator."""
    from datasets import Dataset

    if pairs:
        columns = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")
        return Dataset.from_dict({key: [r[key] for r in rows] for key in columns})
    if packed:
        return Dataset.from_dict(
            {
                "input_ids": [r.input_ids for r in rows],
                "labels": [r.labels for r in rows],
                "position_ids": [r.position_ids for r in rows],
                "segment_ids": [r.segment_ids for r in rows],
            }
        )
    return Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
    )


# ---------------------------------------------------------------------------------------------
# a training


def train_adapter(
    training: TrainingSpec,
    base_model_dir: Path,
    dataset_dir: Path,
    adapter_dir: Path,
    trust_remote_code: bool = False,
    pack_to: int | None = None,
    progress: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    record: dict | None = None,
    tracking: Tracking | None = None,
    root: Path | None = None,
    start_adapter_dir: Path | None = None,
) -> TrainResult:
    """Train an adapter on the dataset's train split and write it to `adapter_dir` atomically.

    `pack_to`: pack examples into rows of this many tokens (`format.packing`); None pads each batch.
    `progress`: called on the main rank after every step (after its eval and checkpoint) with that
    step's figures. `checkpoint_dir`: where checkpoints go (default: beside the adapter,
    `<adapter>.checkpoints`); the newest one matching these settings is resumed from.
    `record`: lineage written into the adapter's training record (data version, base model hash).
    `tracking`: where the run is tracked (default: nowhere). `root`: what a relative
    `deepspeed_config` is relative to. `start_adapter_dir`: an adapter (of the same base) to train
    on instead of a new one (`training.start_from`); for DPO a frozen copy of it is the reference.
    The tokenizer saved with the adapter carries the dataset's chat template.

    `training.objective` picks the trainer: SFT on the examples (the chosen answers of pairs), or
    DPO or ORPO on the dataset's preference pairs.
    """
    from transformers import set_seed

    runtime = resolve_runtime(training)  # refuses what cannot run here before any weight loads
    tracking = tracking or Tracking()
    check_installed(tracking)
    adapter_dir = Path(adapter_dir)
    checkpoint_dir = Path(checkpoint_dir or adapter_dir.with_name(adapter_dir.name + ".checkpoints"))
    fingerprint = run_fingerprint(training, dataset_dir, base_model_dir, pack_to, runtime)
    if start_adapter_dir is not None:
        fingerprint = content_hash([fingerprint, str(start_adapter_dir)])
    pairs = training.objective != "sft"
    set_seed(training.seed)  # the adapters' initial weights come from it

    tokenizer = dataset_tokenizer(base_model_dir, dataset_dir, trust_remote_code)
    train_rows = load_split(dataset_dir, "train")
    if not train_rows:
        raise TrainingError(f"{dataset_dir}: the train split is empty; there is nothing to train on")
    eval_rows = load_split(dataset_dir, "eval")[:EVAL_EXAMPLES] if training.eval_every else []
    if pairs:
        train_rows = _pairs_only(train_rows, training.objective, dataset_dir)
        eval_rows = [r for r in eval_rows if r["rejected_input_ids"] is not None]
        if pack_to is not None:
            raise TrainingError(f"training.objective {training.objective}: preference pairs are not packed")
    packed = pack_to is not None
    efficiency = None
    units = train_rows
    if packed:
        units = pack_examples(train_rows, pack_to)
        efficiency = packing_efficiency(units, pack_to)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = training.batch_size * training.gradient_accumulation_steps * world
    steps_per_epoch = math.ceil(len(units) / per_step)
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))

    model = load_model(training, runtime, base_model_dir, trust_remote_code)
    peft_config = None
    if start_adapter_dir is not None:
        model = _continue_adapter(model, Path(start_adapter_dir), training)
    else:
        model = attach_adapter(model, training, total_steps)
        if training.objective == "dpo":
            # TRL's DPOTrainer attaches the adapter itself when handed the config: the reference is
            # then the model with the adapter disabled (the base), with no frozen copy in memory
            peft_config = model.peft_config["default"]
            # a prompt-learning adapter (prefix) leaves the base's layers as they were
            model = model.get_base_model() if peft_config.is_prompt_learning else model.unload()
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        log.info("runtime: %s", runtime.describe() + "".join(f"; {note}" for note in runtime.notes))
        if packed:
            log.info(
                "packed %d examples into %d rows of %d tokens (%.1f%% real tokens)",
                len(train_rows),
                len(units),
                pack_to,
                100 * efficiency,
            )

    args = training_args(
        training,
        runtime,
        checkpoint_dir,
        tracking,
        total_steps,
        bool(eval_rows),
        root=root,
        max_length=max((len(r["input_ids"]) for r in train_rows), default=None),
    )
    _ = args.device  # joins the process group under torchrun, before the ranks agree on a checkpoint
    found = latest_checkpoint(checkpoint_dir, fingerprint) if main else None
    if world > 1:
        found = _same_on_every_rank(found)
    resume_path, resumed = found if found is not None else (None, None)
    schedule = _schedule(training, total_steps)
    with warnings.catch_warnings():
        # TRL deprecates its Liger switch in favour of Hub kernels; the switch still applies them
        warnings.filterwarnings("ignore", message=r"`use_liger_kernel=True` is deprecated")
        extra = {"peft_config": peft_config} if peft_config is not None else {}
        if pairs:
            collator = partial(
                collate_pairs,
                pad_id=tokenizer.pad_token_id,
                layout="orpo" if training.objective == "orpo" else "dpo",
            )
        else:
            collator = make_collator(
                tokenizer.pad_token_id,
                packed,
                runtime.attention,
                torch_dtype(runtime.compute_dtype or runtime.dtype),
            )
        trainer = trainer_class(training.objective)(
            model=model,
            args=args,
            train_dataset=_rows_dataset(units, packed, pairs),
            eval_dataset=_rows_dataset(eval_rows, False, pairs) if eval_rows else None,
            data_collator=collator,
            processing_class=tokenizer,
            eval_rows=eval_rows,
            progress=progress,
            log_every=training.log_every,
            resumed=(resumed or {}).get("figures"),
            schedule=schedule,
            loraplus_ratio=training.lora.loraplus_lr_ratio,
            fused_head=runtime.device == "cuda" and not runtime.liger_kernel,
            fingerprint=fingerprint,
            regularization=adapter_regularization(training),
            callbacks=adapter_callbacks(training),
            **extra,
        )
    trainable, total = count_parameters(trainer.model)
    if main:
        log.info(
            "trainable params: %s || all params: %s || trainable%%: %.4f",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )
    if training.method == "qlora" and runtime.dtype == "float32":
        # SFTTrainer casts a 4-bit model's adapters to bf16 (the QLoRA paper's choice on a GPU); in
        # float32 training, and on a CPU without bf16 units, they stay float32
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()

    if main:
        log.info(
            "training %s (%s, %s): %d steps of %d %s (%d train examples, %.2f epochs)%s%s",
            training.objective,
            training.method,
            training.adapter if start_adapter_dir is None else f"continuing {Path(start_adapter_dir).name}",
            total_steps,
            per_step,
            "packed rows" if packed else "pairs" if pairs else "examples",
            len(train_rows),
            total_steps / steps_per_epoch,
            f" on {world} ranks ({training.distributed})" if world > 1 else "",
            f"; resuming from the checkpoint at step {resumed['figures']['step']}" if resumed else "",
        )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    params = {
        **flatten(training.model_dump(mode="json"), "training."),
        "runtime": runtime.describe(),
        "packing": pack_to is not None,
        "row_tokens": pack_to,
        "dataset": Path(dataset_dir).name,
        "start_from": Path(start_adapter_dir).name if start_adapter_dir is not None else None,
    }
    started = time.perf_counter()
    resume_run = (resumed or {}).get("run_id")
    with tracked_run(tracking, params, main, resume_run) as run:
        trainer.run_id = run.run_id
        try:
            trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(_out_of_memory(training, pack_to, "GPU") + _kept(trainer)) from None
        except MemoryError:
            raise TrainingError(_out_of_memory(training, pack_to, "CPU") + _kept(trainer)) from None
        except RuntimeError as err:
            if "out of memory" in str(err) or "can't allocate memory" in str(err):
                raise TrainingError(_out_of_memory(training, pack_to, "device") + _kept(trainer)) from None
            raise
        wall = time.perf_counter() - started
        allocated, reserved = peak_memory()
        evals = [loss for _, loss in trainer.eval_curve]
        start_step = (resumed or {}).get("figures", {}).get("step", 0)
        result = TrainResult(
            adapter_dir=str(adapter_dir),
            steps=total_steps,
            examples_seen=trainer.examples_seen,
            tokens_seen=trainer.tokens_seen,
            final_loss=trainer.loss_curve[-1][1],
            tokens_per_second=round((trainer.tokens_seen - trainer._tokens_at_start) / wall, 1),
            wall_seconds=round(wall, 2),
            peak_memory_mb=round(allocated, 1),
            peak_reserved_mb=round(reserved, 1) if reserved is not None else None,
            trainable_params=trainable,
            total_params=total,
            packing_efficiency=round(efficiency, 4) if efficiency is not None else None,
            resumed_from_step=start_step,
            final_training_eval_loss=evals[-1] if evals else None,
            best_training_eval_loss=min(evals) if evals else None,
            world_size=world,
            loss_curve=trainer.loss_curve,
            eval_curve=trainer.eval_curve,
            runtime=runtime.describe(),
            tracking=run.model_dump(exclude_none=True),
            objective=training.objective,
            **_last_rewards(trainer.reward_curve),
        )
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")  # DPO's frozen reference: not part of what was trained
        _save_adapter(
            trainer, tokenizer, adapter_dir, dataset_dir, result, training, pack_to, record, run, main
        )
    if main:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result


def _save_adapter(trainer, tokenizer, adapter_dir, dataset_dir, result, training, pack_to, record, run, main):
    """Every rank takes part in gathering the adapter (FSDP, DeepSpeed); the main one writes it."""
    staging = adapter_dir.with_name(f".{adapter_dir.name}.staging")
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not main:
        return
    with atomic_dir(adapter_dir) as tmp:
        for item in staging.iterdir():
            if item.name != "training_args.bin":  # a pickle of the Trainer's arguments: never shipped
                shutil.move(str(item), tmp / item.name)
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_SUMMARY).write_text(json.dumps(asdict(result), indent=2))
        write_json_atomic(
            tmp / TRAINING_RECORD, training_record(training, dataset_dir, pack_to, record, result, tmp)
        )
        curve = save_loss_curve(
            tmp / LOSS_CURVE, result.loss_curve, result.eval_curve, title=adapter_dir.name
        )
        log_artifact(run, curve)
        if load_tokenizer(tmp).chat_template != stored_template(dataset_dir):
            raise TrainingError(
                f"{adapter_dir}: the saved tokenizer's chat template differs from the dataset's"
            )


def _last_rewards(curve: list[tuple], last: int = 10) -> dict:
    """The mean reward accuracy and margin over the last steps of a preference training."""
    if not curve:
        return {}
    tail = [point for point in curve[-last:] if all(math.isfinite(v) for v in point[1:])]
    if not tail:
        return {"reward_curve": curve}
    return {
        "reward_accuracy": round(sum(p[1] for p in tail) / len(tail), 4),
        "reward_margin": round(sum(p[2] for p in tail) / len(tail), 6),
        "reward_curve": curve,
    }


def _pairs_only(rows: list[dict], objective: str, dataset_dir: Path) -> list[dict]:
    """The train rows that are preference pairs; a dataset without any cannot train DPO or ORPO."""
    kept_rows = [r for r in rows if r["rejected_input_ids"] is not None]
    if not kept_rows:
        raise TrainingError(
            f"training.objective {objective} trains on chosen/rejected pairs, but the dataset {Path(dataset_dir).name} "
            "holds none: give the pipeline sources with format: preference (records with chosen and rejected), "
            "or use objective: sft"
        )
    if len(kept_rows) < len(rows):
        log.warning(
            "%d train examples are not preference pairs and are left out of %s",
            len(rows) - len(kept_rows),
            objective,
        )
    return kept_rows


def _continue_adapter(model, start_adapter_dir: Path, training: TrainingSpec):
    """The base with another training's adapter, trainable (`training.start_from`)."""
    from peft import PeftModel

    if not (start_adapter_dir / "adapter_config.json").is_file():
        raise TrainingError(
            f"training.start_from: {start_adapter_dir} holds no adapter; materialize that pipeline's adapter first"
        )
    config = json.loads((start_adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if training.objective == "dpo" and config.get("peft_type") == "ADALORA":
        raise TrainingError(
            "training.start_from names an AdaLoRA adapter: DPO keeps a frozen copy of the starting adapter as its "
            "reference, and PEFT allows one AdaLoRA adapter per model. Start DPO from a lora, ia3 or prefix adapter"
        )
    return PeftModel.from_pretrained(model, start_adapter_dir, is_trainable=True)


def _same_on_every_rank(found):
    """Rank 0 decides which checkpoint to resume (it may remove stale ones); the others follow."""
    import torch.distributed as dist

    choice = [str(found[0]) if found else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    path = Path(choice[0])
    return path, json.loads((path / CHECKPOINT_MARKER).read_text(encoding="utf-8"))


def _schedule(training: TrainingSpec, total_steps: int) -> Callable[[int], float]:
    """lr_at as the multiplier of the peak learning rate that LambdaLR takes."""
    peak = training.learning_rate

    def factor(step: int) -> float:
        return lr_at(step, total_steps, training.warmup_steps, peak, training.lr_scheduler) / peak

    return factor


def _kept(trainer: LoraflowTrainer) -> str:
    return kept(trainer.last_checkpoint)


def _out_of_memory(training: TrainingSpec, pack_to: int | None, where: str) -> str:
    hints = [f"lower training.batch_size (now {training.batch_size}) and raise gradient_accumulation_steps"]
    if not training.gradient_checkpointing:
        hints.append("set training.gradient_checkpointing: true")
    if training.method == "lora":
        hints.append("use method: qlora (a 4-bit base)")
    if pack_to:
        hints.append(f"lower format.max_seq_len (now {pack_to})")
    return f"training ran out of {where} memory: " + "; or ".join(hints)


def training_record(
    training: TrainingSpec,
    dataset_dir: Path,
    pack_to: int | None,
    extra: dict | None,
    result: TrainResult,
    adapter_folder: Path | None = None,
) -> dict:
    """What made this adapter: resolved settings, the adapter method as trained (read from the saved
    adapter in `adapter_folder`: AdaLoRA's final ranks), dataset version, lineage given by the
    caller, versions."""
    import importlib.metadata
    import platform

    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    summary_file = Path(dataset_dir) / "summary.json"
    dataset = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {
        "training": training.model_dump(mode="json"),
        "adapter": adapter_record(training, adapter_folder),
        "runtime": result.runtime,
        "packing": {"enabled": pack_to is not None, "row_tokens": pack_to},
        "dataset_version": dataset.get("version", Path(dataset_dir).name),
        "dataset_path": str(dataset_dir),
        "tracking": result.tracking,
        **(extra or {}),
        "python": platform.python_version(),
        "libraries": versions,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
    }
