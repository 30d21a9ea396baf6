"""The adapter methods: which PEFT config each `training.adapter` becomes, and what each needs
during training.

    lora      LoraConfig (with the `lora` variants: DoRA, rsLoRA; LoRA+ is the optimizer's)
    adalora   AdaLoraConfig: LoRA in SVD form (P·diag(E)·Q) whose rank budget moves to the layers
              that matter; needs `update_and_allocate` after every optimizer step
              (`adapter_callbacks`) and its orthogonality penalty in the loss
              (`adapter_regularization`)
    ia3       IA3Config: a learned scaling vector on each target layer's output (on the input of
              the feed-forward ones); starts at ones, so the model starts as the base
    prefix    PrefixTuningConfig: trained key/value vectors before every sequence in every layer;
              cannot be merged into the weights, so it is published as an adapter beside its base

Everything a method does is PEFT's: the layers, the rank allocator, saving and loading (an
AdaLoRA adapter is saved at its final ranks, `rank_pattern` in adapter_config.json), merging.
Written by hand here, and why:

- `AdaLoraBudget` (a TrainerCallback): PEFT leaves the call of `update_and_allocate(step)` to the
  training loop ("after optimizer.step(), before zero_grad()"), and transformers' Trainer has no
  switch for it; its `on_optimizer_step` event is exactly that moment. The same callback keeps
  AdaLoRA resumable: PEFT saves an adapter cut to its rank pattern, which the Trainer cannot load
  back into the full-rank layers it resumes, and keeps the allocator's scores in memory only.
- `orthogonality_penalty`: PEFT computes it inside AdaLoraModel.forward, and only when the model is
  given labels, while loraflow's loss runs the head on trained positions itself, without labels. So
  the PEFT config's own `orth_reg_weight` is 0 (TRL's fused-head path on a GPU does pass labels,
  and would count it twice) and loraflow adds the same term, PEFT's formula, on every path.
- `adapter_method`, `saved_adalora_ranks`: read the saved adapter_config.json and the shapes in
  adapter_model.safetensors, so publishing and evaluation can branch on a trained adapter without
  loading a model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from loraflow.runtime import TrainingError
from loraflow.spec import AdaLoraSpec, IA3Spec, LoraSpec, PrefixSpec, TrainingSpec

log = logging.getLogger("loraflow")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

PEFT_TYPES = {"LORA": "lora", "ADALORA": "adalora", "IA3": "ia3", "PREFIX_TUNING": "prefix"}
"""adapter_config.json's `peft_type` -> the `training.adapter` that trains it."""

METHOD_NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "ia3": "IA3", "prefix": "prefix tuning"}
"""How a method is named in messages and model cards."""


def mergeable(adapter_method: str) -> bool:
    """Whether an adapter of this method can be merged into its base's weights: LoRA, AdaLoRA and IA3
    change weights (a low-rank update, a scaling of rows or columns); a prefix adds key/value vectors
    before every sequence, which no weight can hold."""
    return adapter_method != "prefix"


# ---------------------------------------------------------------------------------------------
# configs


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


def adalora_schedule(adalora: AdaLoraSpec, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) for a run of `total_steps` optimizer steps.

    Unset, tinit is a tenth of the steps and tfinal a fifth, at least one: PEFT fixes the final
    ranks at step total - tfinal, so with tfinal 0 the budget would never reach target_r. What is
    left between them (at least one step) is the budgeting phase, where ranks are pruned."""
    tinit = adalora.tinit if adalora.tinit is not None else total_steps // 10
    tfinal = adalora.tfinal if adalora.tfinal is not None else max(1, total_steps // 5)
    if tinit >= total_steps - tfinal:
        given = [
            f"{key} {value}"
            for key, value in (("tinit", adalora.tinit), ("tfinal", adalora.tfinal))
            if value is not None
        ]
        resolved = f"tinit {tinit} (steps at init_r) + tfinal {tfinal} (steps at the final ranks)"
        raise TrainingError(
            f"training.adalora: {resolved} leave no step of {total_steps} to reallocate the rank budget in"
            + (f" ({', '.join(given)} set in the YAML)" if given else "")
            + ". Lower training.adalora.tinit/tfinal, or train more steps (training.max_steps or epochs); "
            "AdaLoRA needs at least 2 steps"
        )
    if tfinal == 0:
        log.warning(
            "training.adalora.tfinal is 0: PEFT fixes the final ranks at step total - tfinal, which a run never "
            "reaches, so the budget ends above target_r; leave tfinal unset (a fifth of the steps) to reach it"
        )
    return tinit, tfinal


def adalora_config(training: TrainingSpec, total_steps: int):
    """The PEFT AdaLoraConfig: init_r to target_r over `total_steps`, on lora.target_modules with
    lora.alpha and lora.dropout. Its orth_reg_weight is 0: loraflow adds the penalty itself (see the
    module docstring)."""
    from peft import AdaLoraConfig

    adalora, lora = training.adalora, training.lora
    tinit, tfinal = adalora_schedule(adalora, total_steps)
    return AdaLoraConfig(
        init_r=adalora.init_r,
        target_r=adalora.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=adalora.delta_t,
        beta1=adalora.beta1,
        beta2=adalora.beta2,
        orth_reg_weight=0.0,
        total_step=total_steps,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def ia3_config(ia3: IA3Spec):
    """The PEFT IA3Config: a scaling vector on each of target_modules."""
    from peft import IA3Config

    return IA3Config(
        target_modules=ia3.target_modules,
        feedforward_modules=ia3.feedforward_modules,
        task_type="CAUSAL_LM",
    )


def prefix_config(prefix: PrefixSpec):
    """The PEFT PrefixTuningConfig: num_virtual_tokens key/value vectors per layer (PEFT reads the
    layer count and the key/value width, grouped-query heads included, from the model's config)."""
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        num_virtual_tokens=prefix.num_virtual_tokens,
        prefix_projection=prefix.projection,
        encoder_hidden_size=prefix.projection_hidden,
        task_type="CAUSAL_LM",
    )


def peft_config(training: TrainingSpec, total_steps: int):
    """The PEFT config of `training.adapter`."""
    if training.adapter == "adalora":
        return adalora_config(training, total_steps)
    if training.adapter == "ia3":
        return ia3_config(training.ia3)
    if training.adapter == "prefix":
        return prefix_config(training.prefix)
    return lora_config(training.lora)


# ---------------------------------------------------------------------------------------------
# attaching


def attach_adapter(model, training: TrainingSpec, total_steps: int):
    """The model with `training.adapter`'s adapter, for `total_steps` optimizer steps (AdaLoRA's
    schedule depends on them). A target module the model lacks, or a method that cannot run with
    these settings, is a TrainingError naming the YAML key and what to do."""
    from peft import get_peft_model

    _refuse_unsupported(training)
    config = peft_config(training, total_steps)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        if training.adapter == "prefix":
            raise TrainingError(
                f"training.prefix: PEFT cannot put a prefix on this model ({str(err).rstrip('.')}). "
                "Use another training.adapter (lora, adalora or ia3)"
            ) from None
        key, targets = (
            ("training.ia3.target_modules", training.ia3.target_modules)
            if training.adapter == "ia3"
            else ("training.lora.target_modules", training.lora.target_modules)
        )
        linear = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if "Linear" in type(module).__name__
            }
        )
        hint = (
            "; training.ia3.feedforward_modules must be some of target_modules"
            if training.adapter == "ia3"
            else ", or use all-linear"
        )
        raise TrainingError(
            f"{key} {targets}: {str(err).rstrip('.')}. This model's linear layers "
            f"are named {', '.join(linear)}; list some of them{hint}"
        ) from None


def _refuse_unsupported(training: TrainingSpec) -> None:
    """What a method cannot do with these settings, before any step: AdaLoRA's allocator scores whole
    parameters and their gradients, which FSDP shards across ranks; IA3's feed-forward modules must
    be among its targets."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if training.adapter == "adalora" and training.distributed == "fsdp" and ranks > 1:
        raise TrainingError(
            "training.adapter adalora with training.distributed fsdp: AdaLoRA's rank allocator scores whole "
            "parameters and their gradients, which FSDP shards across ranks. Use distributed: ddp (AdaLoRA's "
            "adapters are small), or adapter: lora"
        )
    ia3 = training.ia3
    strays = [m for m in ia3.feedforward_modules if m not in ia3.target_modules]
    if training.adapter == "ia3" and strays:
        raise TrainingError(
            f"training.ia3.feedforward_modules {strays} are not in training.ia3.target_modules "
            f"{ia3.target_modules}; add them to target_modules, or remove them from feedforward_modules"
        )


def unwrapped(model):
    """The PeftModel inside DDP/DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------
# what a method needs during training


ADALORA_STATE = "adalora_allocator.safetensors"
"""Written into each checkpoint of an AdaLoRA training: the rank allocator's importance scores and
its latest rank pattern, which PEFT keeps in memory only, so a resumed run allocates as an
uninterrupted one does."""


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA's budget step, and its state in checkpoints.

    `update_and_allocate(step)` runs after every optimizer step and before the gradients are zeroed,
    which is when the Trainer sends `on_optimizer_step` (the allocator scores each weight by
    |weight x gradient|). The Trainer passes the model it was given (the PeftModel, not the DDP
    wrapper) as `model=`; `state.global_step` there is the 0-based index of the step being
    finished, as PEFT counts. Under DDP the gradients are averaged before the step, so every rank
    scores, and masks, the same.

    Checkpoints: PEFT saves an AdaLoRA adapter cut to its rank pattern, which the Trainer cannot load
    back into the full-rank layers it resumes, and keeps the allocator's scores in memory only. So
    while the Trainer writes a checkpoint the rank pattern is set aside (the checkpoint holds every
    layer at init_r, its pruned ranks zeroed as in training), and the scores and the pattern go into
    ADALORA_STATE beside it; a resumed run reads them back.

    Only an adapter this training created reallocates: one continued from another training
    (`start_from`) was loaded at its final ranks, and keeps them."""

    def __init__(self) -> None:
        self._set_aside: tuple[dict | None] | None = None
        self.active = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise TrainingError("AdaLoRA: the Trainer did not pass the model to its callbacks")
        if type(getattr(unwrapped(model), "base_model", None)).__name__ != "AdaLoraModel":
            self.active = False
        elif state.global_step > 0:  # resumed: the Trainer has loaded checkpoint-<step>
            stored = Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADALORA_STATE
            self.active = stored.is_file()  # written into every checkpoint of a run that allocates
            if self.active:
                _load_allocator(model, stored)
        else:
            self.active = _adalora_config(model).rank_pattern is None
            if not self.active:
                log.info("continuing a trained AdaLoRA adapter: its ranks stay as they were allocated")
        return control

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.active:
            self._restore(model)
            unwrapped(model).base_model.update_and_allocate(state.global_step)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # loraflow saves no checkpoint at the last step (loraflow.engine.StepFlow): the adapter then
        # saves at its final ranks
        if self.active and control.should_save and state.global_step < state.max_steps:
            config = _adalora_config(model)
            self._set_aside = (config.rank_pattern,)
            config.rank_pattern = None
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.active:
            return control
        pattern = self._restore(model)
        if state.is_world_process_zero:
            _save_allocator(
                model, pattern, Path(args.output_dir) / f"checkpoint-{state.global_step}" / ADALORA_STATE
            )
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.active:
            self._restore(model)
        return control

    def _restore(self, model) -> dict | None:
        """Put the rank pattern set aside for a checkpoint back; return the current one."""
        config = _adalora_config(model)
        if self._set_aside is not None:
            config.rank_pattern = self._set_aside[0]
            self._set_aside = None
        return config.rank_pattern


def _adalora_config(model):
    adalora = unwrapped(model).base_model
    return adalora.peft_config[adalora.trainable_adapter_name]


def _save_allocator(model, rank_pattern: dict | None, path: Path) -> None:
    from safetensors.torch import save_file

    allocator = unwrapped(model).base_model.rankallocator
    tensors = {}
    for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        for name, value in getattr(allocator, kind).items():
            tensors[f"{kind}/{name}"] = value.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"rank_pattern": json.dumps(rank_pattern)})


def _load_allocator(model, path: Path) -> None:
    from safetensors import safe_open

    adalora = unwrapped(model).base_model
    allocator = adalora.rankallocator
    device = next(p.device for p in adalora.parameters())
    allocator.reset_ipt()
    with safe_open(str(path), framework="pt") as stored:
        pattern = json.loads(stored.metadata()["rank_pattern"])
        for key in stored.keys():  # noqa: SIM118 (a safetensors file is not iterable)
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = stored.get_tensor(key).to(device)
    _adalora_config(model).rank_pattern = pattern


def adapter_callbacks(training: TrainingSpec) -> list[TrainerCallback]:
    """Trainer callbacks the adapter method needs during training: AdaLoRA's budget step."""
    return [AdaLoraBudget()] if training.adapter == "adalora" else []


def orthogonality_penalty(model, weight: float) -> torch.Tensor | None:
    """AdaLoRA's regularizer, PEFT's formula: `weight` x the mean over every P (lora_A) and Q
    (lora_B) of ||P·Pᵀ - I||_F (Qᵀ·Q for Q), which keeps them orthogonal as the SVD form needs.
    None when the model has no AdaLoRA matrices (or the weight is 0)."""
    from peft.utils.integrations import gather_params_ctx

    core = unwrapped(model)
    adalora = core.base_model
    name = getattr(adalora, "trainable_adapter_name", None)
    if not weight or name is None:
        return None
    terms = []
    for param_name, param in adalora.model.named_parameters():
        if ("lora_A" in param_name or "lora_B" in param_name) and name in param_name:
            with gather_params_ctx(param, fwd_module=adalora):  # DeepSpeed ZeRO-3 partitions
                cov = param @ param.T if "lora_A" in param_name else param.T @ param
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms:
        return None
    return weight * torch.stack(terms).mean()


def adapter_regularization(training: TrainingSpec) -> Callable[[torch.nn.Module], torch.Tensor | None] | None:
    """The adapter method's own loss term, as a function of the model, or None: for AdaLoRA the
    orthogonality penalty times `training.adalora.orth_reg_weight` (added to each micro-batch's loss,
    divided by the accumulation steps, by loraflow.engine)."""
    if training.adapter != "adalora" or not training.adalora.orth_reg_weight:
        return None
    weight = training.adalora.orth_reg_weight
    return lambda model: orthogonality_penalty(model, weight)


# ---------------------------------------------------------------------------------------------
# reading a trained adapter


def adapter_method(adapter_dir: Path) -> str:
    """The `training.adapter` that trained the adapter in a folder (from adapter_config.json's
    peft_type): lora, adalora, ia3 or prefix. Raises ValueError for another PEFT method."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        peft_type = json.loads(path.read_text(encoding="utf-8")).get("peft_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the adapter's config: {err}") from None
    method = PEFT_TYPES.get(str(peft_type))
    if method is None:
        raise ValueError(
            f"{path}: peft_type {peft_type!r} is not one loraflow trains ({', '.join(PEFT_TYPES)})"
        )
    return method


def _layer_name(key: str) -> str:
    """A parameter key of an adapter (`base_model.model.model.layers.0.self_attn.q_proj.lora_E`, with
    or without the adapter's name) as the adapted layer's name (`model.layers.0.self_attn.q_proj`)."""
    key = key.removeprefix("base_model.model.")
    head, _, _ = key.partition(".lora_E")
    return head


def adalora_ranks(model) -> dict[str, int]:
    """The current rank of every AdaLoRA layer of a model in training: what the allocator's last
    mask kept (rank_pattern), or init_r everywhere before it first masked."""
    core = unwrapped(model)
    adalora = core.base_model
    name = adalora.trainable_adapter_name
    pattern = adalora.peft_config[name].rank_pattern
    if pattern:
        return {_layer_name(key): int(sum(kept)) for key, kept in sorted(pattern.items())}
    return {
        module_name.removeprefix("base_model.model."): int(module.lora_E[name].shape[0])
        for module_name, module in core.named_modules()
        if hasattr(module, "lora_E") and name in getattr(module, "lora_E", {})
    }


def saved_adalora_ranks(adapter_dir: Path) -> dict[str, int]:
    """The rank of every layer of a saved AdaLoRA adapter: PEFT saves each layer at its final rank
    (the rows and columns its rank_pattern kept), so the shapes of the lora_E vectors are the ranks."""
    from safetensors import safe_open

    ranks = {}
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (a safetensors file is not iterable)
            if ".lora_E" in key:
                ranks[_layer_name(key)] = int(weights.get_slice(key).get_shape()[0])
    return dict(sorted(ranks.items()))


def adapter_record(training: TrainingSpec, adapter_dir: Path | None = None) -> dict:
    """The training record's `adapter` entry: the method and its settings as PEFT ran them, and for
    AdaLoRA the final rank per layer (read from the saved adapter in `adapter_dir`) and the budget."""
    config_path = Path(adapter_dir) / ADAPTER_CONFIG if adapter_dir is not None else None
    saved = (
        json.loads(config_path.read_text(encoding="utf-8"))
        if config_path is not None and config_path.is_file()
        else {}
    )
    method = PEFT_TYPES.get(saved.get("peft_type"), training.adapter)
    record: dict = {"method": method}
    if method == "adalora" and saved:
        ranks = saved_adalora_ranks(adapter_dir)
        record.update(
            {
                "init_r": saved["init_r"],
                "target_r": saved["target_r"],
                "tinit": saved["tinit"],
                "tfinal": saved["tfinal"],
                "total_step": saved["total_step"],
                "ranks": ranks,
                "budget": sum(ranks.values()),
                "initial_budget": saved["init_r"] * len(ranks),
                "target_budget": saved["target_r"] * len(ranks),
            }
        )
    elif method == "ia3":
        record.update(
            target_modules=sorted(saved.get("target_modules") or training.ia3.target_modules),
            feedforward_modules=sorted(saved.get("feedforward_modules") or training.ia3.feedforward_modules),
        )
    elif method == "prefix":
        record["num_virtual_tokens"] = saved.get("num_virtual_tokens", training.prefix.num_virtual_tokens)
    record["mergeable"] = mergeable(method)
    return record
