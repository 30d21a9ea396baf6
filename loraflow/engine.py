"""loraflow's parts of the training engine: TRL's SFTTrainer, fed loraflow's rows, collators and loss.

The Trainer runs the loop (data order, gradient accumulation, DDP/FSDP/DeepSpeed through
accelerate, clipping, checkpoints, the tracker's callbacks). loraflow adds what it does better:

- its own tokenized rows (loss masks from its templates), padded per batch or packed with a
  block-diagonal mask, handed over as a `datasets.Dataset` that TRL does not re-tokenize;
- the loss: the output head runs only on positions whose next token is trained. On a CUDA GPU,
  TRL's fused head does exactly that in tiles; elsewhere TRL scores every position, which on a CPU
  costs about a third of a step with chat data, so loraflow's `compute_loss` selects the trained
  positions before the head (a forward pre-hook on the head, so DDP and FSDP see an ordinary
  forward). Either way the loss is the sum over trained tokens divided by the whole optimizer
  step's trained tokens, across micro-batches and ranks (the Trainer's `num_items_in_batch`), so N
  ranks follow the loss curve of one process with the same global batch;
- the step's figures: the exact loss of each optimizer step (summed across ranks), tokens/s, ETA,
  a NaN check that names the last checkpoint, and a `progress` callback, after the step's
  evaluation and checkpoint;
- the training's own held-out loss (`training_eval_loss`, on up to 256 eval rows: not the
  evaluation asset's `eval_loss`) as a mean over trained tokens, on every rank's own device.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOTrainer, SFTTrainer

from loraflow.artifacts import write_json_atomic
from loraflow.formatting import IGNORE_INDEX, collate
from loraflow.packing import PackedRow, collate_flat, collate_packed
from loraflow.runtime import TrainingError

log = logging.getLogger("loraflow")

FIGURES = ("_real_tokens", "_examples")
"""Counts the collators add to a batch for the step's figures; popped before the forward."""

CHECKPOINT_MARKER = "loraflow_checkpoint.json"
"""Written into each checkpoint folder once the Trainer has saved it: the run's fingerprint,
loraflow's figures so far and the tracking run. A checkpoint without it is never resumed."""


# ---------------------------------------------------------------------------------------------
# batches


def collate_examples(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch of examples (dicts with input_ids and labels), with the step's counts."""
    batch = collate(rows, pad_id)
    batch["_real_tokens"] = torch.tensor(sum(len(r["input_ids"]) for r in rows))
    batch["_examples"] = torch.tensor(len(rows))
    return batch


def collate_rows(rows: list[dict], pad_id: int, flat: bool, mask_dtype: torch.dtype | None) -> dict:
    """A batch of packed rows: block-diagonal masked, or laid end to end for flash-attention's
    variable-length kernel (`flat`), with the step's counts."""
    packed = [PackedRow(**row) for row in rows]
    batch = collate_flat(packed) if flat else collate_packed(packed, pad_id, mask_dtype)
    batch["_real_tokens"] = torch.tensor(sum(len(r.input_ids) for r in packed))
    batch["_examples"] = torch.tensor(sum(len(set(r.segment_ids)) for r in packed))
    return batch


def make_collator(
    pad_id: int, packed: bool, attention: str, dtype: torch.dtype
) -> Callable[[list[dict]], dict]:
    """The data collator for loraflow's rows. Eager attention adds the mask to the scores, so it gets
    the block-diagonal mask as 0 / -inf in the model's dtype; sdpa takes it as booleans."""
    if not packed:
        return partial(collate_examples, pad_id=pad_id)
    additive = dtype if attention == "eager" else None
    return partial(collate_rows, pad_id=pad_id, flat=attention == "flash_attention_2", mask_dtype=additive)


def collate_pairs(rows: list[dict], pad_id: int, layout: str = "dpo") -> dict[str, torch.Tensor]:
    """A batch of preference pairs, right-padded, with the step's counts. `dpo`: TRL's DPO layout,
    the chosen sequences then the rejected ones in one `input_ids`, with a `completion_mask` that is
    loraflow's labels (so the format's loss mask decides which tokens' log-probabilities count).
    `orpo`: TRL's ORPO layout, `chosen_*` and `rejected_*` tensors with loraflow's labels."""
    chosen = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    rejected = [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in rows]
    if layout == "dpo":
        batch = collate(chosen + rejected, pad_id)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
    else:
        good, bad = collate(chosen, pad_id), collate(rejected, pad_id)
        batch = {f"chosen_{k}": v for k, v in good.items()} | {f"rejected_{k}": v for k, v in bad.items()}
    batch["_real_tokens"] = torch.tensor(
        sum(len(r["input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    )
    batch["_examples"] = torch.tensor(len(rows))
    return batch


def targets_of(rows, packed: bool) -> int:
    """How many tokens of these rows are next-token targets (trained labels after the shift)."""
    labels = (row.labels if packed else row["labels"] for row in rows)
    return sum(sum(label != IGNORE_INDEX for label in seq[1:]) for seq in labels)


# ---------------------------------------------------------------------------------------------
# the loss


@contextmanager
def head_on(model, positions: torch.Tensor):
    """Run the model's output head only on `positions` (a [batch, seq] bool mask) in the block: the
    logits come back as [positions, vocabulary]. Elementwise work after the head (soft-capping,
    scaling) applies unchanged."""
    head = model.get_output_embeddings()

    def select(module, args):
        return (args[0][positions],)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the cross-entropy of every trained token of a batch (the model's shifted targets),
    with the output head run on the trained positions only."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels" and k not in FIGURES}
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    positions = torch.nn.functional.pad(selected, (0, 1), value=False)  # position t predicts token t+1
    core = model.module if hasattr(model, "module") else model  # DDP wraps the model in .module
    with head_on(core, positions):
        logits = model(**inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float(), targets[selected], reduction="sum")


# ---------------------------------------------------------------------------------------------
# the trainer


class LoraflowSteps:
    """What every loraflow trainer adds to its TRL trainer, whatever the objective: the schedule,
    LoRA+, the adapter's regularization term, the exact per-step figures, checkpoint markers and
    the `progress` callback. Mixed in before the TRL class (`class X(LoraflowSteps, SFTTrainer)`)."""

    def __init__(
        self,
        *args,
        eval_rows: list[dict] | None = None,
        progress: Callable[[dict], None] | None = None,
        log_every: int = 1,
        resumed: dict | None = None,
        schedule: Callable[[int], float] | None = None,
        loraplus_ratio: float | None = None,
        fused_head: bool = False,
        fingerprint: str = "",
        regularization: Callable[[torch.nn.Module], torch.Tensor | None] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.regularization = regularization
        """An adapter's own loss term (AdaLoRA's orthogonality penalty), added to every micro-batch's loss."""
        self.fingerprint = fingerprint
        self.run_id: str | None = None
        """The tracking run, once it is open; kept in checkpoints so a resumed training continues it."""
        self.eval_rows = eval_rows or []
        self.progress = progress
        self.log_every = log_every
        self.schedule = schedule
        self.loraplus_ratio = loraplus_ratio
        self.fused_head = fused_head
        self.loss_curve: list[tuple[int, float]] = [tuple(p) for p in (resumed or {}).get("loss_curve", [])]
        self.eval_curve: list[tuple[int, float]] = [tuple(p) for p in (resumed or {}).get("eval_curve", [])]
        self.reward_curve: list[tuple] = [tuple(p) for p in (resumed or {}).get("reward_curve", [])]
        """Preference trainings: (step, reward accuracy, reward margin) of each step."""
        self.tokens_seen = int((resumed or {}).get("tokens_seen", 0))
        self.examples_seen = int((resumed or {}).get("examples_seen", 0))
        self.last_checkpoint: int | None = (resumed or {}).get("step")
        self._step = torch.zeros(3, dtype=torch.float64)  # loss, real tokens, examples of this rank's step
        self._pending: dict | None = None
        self._started = self._window_start = time.perf_counter()
        self._first_step = self.last_checkpoint or 0
        self._window_tokens = 0
        self._tokens_at_start = self.tokens_seen
        self.add_callback(StepFlow(self))
        # loraflow logs each step itself (the "loraflow" logger reaches Dagster's run log); the
        # Trainer's printer would repeat every step's dict on stdout
        self.remove_callback(PrinterCallback)

    def create_model_card(self, *args, **kwargs) -> None:
        """No README in the checkpoint folders: the published model's card is loraflow's own."""

    # -- optimizer and schedule --------------------------------------------------------------

    def create_optimizer(self, model=None):
        """LoRA+ through peft's own helper (the B matrices learn `loraplus_lr_ratio` times faster);
        otherwise the Trainer's optimizer for `args.optim`."""
        if self.optimizer is None and self.loraplus_ratio:
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}
            self.optimizer = create_loraplus_optimizer(
                self.model,
                optimizer_cls,
                lr=self.args.learning_rate,
                loraplus_lr_ratio=self.loraplus_ratio,
                weight_decay=self.args.weight_decay,
                **optimizer_kwargs,
            )
            return self.optimizer
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """loraflow's schedule (warm-up, then cosine or linear decay to a tenth, or constant), as a
        LambdaLR: its state is a step count, saved and restored with the checkpoint."""
        if self.lr_scheduler is None and self.schedule is not None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.schedule)
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    # -- the loss ------------------------------------------------------------------------------

    def _regularized(self, model, loss):
        """The loss plus the adapter's regularization term, spread over the step's micro-batches."""
        if self.regularization is None or not model.training:
            return loss
        term = self.regularization(model)
        if term is None:
            return loss
        term = term / self.args.gradient_accumulation_steps
        if isinstance(loss, tuple):
            return (loss[0] + term, *loss[1:])
        return loss + term

    def _count(self, partial_loss: torch.Tensor, counts: list[torch.Tensor]) -> None:
        """Add one micro-batch's share of the step's loss and its token and example counts."""
        self._step += torch.stack([partial_loss.double().cpu(), *(c.double().cpu() for c in counts)])

    def _rank_scale(self) -> float:
        if self.args.average_tokens_across_devices:
            return self.accelerator.num_processes // self.get_tp_size()
        return 1.0

    # -- the eval loss -------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Mean loss per trained token over the eval rows, on this process's device. Every rank
        scores every row (no collective is needed, and FSDP's forward needs all ranks anyway)."""
        if not self.eval_rows:
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        total = count = 0.0
        size = self.args.per_device_eval_batch_size
        with torch.no_grad():
            for start in range(0, len(self.eval_rows), size):
                chunk_total, chunk_count = self._eval_sums(model, self.eval_rows[start : start + size])
                total += chunk_total
                count += chunk_count
        model.train(was_training)
        value = total / max(1.0, count)
        step = self.state.global_step
        self.eval_curve = [point for point in self.eval_curve if point[0] != step] + [(step, round(value, 6))]
        # not "eval_loss": the evaluation asset's eval_loss is another figure, on its own examples
        metrics = {"training_eval_loss": value}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        if self._pending is not None and self._pending["emit"] == "eval":
            self._emit()
        return metrics

    def _eval_sums(self, model, chunk: list[dict]) -> tuple[float, float]:
        """(summed loss, count) of a chunk of eval rows: here over trained tokens."""
        batch = self._prepare_inputs(collate(chunk, self.processing_class.pad_token_id))
        with self.compute_loss_context_manager():
            total = float(token_loss_sum(model, batch))
        return total, targets_of(chunk, packed=False)

    # -- the step's figures --------------------------------------------------------------------

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and "learning_rate" in logs:
            self._close_step(logs)
        super().log(logs, start_time)

    def _close_step(self, logs: dict) -> None:
        """At the end of each optimizer step (logging_steps is 1): the step's exact loss and counts
        summed over ranks, the NaN check, and the figures for `progress`."""
        step_figures = self._step.to(self.args.device)
        if self.accelerator.num_processes > 1:
            step_figures = self.accelerator.reduce(step_figures, reduction="sum")
        loss, tokens, examples = (float(x) for x in step_figures.cpu())
        self._step.zero_()
        step = self.state.global_step
        if not math.isfinite(loss):
            lr = logs.get("learning_rate", float("nan"))
            raise TrainingError(
                f"the loss became {loss} at step {step} (learning rate {lr:.2e}). Lower training.learning_rate, "
                "keep max_grad_norm on, or use float32/bfloat16 rather than float16"
                + kept(self.last_checkpoint)
            )
        self.tokens_seen += int(tokens)
        self.examples_seen += int(examples)
        self._window_tokens += int(tokens)
        self.loss_curve.append((step, round(loss, 6)))
        logs["loss"] = round(loss, 6)
        logs["tokens_seen"] = self.tokens_seen
        elapsed = time.perf_counter() - self._started
        logs["tokens_per_second"] = round((self.tokens_seen - self._tokens_at_start) / max(elapsed, 1e-9), 2)
        emit = "save" if self.control.should_save else "eval" if self.control.should_evaluate else "now"
        self._pending = {
            "emit": emit,
            "step": step,
            "loss": loss,
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            **self._step_extras(logs),
        }
        if emit == "now":
            self._emit()

    def _step_extras(self, logs: dict) -> dict:
        """Figures of the step that only some objectives have (preference trainings' rewards)."""
        return {}

    def _emit(self) -> None:
        """The progress line and callback of the step that just closed (after its eval and checkpoint)."""
        figures, self._pending = self._pending, None
        step, total = figures["step"], self.state.max_steps
        now = time.perf_counter()
        eval_loss = self.eval_curve[-1][1] if self.eval_curve and self.eval_curve[-1][0] == step else None
        if self.is_world_process_zero() and (step % self.log_every == 0 or step == total):
            rate = self._window_tokens / max(now - self._window_start, 1e-9)
            eta = (now - self._started) / max(1, step - self._first_step) * (total - step)
            rewards = (
                f" | reward accuracy {figures['reward_accuracy']:.2f} | margin {figures['reward_margin']:+.4f}"
                if "reward_accuracy" in figures
                else ""
            )
            log.info(
                "step %d/%d | loss %.4f | lr %.2e | grad norm %.3f | %.0f tokens/s | ETA %s%s%s",
                step,
                total,
                figures["loss"],
                figures["learning_rate"] or 0.0,
                figures["grad_norm"] or 0.0,
                rate,
                duration(eta),
                rewards,
                f" | held-out loss {eval_loss:.4f}" if eval_loss is not None else "",
            )
            self._window_start, self._window_tokens = now, 0
        if self.progress is not None and self.is_world_process_zero():
            self.progress(
                {
                    "step": step,
                    "total_steps": total,
                    "loss": figures["loss"],
                    "learning_rate": figures["learning_rate"],
                    "grad_norm": figures["grad_norm"],
                    "tokens_seen": self.tokens_seen,
                    "tokens_per_second": (self.tokens_seen - self._tokens_at_start)
                    / max(now - self._started, 1e-9),
                    "training_eval_loss": eval_loss,
                    **{key: figures[key] for key in ("reward_accuracy", "reward_margin") if key in figures},
                }
            )


class LoraflowTrainer(LoraflowSteps, SFTTrainer):
    """SFTTrainer with loraflow's loss, eval loss and step figures (see the module docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = [inputs.pop(key) for key in FIGURES]
        if self.fused_head or return_outputs or num_items_in_batch is None:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            scale = self._rank_scale() if num_items_in_batch is not None else 1.0
            partial_loss = (loss[0] if isinstance(loss, tuple) else loss).detach() / scale
        else:
            partial_loss = token_loss_sum(model, inputs) / num_items_in_batch
            # DDP averages gradients over ranks while num_items_in_batch counts every rank's targets
            loss = partial_loss * self._rank_scale()
            partial_loss = partial_loss.detach()
        if model.training:
            self._count(partial_loss, counts)
        return self._regularized(model, loss)


class _PairSteps(LoraflowSteps):
    """What the DPO and ORPO trainers share: loraflow's pre-tokenized pairs go in as they are, the
    step's loss is the mean over its pairs, and the step's reward accuracy and margin (TRL's
    figures, from its own loss computation) join the step's figures."""

    pair_layout = "dpo"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        counts = [inputs.pop(key) for key in FIGURES]
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            # a micro-batch's mean over its pairs; the step's is the mean over micro-batches and ranks
            share = self.args.gradient_accumulation_steps * self.accelerator.num_processes
            self._count((loss[0] if isinstance(loss, tuple) else loss).detach() / share, counts)
        return self._regularized(model, loss)

    def _eval_sums(self, model, chunk: list[dict]) -> tuple[float, float]:
        """(summed pair loss, pairs) of a chunk of eval pairs."""
        batch = collate_pairs(chunk, self.processing_class.pad_token_id, self.pair_layout)
        for key in FIGURES:
            batch.pop(key)
        batch = self._prepare_inputs(batch)
        with self.compute_loss_context_manager():
            loss = super(LoraflowSteps, self).compute_loss(model, batch)
        self._reward_figures("eval")  # the eval pairs' figures are not the training step's
        return float(loss) * len(chunk), float(len(chunk))

    def _reward_figures(self, mode: str) -> dict[str, float]:
        """The reward accuracy and margin TRL measured since they were last read (and forgets them)."""
        raise NotImplementedError

    def _step_extras(self, logs: dict) -> dict:
        figures = self._reward_figures("train")
        self.reward_curve.append((self.state.global_step, *(round(figures[k], 6) for k in REWARDS)))
        return figures


REWARDS = ("reward_accuracy", "reward_margin")
"""A preference training's own figures per step: the share of the step's pairs whose chosen answer
gained more log-probability over the reference than the rejected one (DPO), or that the model
finds more likely than the rejected one (ORPO); and the mean margin, scaled by beta."""


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


class LoraflowDPOTrainer(_PairSteps, DPOTrainer):
    """TRL's DPOTrainer on loraflow's tokenized pairs and collator, with loraflow's step figures.
    The reference is the model with the adapter disabled (the base), or, when the training starts
    from another adapter, TRL's frozen copy of that adapter."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """loraflow's rows are tokenized already, with its template and masks: TRL's own tokenizing
        (which would re-render and mask every completion token) is skipped."""
        return dataset

    def _reward_figures(self, mode: str) -> dict[str, float]:
        metrics = self._metrics[mode]
        figures = {
            "reward_accuracy": _mean(metrics.get("rewards/accuracies", [])),
            "reward_margin": _mean(metrics.get("rewards/margins", [])),
        }
        if mode == "eval":
            metrics.clear()
        return figures


def _orpo_trainer():
    """TRL's ORPOTrainer (in trl.experimental) subclassed with loraflow's parts, imported on first use."""
    import torch.nn.functional as F
    from trl.experimental.orpo import ORPOTrainer

    class LoraflowORPOTrainer(_PairSteps, ORPOTrainer):
        """TRL's ORPOTrainer on loraflow's tokenized pairs, with loraflow's step figures. Its
        chosen-answer loss covers the tokens loraflow's labels train (TRL's counts the prompt too)."""

        pair_layout = "orpo"

        def tokenize_row(self, feature, model=None) -> dict:
            """loraflow's rows are tokenized already: kept as they are."""
            return feature

        def concatenated_forward(self, model, batch):
            outputs = super().concatenated_forward(model, batch)
            chosen_logits = outputs[2]  # already shifted: position t predicts token t + 1
            labels = batch["chosen_labels"][:, 1:]
            width = chosen_logits.shape[1]
            labels = F.pad(labels, (0, width - labels.shape[1]), value=IGNORE_INDEX)[:, :width]
            nll = F.cross_entropy(
                chosen_logits.reshape(-1, chosen_logits.shape[-1]).float(),
                labels.reshape(-1).to(chosen_logits.device),
                ignore_index=IGNORE_INDEX,
            )
            return (*outputs[:4], nll, *outputs[5:])

        def _reward_figures(self, mode: str) -> dict[str, float]:
            prefix = "eval_" if mode == "eval" else ""
            stored = self._stored_metrics[mode]
            figures = {
                "reward_accuracy": _mean(stored.get(f"{prefix}rewards/accuracies", [])),
                "reward_margin": _mean(stored.get(f"{prefix}rewards/margins", [])),
            }
            if mode == "eval":
                stored.clear()
            return figures

    return LoraflowORPOTrainer


def trainer_class(objective: str):
    """The trainer for `training.objective`."""
    if objective == "dpo":
        return LoraflowDPOTrainer
    if objective == "orpo":
        return _orpo_trainer()
    return LoraflowTrainer


class StepFlow(TrainerCallback):
    """When the Trainer saves and what a checkpoint carries: no checkpoint at the last step (the
    adapter is saved instead), and each checkpoint gets loraflow's marker (before the step's
    progress is reported, so a progress callback that stops the run leaves a resumable checkpoint)."""

    def __init__(self, trainer: LoraflowTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._started = self.trainer._window_start = time.perf_counter()
        self.trainer._tokens_at_start = self.trainer.tokens_seen
        self.trainer._first_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        if state.is_world_process_zero:
            folder = checkpoint_path(args.output_dir, state.global_step)
            # a pickle of the arguments, which resuming never reads: the folder keeps tensors and JSON
            (folder / "training_args.bin").unlink(missing_ok=True)
            write_json_atomic(
                folder / CHECKPOINT_MARKER,
                {
                    "fingerprint": trainer.fingerprint,
                    "figures": checkpoint_figures(trainer),
                    "run_id": trainer.run_id,
                },
            )
        trainer.last_checkpoint = state.global_step
        if trainer._pending is not None and trainer._pending["emit"] == "save":
            trainer._emit()
        return control


def checkpoint_figures(trainer: LoraflowTrainer) -> dict:
    """What a checkpoint keeps of loraflow's own figures, to resume them with it."""
    return {
        "step": trainer.state.global_step,
        "loss_curve": trainer.loss_curve,
        "eval_curve": trainer.eval_curve,
        "reward_curve": trainer.reward_curve,
        "tokens_seen": trainer.tokens_seen,
        "examples_seen": trainer.examples_seen,
    }


def kept(step: int | None) -> str:
    if step is None:
        return ". No checkpoint was written yet."
    return (
        f". The checkpoint at step {step} is kept; re-materializing with the same settings resumes from it."
    )


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"
