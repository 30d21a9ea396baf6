"""The training loop: LoRA or QLoRA on a tokenized dataset, in one readable function.

    base model (4-bit NF4 for qlora) -> LoRA adapters -> AdamW over the adapter weights,
    linear warm-up then cosine decay, gradient accumulation and clipping -> adapter folder

Progress (step, loss, learning rate, grad norm, tokens/s, ETA) goes to the "loraflow" logger,
which Dagster shows in the run's log.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraflow.artifacts import atomic_dir
from loraflow.base_model import load_causal_lm, load_tokenizer
from loraflow.dataset import dataset_tokenizer, load_split, stored_template
from loraflow.formatting import collate
from loraflow.packing import collate_flat, collate_packed, pack_examples, packing_efficiency
from loraflow.spec import LoraSpec, TrainingSpec

log = logging.getLogger(__name__)

TRAINING_SUMMARY = "training_summary.json"


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
    trainable_params: int
    total_params: int
    packing_efficiency: float | None = None
    """Real tokens over row tokens of the packed rows; None when not packing."""
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.total_params


def lora_config(lora: LoraSpec):
    """The PEFT LoraConfig for the spec's adapter shape."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting 4-bit packed weights at their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if hasattr(param, "quant_state"):  # bitsandbytes packs two 4-bit values per byte
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_attention(training: TrainingSpec) -> None:
    """Fail early, and say why, when the chosen attention kernel cannot run here."""
    if training.attn_implementation != "flash_attention_2":
        return
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
        raise RuntimeError(
            "training.attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use sdpa here"
        )


def train_adapter(
    training: TrainingSpec,
    base_model_dir: Path,
    dataset_dir: Path,
    adapter_dir: Path,
    trust_remote_code: bool = False,
    pack_to: int | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the dataset's train split and write it to `adapter_dir` atomically.

    `pack_to`: pack examples into rows of this many tokens (`format.packing`); None pads each batch.
    The tokenizer saved with the adapter carries the dataset's chat template.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_attention(training)
    torch.manual_seed(training.seed)
    random.seed(training.seed)
    tokenizer = dataset_tokenizer(base_model_dir, dataset_dir, trust_remote_code)
    qlora = training.method == "qlora"
    model = load_causal_lm(
        base_model_dir,
        dtype=training.dtype,
        quantization=training.quantization if qlora else None,
        trust_remote_code=trust_remote_code,
        attn_implementation=training.attn_implementation,
    )
    model.config.use_cache = False
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(training.lora))
    trainable, total = count_parameters(model)
    log.info(
        "trainable params: %s || all params: %s || trainable%%: %.4f",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )

    train_rows = load_split(dataset_dir, "train")
    if not train_rows:
        raise ValueError(f"{dataset_dir}: the train split is empty; there is nothing to train on")
    efficiency = None
    if pack_to is not None:
        units = pack_examples(train_rows, pack_to)
        efficiency = packing_efficiency(units, pack_to)
        log.info(
            "packed %d examples into %d rows of %d tokens (%.1f%% real tokens)",
            len(train_rows),
            len(units),
            pack_to,
            100 * efficiency,
        )
        flat = training.attn_implementation == "flash_attention_2"

        def to_batch(rows):
            return collate_flat(rows) if flat else collate_packed(rows, tokenizer.pad_token_id)

        def real_tokens(rows) -> int:
            return sum(len(row.input_ids) for row in rows)
    else:
        units = train_rows

        def to_batch(rows):
            return collate(rows, tokenizer.pad_token_id)

        def real_tokens(rows) -> int:
            return sum(len(row["input_ids"]) for row in rows)

    per_step = training.batch_size * training.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(units) / per_step)
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
    device = next(p for p in model.parameters() if p.requires_grad).device

    def batches():
        """Batches (of examples, or of packed rows) forever, reshuffled each epoch from the seed."""
        order_rng = random.Random(training.seed)
        while True:
            order = list(range(len(units)))
            order_rng.shuffle(order)
            for start in range(0, len(order), training.batch_size):
                yield [units[i] for i in order[start : start + training.batch_size]]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    stream = batches()
    model.train()
    log.info(
        "training %s: %d steps of %d %s (%d train examples, %.2f epochs)",
        training.method,
        total_steps,
        per_step,
        "packed rows" if pack_to else "examples",
        len(train_rows),
        total_steps / steps_per_epoch,
    )

    loss_curve: list[tuple[int, float]] = []
    tokens_seen = examples_seen = 0
    started = window_start = time.perf_counter()
    window_tokens = 0
    for step in range(total_steps):
        lr = lr_at(step, total_steps, training.warmup_steps, training.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(training.gradient_accumulation_steps):
            rows = next(stream)
            batch = {k: v.to(device) for k, v in to_batch(rows).items()}
            loss = model(**batch).loss / training.gradient_accumulation_steps
            loss.backward()
            step_loss += loss.item()
            n_tokens = real_tokens(rows)
            tokens_seen += n_tokens
            window_tokens += n_tokens
            examples_seen += sum(len(set(row.segment_ids)) for row in rows) if pack_to else len(rows)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_curve.append((step + 1, round(step_loss, 5)))

        if (step + 1) % training.log_every == 0 or step + 1 == total_steps:
            now = time.perf_counter()
            rate = window_tokens / (now - window_start)
            eta = (now - started) / (step + 1) * (total_steps - step - 1)
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tokens/s | ETA %s",
                step + 1,
                total_steps,
                step_loss,
                lr,
                grad_norm,
                rate,
                _duration(eta),
            )
            window_start, window_tokens = now, 0

    wall = time.perf_counter() - started
    result = TrainResult(
        adapter_dir=str(adapter_dir),
        steps=total_steps,
        examples_seen=examples_seen,
        tokens_seen=tokens_seen,
        final_loss=loss_curve[-1][1],
        tokens_per_second=round(tokens_seen / wall, 1),
        wall_seconds=round(wall, 2),
        peak_memory_mb=round(peak_memory_mb(), 1),
        trainable_params=trainable,
        total_params=total,
        packing_efficiency=round(efficiency, 4) if efficiency is not None else None,
        loss_curve=loss_curve,
    )
    with atomic_dir(Path(adapter_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAINING_SUMMARY).write_text(json.dumps(asdict(result), indent=2))
        if load_tokenizer(tmp, trust_remote_code).chat_template != stored_template(dataset_dir):
            raise RuntimeError(
                f"{adapter_dir}: the saved tokenizer's chat template differs from the dataset's"
            )
    return result


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
