"""The training loop: LoRA or QLoRA on a tokenized dataset, in one readable function.

    base model (4-bit NF4 for qlora) -> LoRA adapters -> optimizer over the adapter weights
    -> steps: forward, loss on trained tokens, backward, (sum gradients across ranks), clip, step
    -> checkpoints every N steps -> adapter folder

One process, or N under torchrun. Every rank walks the same seeded order of examples; each takes
its share of a step's examples, and the adapter's gradients are summed across ranks before the
optimizer step. The loss of a step is the sum over all its trained tokens divided by their count,
whichever rank or micro-batch a token fell in, so N processes follow the loss curve of one
process with the same global batch, and gradient accumulation changes nothing but memory.

Checkpoints hold the adapter weights, optimizer state, RNG states and the step; the data position
follows from the step (the order of each epoch comes from the seed), so a resumed run continues
bit for bit where the interrupted one stopped. They are plain tensors and numbers, loaded with
`torch.load(weights_only=True)`.

Progress (step, loss, learning rate, grad norm, tokens/s, ETA) goes to the "loraflow" logger,
which Dagster shows in the run's log, and to an optional `progress` callback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraflow.artifacts import atomic_dir, write_json_atomic
from loraflow.base_model import load_causal_lm, load_tokenizer
from loraflow.dataset import dataset_tokenizer, load_split, stored_template
from loraflow.formatting import IGNORE_INDEX, collate
from loraflow.packing import collate_flat, collate_packed, pack_examples, packing_efficiency
from loraflow.spec import LoraSpec, TrainingSpec

log = logging.getLogger(__name__)

TRAINING_SUMMARY = "training_summary.json"
TRAINING_RECORD = "training_record.json"
LOSS_CURVE = "loss_curve.svg"
CHECKPOINT_FILE = "state.pt"
EVAL_EXAMPLES = 256


class TrainingError(RuntimeError):
    """Training stopped: what happened, and what to change."""


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
    resumed_from_step: int = 0
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    world_size: int = 1
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)

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
        for curve in ("loss_curve", "eval_curve"):
            fields[curve] = [tuple(point) for point in fields[curve]]
        return cls(**fields)


# ---------------------------------------------------------------------------------------------
# the pieces the loop is made of


def lora_config(lora: LoraSpec):
    """The PEFT LoraConfig for the spec's adapter shape."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


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
        raise TrainingError(
            "training.attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install flash-attn); use sdpa here"
        )


def make_optimizer(model, training: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; LoRA+ gives the B matrices their own, larger rate."""
    lora = training.lora
    fast = [
        p for n, p in model.named_parameters() if p.requires_grad and lora.loraplus_lr_ratio and "lora_B" in n
    ]
    fast_ids = {id(p) for p in fast}
    slow = [p for p in model.parameters() if p.requires_grad and id(p) not in fast_ids]
    groups = [{"params": slow, "lr_scale": 1.0}]
    if fast:
        groups.append({"params": fast, "lr_scale": lora.loraplus_lr_ratio})
    if training.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=training.learning_rate, weight_decay=training.weight_decay)
    if not torch.cuda.is_available():
        raise TrainingError(
            f"training.optimizer {training.optimizer} runs on a CUDA GPU only (bitsandbytes); use adamw here"
        )
    import bitsandbytes as bnb

    kind = bnb.optim.PagedAdamW8bit if training.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return kind(groups, lr=training.learning_rate, weight_decay=training.weight_decay)


def attach_lora(model, training: TrainingSpec):
    """The model with LoRA adapters; a target module the model lacks is a clear error."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(training.lora))
    except ValueError as err:
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if "Linear" in type(module).__name__
            }
        )
        raise TrainingError(
            f"training.lora.target_modules {training.lora.target_modules}: {str(err).rstrip('.')}. This model's linear layers "
            f"are named {', '.join(linear)}; list some of them, or use all-linear"
        ) from None


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropy of every trained token of a batch (the model's shifted targets).

    The output head runs only on positions whose next token is trained: for chat data most
    positions are prompts, and the head (hidden x vocabulary) is a large share of a small model.
    Models whose head does more than one linear map (logit soft-capping, scaling) get full logits.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = core.config
    plain_head = (
        hasattr(core, "lm_head")
        and hasattr(core, "model")
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) is None
    )
    if plain_head:
        hidden = core.model(**inputs).last_hidden_state[:, :-1]
        selected = targets != IGNORE_INDEX
        logits = core.lm_head(hidden[selected]).float()
        return torch.nn.functional.cross_entropy(logits, targets[selected], reduction="sum")
    logits = model(**inputs).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum", ignore_index=IGNORE_INDEX
    )


def targets_of(rows, packed: bool) -> int:
    """How many tokens of these rows are next-token targets (trained labels after the shift)."""
    labels = (row.labels if packed else row["labels"] for row in rows)
    return sum(sum(label != IGNORE_INDEX for label in seq[1:]) for seq in labels)


@torch.no_grad()
def eval_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean loss per trained token on eval rows."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        total += float(token_loss_sum(model, collate(chunk, pad_id)))
        count += targets_of(chunk, packed=False)
    model.train(was_training)
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------
# ranks and checkpoints


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_ranks() -> Ranks:
    """Join the process group torchrun started (gloo on CPU, nccl on GPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size())


def sum_gradients(params: list[torch.nn.Parameter], ranks: Ranks) -> None:
    """Add up the gradients of all ranks, in one flat buffer (one collective per step)."""
    if ranks.world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


def run_fingerprint(
    training: TrainingSpec, dataset_dir: Path, base_model_dir: Path, pack_to: int | None
) -> str:
    """What a checkpoint must match to be resumed: the settings, the data and the base model."""
    blob = json.dumps(
        [training.model_dump(mode="json"), Path(dataset_dir).name, str(base_model_dir), pack_to],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latest_checkpoint(folder: Path, fingerprint: str) -> dict | None:
    """The newest readable checkpoint of this run, or None. Others (older settings) are skipped."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("step-*/" + CHECKPOINT_FILE), reverse=True):
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - a damaged checkpoint is skipped, never trusted
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        if state.get("fingerprint") == fingerprint:
            return state
        log.info("checkpoint %s belongs to other settings; not resuming from it", path.parent.name)
    return None


def save_checkpoint(folder: Path, state: dict, keep: int) -> Path:
    """Write one checkpoint atomically, then drop all but the newest `keep`."""
    target = folder / f"step-{state['step']:07d}"
    with atomic_dir(target) as tmp:
        torch.save(state, tmp / CHECKPOINT_FILE)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate wants the nested tuples it gave (a checkpoint may hand back lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


# ---------------------------------------------------------------------------------------------
# the loop


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
) -> TrainResult:
    """Train a LoRA adapter on the dataset's train split and write it to `adapter_dir` atomically.

    `pack_to`: pack examples into rows of this many tokens (`format.packing`); None pads each batch.
    `progress`: called on the main rank after every step with that step's figures.
    `checkpoint_dir`: where checkpoints go (default: beside the adapter, `<adapter>.checkpoints`);
    the newest one matching these settings is resumed from.
    `record`: lineage written into the adapter's training record (data version, base model hash).
    The tokenizer saved with the adapter carries the dataset's chat template.
    """
    from peft import prepare_model_for_kbit_training

    check_attention(training)
    ranks = join_ranks()
    adapter_dir = Path(adapter_dir)
    checkpoint_dir = Path(checkpoint_dir or adapter_dir.with_name(adapter_dir.name + ".checkpoints"))
    fingerprint = run_fingerprint(training, dataset_dir, base_model_dir, pack_to)
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
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training.gradient_checkpointing
        )
    elif training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = attach_lora(model, training)
    trainable, total = count_parameters(model)
    if ranks.main:
        log.info(
            "trainable params: %s || all params: %s || trainable%%: %.4f",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )

    train_rows = load_split(dataset_dir, "train")
    eval_rows = load_split(dataset_dir, "eval")[:EVAL_EXAMPLES] if training.eval_every else []
    if not train_rows:
        raise TrainingError(f"{dataset_dir}: the train split is empty; there is nothing to train on")
    efficiency = None
    packed = pack_to is not None
    if packed:
        units = pack_examples(train_rows, pack_to)
        efficiency = packing_efficiency(units, pack_to)
        (log.info if ranks.main else log.debug)(
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

        def examples_in(rows) -> int:
            return sum(len(set(row.segment_ids)) for row in rows)
    else:
        units = train_rows

        def to_batch(rows):
            return collate(rows, tokenizer.pad_token_id)

        def real_tokens(rows) -> int:
            return sum(len(row["input_ids"]) for row in rows)

        def examples_in(rows) -> int:
            return len(rows)

    micro = training.batch_size  # per rank and forward pass
    per_step = micro * training.gradient_accumulation_steps * ranks.world
    steps_per_epoch = math.ceil(len(units) / per_step)
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))
    device = next(p for p in model.parameters() if p.requires_grad).device
    orders: dict[int, list[int]] = {}

    def unit_at(position: int):
        """The unit at a global position in the endless, per-epoch reshuffled order."""
        epoch, offset = divmod(position, len(units))
        if epoch not in orders:
            order = list(range(len(units)))
            random.Random(training.seed * 1_000_003 + epoch).shuffle(order)
            orders.clear()
            orders[epoch] = order
        return units[orders[epoch][offset]]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, training)

    start_step, loss_curve, eval_curve = 0, [], []
    tokens_seen = examples_seen = 0
    state = latest_checkpoint(checkpoint_dir, fingerprint)
    if state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["adapter"].items():
                named[name].copy_(tensor)
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        start_step = state["step"]
        loss_curve = [tuple(x) for x in state["loss_curve"]]
        eval_curve = [tuple(x) for x in state["eval_curve"]]
        tokens_seen, examples_seen = state["tokens_seen"], state["examples_seen"]
        log.info("resuming from the checkpoint at step %d of %d", start_step, total_steps)

    model.train()
    (log.info if ranks.main else log.debug)(
        "training %s: %d steps of %d %s (%d train examples, %.2f epochs)%s",
        training.method,
        total_steps,
        per_step,
        "packed rows" if packed else "examples",
        len(train_rows),
        total_steps / steps_per_epoch,
        f" on {ranks.world} ranks" if ranks.world > 1 else "",
    )

    started = window_start = time.perf_counter()
    window_tokens, resumed_tokens = 0, tokens_seen
    last_checkpoint = start_step if state is not None else None
    try:
        for step in range(start_step, total_steps):
            lr = lr_at(
                step, total_steps, training.warmup_steps, training.learning_rate, training.lr_scheduler
            )
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            step_units = [unit_at(step * per_step + i) for i in range(per_step)]
            step_targets = targets_of(step_units, packed)
            mine = step_units[ranks.rank :: ranks.world]
            step_loss = 0.0
            for start in range(0, len(mine), micro):
                rows = mine[start : start + micro]
                batch = {k: v.to(device) for k, v in to_batch(rows).items()}
                loss = token_loss_sum(model, batch) / max(1, step_targets)
                loss.backward()
                step_loss += loss.item()
            sum_gradients(params, ranks)
            step_loss = _sum_across(step_loss, ranks)
            if not math.isfinite(step_loss):
                raise TrainingError(
                    f"the loss became {step_loss} at step {step + 1} (learning rate {lr:.2e}). Lower "
                    "training.learning_rate, keep max_grad_norm on, or use float32/bfloat16 rather than float16"
                    + _kept(last_checkpoint)
                )
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens = real_tokens(step_units)
            tokens_seen += step_tokens
            window_tokens += step_tokens
            examples_seen += examples_in(step_units)
            loss_curve.append((step + 1, round(step_loss, 6)))
            done = step + 1
            if training.eval_every and (done % training.eval_every == 0 or done == total_steps) and eval_rows:
                eval_curve.append(
                    (done, round(eval_loss(model, eval_rows, tokenizer.pad_token_id, micro), 6))
                )

            if ranks.main and (done % training.log_every == 0 or done == total_steps):
                now = time.perf_counter()
                rate = window_tokens / (now - window_start)
                eta = (now - started) / (done - start_step) * (total_steps - done)
                log.info(
                    "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tokens/s | ETA %s%s",
                    done,
                    total_steps,
                    step_loss,
                    lr,
                    grad_norm,
                    rate,
                    _duration(eta),
                    f" | eval loss {eval_curve[-1][1]:.4f}"
                    if eval_curve and eval_curve[-1][0] == done
                    else "",
                )
                window_start, window_tokens = now, 0
            if training.checkpoint_every and done % training.checkpoint_every == 0 and done < total_steps:
                if ranks.main:
                    save_checkpoint(
                        checkpoint_dir,
                        {
                            "fingerprint": fingerprint,
                            "step": done,
                            "adapter": {
                                n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad
                            },
                            "optimizer": optimizer.state_dict(),
                            "rng": rng_state(),
                            "loss_curve": loss_curve,
                            "eval_curve": eval_curve,
                            "tokens_seen": tokens_seen,
                            "examples_seen": examples_seen,
                        },
                        training.keep_checkpoints,
                    )
                last_checkpoint = done
            if progress is not None and ranks.main:
                progress(
                    {
                        "step": done,
                        "total_steps": total_steps,
                        "loss": step_loss,
                        "learning_rate": lr,
                        "grad_norm": grad_norm,
                        "tokens_seen": tokens_seen,
                        "tokens_per_second": (tokens_seen - resumed_tokens) / (time.perf_counter() - started),
                        "eval_loss": eval_curve[-1][1] if eval_curve and eval_curve[-1][0] == done else None,
                    }
                )
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(_out_of_memory(training, pack_to, "GPU") + _kept(last_checkpoint)) from None
    except MemoryError:
        raise TrainingError(_out_of_memory(training, pack_to, "CPU") + _kept(last_checkpoint)) from None
    except RuntimeError as err:
        if "out of memory" in str(err) or "can't allocate memory" in str(err):
            raise TrainingError(
                _out_of_memory(training, pack_to, "device") + _kept(last_checkpoint)
            ) from None
        raise

    wall = time.perf_counter() - started
    evals = [loss for _, loss in eval_curve]
    result = TrainResult(
        adapter_dir=str(adapter_dir),
        steps=total_steps,
        examples_seen=examples_seen,
        tokens_seen=tokens_seen,
        final_loss=loss_curve[-1][1],
        tokens_per_second=round((tokens_seen - resumed_tokens) / wall, 1),
        wall_seconds=round(wall, 2),
        peak_memory_mb=round(peak_memory_mb(), 1),
        trainable_params=trainable,
        total_params=total,
        packing_efficiency=round(efficiency, 4) if efficiency is not None else None,
        resumed_from_step=start_step,
        final_eval_loss=evals[-1] if evals else None,
        best_eval_loss=min(evals) if evals else None,
        world_size=ranks.world,
        loss_curve=loss_curve,
        eval_curve=eval_curve,
    )
    if ranks.main:
        with atomic_dir(adapter_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / TRAINING_SUMMARY).write_text(json.dumps(asdict(result), indent=2))
            write_json_atomic(tmp / TRAINING_RECORD, training_record(training, dataset_dir, pack_to, record))
            (tmp / LOSS_CURVE).write_text(loss_curve_svg(loss_curve, eval_curve), encoding="utf-8")
            if load_tokenizer(tmp, trust_remote_code).chat_template != stored_template(dataset_dir):
                raise TrainingError(
                    f"{adapter_dir}: the saved tokenizer's chat template differs from the dataset's"
                )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def _sum_across(value: float, ranks: Ranks) -> float:
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor)


def _kept(step: int | None) -> str:
    if step is None:
        return ". No checkpoint was written yet."
    return (
        f". The checkpoint at step {step} is kept; re-materializing with the same settings resumes from it."
    )


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
    training: TrainingSpec, dataset_dir: Path, pack_to: int | None, extra: dict | None
) -> dict:
    """What made this adapter: resolved settings, dataset version, lineage given by the caller, versions."""
    import importlib.metadata
    import platform

    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    summary_file = Path(dataset_dir) / "summary.json"
    dataset = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return {
        "training": training.model_dump(mode="json"),
        "packing": {"enabled": pack_to is not None, "row_tokens": pack_to},
        "dataset_version": dataset.get("version", Path(dataset_dir).name),
        "dataset_path": str(dataset_dir),
        **(extra or {}),
        "python": platform.python_version(),
        "libraries": versions,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
    }


def loss_curve_svg(loss: list[tuple[int, float]], evals: list[tuple[int, float]]) -> str:
    """A small line chart of the training loss (and eval loss, if any) per step, as SVG."""
    width, height, pad = 480, 240, 36
    points = loss + evals
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"/>'
    max_step = max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    span = (high - low) or 1.0

    def xy(step: float, value: float) -> str:
        x = pad + (width - 2 * pad) * (step / max_step if max_step else 0)
        y = height - pad - (height - 2 * pad) * (value - low) / span
        return f"{x:.1f},{y:.1f}"

    def line(series, colour):
        return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(xy(s, v) for s, v in series)}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
        f'<text x="{pad}" y="{pad - 8}">loss {high:.3f}</text>',
        f'<text x="{pad}" y="{height - pad + 14}">{low:.3f}</text>',
        f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="end">step {max_step}</text>',
        line(loss, "#2563eb"),
    ]
    if evals:
        parts.append(line(evals, "#dc2626"))
        parts.append(f'<text x="{width - pad}" y="{pad - 8}" text-anchor="end" fill="#dc2626">eval</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
