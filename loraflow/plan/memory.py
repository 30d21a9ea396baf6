"""Peak memory of a training step, from the model's shape and the training settings.

The estimate is a list of items, each in one of six categories (weights, LoRA parameters,
gradients, optimizer states, activations, overhead) and alive in one of two moments of a step:

    backward start   weights, adapters, optimizer states, every saved activation, the loss's
                     three vocabulary-wide fp32 buffers (and the adapters' gradients, which are
                     allocated from here on)
    optimizer step   weights, adapters, gradients, optimizer states and the step's own buffer;
                     the activations are freed by then

The peak is the larger of the two, plus the overhead that is there all the time. For LoRA and
QLoRA the backward start wins; for full fine-tuning with AdamW the optimizer step usually does.

Bytes per parameter (N: all parameters, Nq: the decoder layers' linear weights, which 8- and 4-bit
loads quantize, No = N - Nq: embeddings, norms, head; Na: adapter parameters):

    full, fp32 master weights   4·N weights + 4·N gradients + 8·N AdamW moments + 4·N AdamW step
                                buffer (PyTorch's foreach AdamW builds sqrt(v) for all parameters
                                at once) = 20 bytes per parameter at the step; with a 16-bit
                                `dtype` autocast also keeps a 2·N copy of the weights from the
                                forward until the backward has used it
    lora, base in `dtype`       N · 2 (bfloat16/float16) or 4 (float32)
    lora, 8-bit base            Nq · (1 + 4/in) (int8 plus an fp32 scale per output row) + No · d
    qlora (NF4, blocksize 64)   Nq · 4.127/8 with double quantization (4 bits + an 8-bit absmax per
                                64 weights + an fp32 absmax per 256 blocks: 4 + 8/64 + 32/16384),
                                Nq · 4.5/8 without (4 + 32/64) + No · d
    adapters                    Na · (a weights + a gradients + 2a AdamW) bytes

d is the dtype's size: the training engine loads the parts an 8- or 4-bit base does not quantize
(embeddings, norms, head) in the training dtype and does not upcast them, so the residual stream
and the activations are in that dtype too. a, the adapters' size, is 4 (PEFT keeps adapters in
fp32 on a 16-bit base) except for QLoRA in a 16-bit dtype, whose adapters TRL's SFTTrainer keeps
in bf16 (the QLoRA paper's choice), moments and gradients with them.

8-bit optimizers (bitsandbytes) keep both moments in 8 bits with an fp32 absmax per 256 values:
2 + 8/256 bytes per parameter; tensors under 4,096 values keep fp32 moments. `paged_adamw_8bit`
has the same size; its pages can move to CPU memory under pressure, but the planner counts them
on the device.

Activations: see `layer_activation_terms` for the derivation, one decoder layer at a time.

Adapter methods (`Setup.adapter`; Na counted by `adapter_tensor_sizes`, checked against PEFT's own
models in tests/test_adapters.py):

    lora      r·(in + out) per adapted layer (+ out with DoRA)
    adalora   init_r·(in + out) + init_r (the singular values E) per adapted layer: the budget
              shrinks to target_r during training, but PEFT masks pruned ranks to zero and keeps
              every layer allocated at init_r; the rank allocator adds three fp32 tensors per
              adapter weight (|w·grad|, its moving average and the uncertainty's), 3·a·Na bytes.
              Activations as LoRA at r = init_r.
    ia3       one vector per target layer: its output width, or its input width for a feed-forward
              one (`ia3_feedforward`). It keeps the layer's output (its input for a feed-forward
              one) for the vector's gradient; no dropout, no matrix products of its own.
    prefix    num_virtual_tokens x layers x 2 x kv width (key-value heads x head_dim), or with the
              reparametrization MLP (trained, dropped after training) P·kv + kv·H + H + H·(2·layers·kv)
              + 2·layers·kv. Every layer's keys and values are P longer, so attention keeps P more
              keys and values per sequence (repeated to every head when sdpa needs them repeated) and
              a mask P wider.

Objectives (`Setup.objective`): `dpo` and `orpo` train on pairs, and TRL puts a batch's chosen and
rejected sequences in one forward, so every example is two sequences (the activations of 2 x
batch_size sequences) and TRL runs the output head on every position. DPO's reference is the model
with the adapter disabled (PEFT: no second model in memory); its forward runs without gradients
before the policy's and keeps one log-probability per sequence, so it adds no bytes at the peak
(its logits are freed before the policy's forward), only a forward's FLOPs. A DPO that starts from
another adapter (`start_from`) keeps a frozen copy of that adapter as the reference (Na·a bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Literal

from loraflow.plan.shapes import LINEAR_MODULES, ModelShape, PlanError

Method = Literal["full", "lora", "qlora"]
Adapter = Literal["lora", "adalora", "ia3", "prefix"]
Objective = Literal["sft", "dpo", "orpo"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
Category = Literal["weights", "lora", "gradients", "optimizer", "activations", "overhead"]
Phase = Literal["always", "backward", "step", "backward+step"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES = 4  # PEFT casts adapter weights to fp32 (autocast_adapter_dtype) on 16-bit bases


def adapter_bytes(setup: Setup) -> int:
    """Bytes per adapter weight (and its gradient, and each AdamW moment): fp32, except QLoRA in a
    16-bit dtype, whose adapters TRL's SFTTrainer casts to bf16."""
    if setup.method == "qlora" and setup.dtype != "float32":
        return 2
    return ADAPTER_BYTES


NF4_BLOCK = 64
NF4_SECOND_BLOCK = 256
OPTIM8_BLOCK = 256
OPTIM8_MIN_SIZE = 4096
GIB = 2**30
MIB = 2**20
GB = 10**9

CPU_RUNTIME_BYTES = 600 * MIB
"""Resident memory of a CPU training process before its model: Python with torch, transformers,
peft, bitsandbytes and loraflow imported, the tokenizer and the dataset loaded, thread pools
started. Measured on this project's machine (Linux x86_64, torch 2.13 CPU): 520 MiB right after
the imports and the tokenizer, about 600 MiB once a tiny model (12 MB) is training."""

CPU_FRAGMENTATION = 0.5
"""On a CPU, glibc serves tensors under 32 MiB from its heap once its mmap threshold has risen
(it rises to the largest block freed, up to 32 MiB), and the heap grows past the live peak because
freed blocks do not fit the next requests. Measured on SmolLM2-135M over 3 steps
(bench/plan_cpu.py): resident memory above the live peak by 52% (LoRA) and 63% (QLoRA) of the
activations, still growing; with gradient checkpointing by 32% of what the layers would keep
without it, as the recomputation allocates and frees each layer's stash again. The planner adds
half of the activations held in such tensors, counted as without checkpointing. With
MALLOC_MMAP_THRESHOLD_ set in the environment (e.g. 65536) the threshold stays put, every
activation is mapped and unmapped, and resident memory follows the live bytes: the planner then
adds nothing."""

GLIBC_MMAP_THRESHOLD_MAX = 32 * MIB

FUSED_HEAD_TOKENS = 4096
FUSED_HEAD_VOCAB = 32768
"""The tile TRL's fused LM head projects at a time on a GPU (tokens x vocabulary entries)."""

GPU_CONTEXT_BYTES = 512 * MIB
"""The CUDA context, cuBLAS workspaces and kernels of a PyTorch process: about 0.5 GiB on recent
GPUs. Outside what torch.cuda.max_memory_allocated() counts."""

GPU_FRAGMENTATION = 0.05
"""PyTorch's caching allocator reserves a little more than it hands out (blocks rounded up,
segments split); the planner adds 5% of the allocated peak."""


@dataclass(frozen=True)
class Setup:
    """What is trained and how: the settings memory and compute depend on."""

    method: Method = "qlora"
    """`full` (every weight trains), `lora` (adapters on a frozen base) or `qlora` (on a 4-bit base)."""

    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Compute dtype: the base weights' dtype for `lora`; the autocast dtype over fp32 master
    weights for `full`; the dequantization dtype for `qlora`."""

    base_bits: Literal[4, 8, 16, 32] | None = None
    """Bits per frozen base weight: None follows the method (4 for qlora, `dtype` for lora); 8 plans
    LoRA on an int8 base (bitsandbytes LLM.int8), which loraflow itself does not load."""

    double_quant: bool = True
    """4-bit only: quantize the absmax constants too (4.127 instead of 4.5 bits per weight)."""

    lora_r: int = 16
    """Adapter rank."""

    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Adapted linear layers, or ("all-linear",) for all seven of each decoder layer."""

    lora_dropout: float = 0.05
    """Dropout on the adapter input: above 0 each adapted layer keeps its own dropped copy of its
    input and the dropout mask."""

    use_dora: bool = False
    """DoRA adds a magnitude vector per adapted layer (counted); its per-step weight-norm
    computation (a dequantized copy of one weight at a time) is not."""

    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full beside the adapters (`lm_head`, `embed_tokens`): PEFT trains a copy
    of each, counted at vocab x hidden fp32 weights, gradients and AdamW moments."""

    adapter: Adapter = "lora"
    """The PEFT method (module docstring): `lora`; `adalora` (counted at init_r, in `lora_r`, on
    `target_modules`); `ia3` (a vector on each of `target_modules`); `prefix` (`prefix_tokens`
    key/value vectors per layer; `target_modules` empty)."""

    ia3_feedforward: tuple[str, ...] = ("down_proj",)
    """IA3: which of target_modules scale their input (feed-forward layers) rather than their output."""

    prefix_tokens: int = 20
    """Prefix tuning: virtual tokens (key/value pairs) before every sequence, in every layer."""

    prefix_projection: int | None = None
    """Prefix tuning: the hidden width of the MLP the prefix is learned through, or None without one."""

    objective: Objective = "sft"
    """`sft`, or `dpo` / `orpo` on pairs: each example is two sequences in one forward (module
    docstring), and DPO adds a reference forward without gradients."""

    reference_adapter: bool = False
    """DPO from another adapter: TRL keeps a frozen copy of it as the reference."""

    optimizer: Optimizer = "adamw"
    """`adamw` (fp32 moments), `adamw_8bit` or `paged_adamw_8bit` (bitsandbytes 8-bit moments)."""

    batch_size: int = 1
    """Examples (or packed rows) per forward pass; a preference pair is two sequences."""

    seq_len: int = 512
    """Tokens per sequence: the longest example of a padded batch, or the packed row length."""

    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input and recompute the layer in the backward pass."""

    packing: bool = False
    """Examples packed into rows: rows are `seq_len` long and carry a block-diagonal mask."""

    padded: bool = True
    """Batches mix lengths, so they carry a padding mask (sdpa then needs key-value heads repeated
    and keeps a mask per layer). False for data of one length, as in bench/gpu_train.py."""

    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel: sdpa and flash-attention keep O(tokens) per layer, eager the full
    probability matrix."""

    trained_fraction: float = 1.0
    """Share of tokens whose next token is trained. loraflow runs the output head only on those
    (a chat dataset's answers); other trainers run it on every token (1.0)."""

    device: Literal["cuda", "cpu"] = "cuda"
    """Where training runs: decides the overhead and a few kernel details (dropout masks are bytes
    on a GPU and full-width on a CPU)."""

    @property
    def bits(self) -> int:
        """Bits per frozen base weight (full: the fp32 master weights)."""
        if self.method == "full":
            return 32
        if self.method == "qlora":
            return 4
        return self.base_bits or 8 * DTYPE_BYTES[self.dtype]

    @property
    def sequences(self) -> int:
        """Sequences per forward pass: batch_size, twice that for preference pairs."""
        return self.batch_size * (1 if self.objective == "sft" else 2)

    @property
    def tokens(self) -> int:
        """Tokens per forward pass: sequences x seq_len."""
        return self.sequences * self.seq_len

    @property
    def prefix(self) -> int:
        """Virtual tokens before every sequence (prefix tuning), else 0."""
        return self.prefix_tokens if self.adapter == "prefix" and self.method != "full" else 0

    @property
    def masked(self) -> bool:
        """Whether attention gets an explicit mask (padding or packing, except with flash-attention,
        which takes lengths instead). A prefix always does: queries then see more keys than there are
        queries, which sdpa's causal flag cannot express."""
        return (self.packing or self.padded or bool(self.prefix)) and self.attention != "flash_attention_2"

    def targets(self, shape: ModelShape) -> tuple[str, ...]:
        """The adapted linear layers; a name the planner does not know is an error naming them."""
        if self.method == "full":
            return ()
        if self.target_modules in (("all-linear",), "all-linear"):
            return LINEAR_MODULES
        unknown = [m for m in self.target_modules if m not in LINEAR_MODULES]
        if unknown:
            raise PlanError(
                f"target_modules {', '.join(unknown)}: the planner knows a Llama-style layer's "
                f"{', '.join(LINEAR_MODULES)} (or all-linear)"
            )
        return tuple(m for m in LINEAR_MODULES if m in self.target_modules)

    def describe(self) -> str:
        nf4 = f"NF4{' double-quantized' if self.double_quant else ''}"
        if self.method == "full":
            method = (
                f"full fine-tuning ({self.dtype} autocast over fp32 weights)"
                if self.dtype != "float32"
                else "full fine-tuning (fp32)"
            )
        elif self.adapter == "lora":
            method = (
                f"LoRA r={self.lora_r} on a {self.bits}-bit base"
                if self.method == "lora"
                else f"QLoRA r={self.lora_r} ({nf4})"
            )
        else:
            name = {
                "adalora": f"AdaLoRA init_r={self.lora_r}",
                "ia3": "IA3",
                "prefix": f"prefix tuning ({self.prefix_tokens} virtual tokens"
                + (f", MLP {self.prefix_projection}" if self.prefix_projection else "")
                + ")",
            }[self.adapter]
            method = (
                f"{name} on a {self.bits}-bit base" if self.method == "lora" else f"{name} on an {nf4} base"
            )
        targets = (
            "" if self.method == "full" or not self.target_modules else f" on {'/'.join(self.target_modules)}"
        )
        pairs = f"{self.objective.upper()} on pairs (2 sequences each), " if self.objective != "sft" else ""
        return (
            f"{pairs}{method}{targets}, {self.optimizer}, batch {self.batch_size}{' pairs' if pairs else ''} x "
            f"{self.seq_len} tokens"
            f"{', packed' if self.packing else ''}"
            f", gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, {self.device}"
        )


@dataclass(frozen=True)
class Item:
    """One term of the estimate."""

    category: Category
    label: str
    bytes: int
    phase: Phase
    formula: str
    """How the bytes were counted, with the numbers."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, itemized. `allocated` is what the framework's allocator
    hands out (comparable to torch.cuda.max_memory_allocated); `peak` adds the overhead."""

    shape: ModelShape
    setup: Setup
    items: list[Item] = field(default_factory=list)

    def _phase_total(self, phase: str) -> int:
        return sum(i.bytes for i in self.items if i.category != "overhead" and phase in i.phase.split("+"))

    @property
    def always(self) -> int:
        return sum(i.bytes for i in self.items if i.phase == "always" and i.category != "overhead")

    @property
    def backward(self) -> int:
        """Allocated at the start of the backward pass."""
        return self.always + self._phase_total("backward")

    @property
    def step(self) -> int:
        """Allocated during the optimizer step."""
        return self.always + self._phase_total("step")

    @property
    def peak_phase(self) -> str:
        return "backward start" if self.backward >= self.step else "optimizer step"

    @property
    def allocated(self) -> int:
        """The larger of the two moments: the most the allocator hands out at once."""
        return max(self.backward, self.step)

    @property
    def overhead(self) -> int:
        return sum(i.bytes for i in self.items if i.category == "overhead")

    @property
    def peak(self) -> int:
        """Allocated peak plus overhead: what the device must have free."""
        return self.allocated + self.overhead

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB

    @property
    def allocated_mib(self) -> float:
        return self.allocated / MIB

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def total(self, category: Category) -> int:
        """Bytes of one category (each item at its own largest)."""
        return sum(i.bytes for i in self.items if i.category == category)

    def breakdown(self) -> dict[str, int]:
        """Bytes per category, in the issue's order."""
        categories: tuple[Category, ...] = (
            "weights",
            "lora",
            "gradients",
            "optimizer",
            "activations",
            "overhead",
        )
        return {c: self.total(c) for c in categories}

    def table(self, unit: str = "GiB") -> str:
        """A Markdown table of every item with its formula, and the peak."""
        scale = {"GiB": GIB, "GB": GB, "MiB": MIB}[unit]
        lines = [f"| item | {unit} | when | how |", "|---|---|---|---|"]
        for item in self.items:
            lines.append(
                f"| {item.category}: {item.label} | {item.bytes / scale:,.2f} | {item.phase} | {item.formula} |"
            )
        lines.append(
            f"| **peak** ({self.peak_phase} + overhead) | **{self.peak / scale:,.2f}** | | "
            f"backward start {self.backward / scale:,.2f}, optimizer step {self.step / scale:,.2f}, "
            f"overhead {self.overhead / scale:,.2f} |"
        )
        return "\n".join(lines)

    def metadata(self) -> dict[str, float | str]:
        """Flat figures with stable keys, for Dagster metadata."""
        figures: dict[str, float | str] = {
            f"plan_{name}_gib": round(value / GIB, 3) for name, value in self.breakdown().items()
        }
        figures["plan_peak_gib"] = round(self.peak / GIB, 3)
        figures["plan_allocated_gib"] = round(self.allocated / GIB, 3)
        figures["plan_peak_phase"] = self.peak_phase
        figures["plan_setup"] = self.setup.describe()
        return figures

    def with_setup(self, **changes) -> MemoryEstimate:
        """The estimate for the same model with some settings changed."""
        return estimate_memory(self.shape, replace(self.setup, **changes))


# ---------------------------------------------------------------------------------------------
# activations


def layer_activation_terms(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Bytes one decoder layer keeps for the backward pass, per token, by what keeps them.

    Derived from what autograd saves in a Llama layer (transformers 5, PEFT LoRA, sdpa), with
    h = hidden, q = heads x head_dim, kv = key-value heads x head_dim, I = MLP width, r = rank:

    - RMSNorm (twice): its input upcast to fp32 (4h each; for a fp32 stream it is the stream
      itself) and 1/rms (4 bytes). With a trainable norm weight (full) also its normalized output.
      The stream is in the training dtype, for 8- and 4-bit bases too (nothing is upcast).
    - A frozen linear layer keeps nothing of its input (its input gradient needs only the weight);
      a trainable one keeps its input. An adapted one keeps, for its A matrix, its input as the
      adapter sees it: a dropped-out copy plus the dropout mask when dropout > 0, else an fp32 copy
      when the input is 16-bit and the adapters fp32, else the input itself (shared by q, k, v and
      by gate, up). Its A output (r values) is kept for B.
    - Attention: q and k after the rotary embedding, v, the output and the log-sum-exp (fp32 per
      head). With a mask, sdpa needs k and v repeated to all q heads (grouped-query models), and
      keeps the mask (n per token). Eager attention keeps the probabilities (fp32 softmax output
      and its cast, heads x n per token).
    - MLP: the gate projection's output (for SiLU's backward), SiLU's output and the up output
      (for the product's), 3·I.

    tests/test_plan.py checks these terms against the tensors autograd saves
    (torch.autograd.graph.saved_tensors_hooks) in a real layer: LoRA on q/v, q/k/v/o and all-linear,
    with and without dropout, fp32 and bf16, with a padding mask. QLoRA's layer (frozen 4-bit
    projections that keep nothing) saves the same bytes as LoRA in its dtype, checked the same way in fp32.
    The dropout mask is taken as 1 byte on a GPU (a bool mask); on a CPU it is a full-width tensor.
    """
    h, q, kv, i_dim = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    full = setup.method == "full"
    compute = DTYPE_BYTES[setup.dtype]
    # s: the residual stream and norm outputs; t: linear outputs (q, k, v, attention, MLP)
    s, t = (4, compute) if full else (compute, compute)
    adapter = adapter_bytes(setup)
    mask_byte = 1 if setup.device == "cuda" else adapter  # CUDA dropout masks are bool
    targets = set(setup.targets(shape))
    terms: dict[str, float] = {"norm inputs (fp32) and 1/rms": 2 * 4 * h + 8}
    if full:
        terms["norm outputs (for the norm weights' gradients)"] = 2 * s * h

    # (input width, input bytes, the linear layers reading it, whether something else keeps it)
    groups = {
        "attention input": (h, s, ("q_proj", "k_proj", "v_proj"), False),
        "attention output": (q, t, ("o_proj",), True),
        "MLP input": (h, s, ("gate_proj", "up_proj"), False),
        "MLP product": (i_dim, t, ("down_proj",), False),
    }
    linears = shape.linears()
    for name, (width, in_bytes, readers, kept_elsewhere) in groups.items():
        if full:
            if in_bytes != compute:  # autocast casts the input once per linear layer
                terms[f"{name}, cast for each of {', '.join(readers)}"] = len(readers) * compute * width
            elif not kept_elsewhere:
                terms[f"{name}, for the weights' gradients"] = in_bytes * width
            continue
        adapted = [m for m in readers if m in targets]
        if not adapted:
            continue
        if setup.adapter == "ia3":
            # the vector's gradient needs what it multiplies: the input of a feed-forward layer (cast
            # to the vector's dtype), the output of the others
            for m in adapted:
                if m in setup.ia3_feedforward:
                    terms[f"{name}: IA3 input of {m}"] = adapter * width
                else:
                    terms[f"IA3: output of {m}"] = t * linears[m][1]
            continue
        if setup.lora_dropout > 0:
            terms[f"{name}: dropped-out copy and mask for {', '.join(adapted)}"] = (
                len(adapted) * (adapter + mask_byte) * width
            )
        elif in_bytes != adapter:
            terms[f"{name}: fp32 copy for {', '.join(adapted)}"] = len(adapted) * adapter * width
        elif not kept_elsewhere:
            terms[f"{name}, for the adapters of {', '.join(adapted)}"] = in_bytes * width
    if targets and setup.adapter in ("lora", "adalora"):
        terms["adapter A outputs (r each)"] = len(targets) * adapter * setup.lora_r

    repeat = (setup.masked and shape.num_kv_heads != shape.num_heads) or setup.attention == "eager"
    k_and_v = 2 * t * (q if repeat else kv)
    terms["attention: q, k, v" + (" (k, v repeated to every head)" if repeat else "")] = t * q + k_and_v
    if setup.prefix:  # P more keys and values per sequence, shared by its seq_len tokens
        terms[f"prefix: {setup.prefix} keys and values per sequence"] = k_and_v * setup.prefix / setup.seq_len
    terms["attention: output and log-sum-exp"] = t * q + 4 * shape.num_heads
    keys = setup.seq_len + setup.prefix
    if setup.attention == "eager":
        terms["attention probabilities (eager)"] = (4 + t) * shape.num_heads * keys
    if setup.masked:
        terms["attention mask, per layer"] = s * keys
    terms["MLP: gate output, SiLU output, up output"] = 3 * t * i_dim
    return terms


def cpu_fragmentation(environ: dict | None = None) -> float:
    """The share of heap-held activations glibc adds on a CPU: CPU_FRAGMENTATION, or 0 when
    MALLOC_MMAP_THRESHOLD_ is set (the environment this process was started with)."""
    environ = os.environ if environ is None else environ
    return 0.0 if environ.get("MALLOC_MMAP_THRESHOLD_") else CPU_FRAGMENTATION


def _activation_items(shape: ModelShape, setup: Setup) -> tuple[list[Item], int]:
    """The activation items of one step: the layers' stash (or, with checkpointing, the layer
    inputs plus one recomputed layer), the loss over the vocabulary, and the backward's working set.

    - Loss: on a CPU, loraflow runs the head on the trained tokens and the cross-entropy on their
      fp32 logits; at the start of the backward pass three such buffers exist at once (log-softmax's
      saved output, the gradient coming in, the gradient going out): 12·V bytes per trained token.
      For a small model with a large vocabulary this is the largest activation. On a GPU, TRL's
      fused head projects the trained tokens in tiles of 4,096 tokens x 32,768 vocabulary entries
      (in the compute dtype) and keeps an fp32 gradient of the head's input: one tile plus 4·h
      bytes per trained token.
    - Backward working set: while one layer is differentiated, the gradients of its MLP
      intermediates (3·I per token); the larger of this and the loss buffers counts, as they are
      not alive together. QLoRA adds one dequantized weight (the largest linear layer) at a time.
    - Checkpointing (transformers, one checkpoint per decoder layer): each layer's input is kept
      (stream dtype x h per token), and the layer being differentiated is recomputed whole, so one
      layer's stash is alive on top.

    Also returns how many of those bytes are held in tensors under 32 MiB, which a CPU's heap serves.
    """
    terms = layer_activation_terms(shape, setup)
    per_layer = sum(terms.values())
    tokens, n_layers = setup.tokens, shape.num_layers
    full = setup.method == "full"
    quantized = setup.bits <= 8 and not full
    compute = DTYPE_BYTES[setup.dtype]
    stream = 4 if full else compute
    t = compute if full else stream
    h, vocab = shape.hidden_size, shape.vocab_size
    logit_tokens = max(1, round(tokens * setup.trained_fraction))
    fused = setup.device == "cuda" and not full and setup.objective == "sft"  # TRL's DPO/ORPO: the whole head
    if fused:  # TRL's tiled head (see above)
        loss_bytes = (
            compute * min(logit_tokens, FUSED_HEAD_TOKENS) * min(vocab, FUSED_HEAD_VOCAB)
            + 4 * h * logit_tokens
        )
    else:
        loss_bytes = 12 * vocab * logit_tokens
    loss_how = (
        f"a {min(logit_tokens, FUSED_HEAD_TOKENS):,} x {min(vocab, FUSED_HEAD_VOCAB):,} tile of the fused head "
        f"+ 4·{h} x {logit_tokens:,} trained tokens"
        if fused
        else f"12 bytes x vocab {vocab:,} x {logit_tokens:,} trained tokens"
    )
    working = 3 * t * shape.intermediate_size * tokens
    if quantized:
        working += compute * max(i * o for i, o in shape.linears().values())
    final = 4 * h * tokens + (stream * h * logit_tokens if full else 0)  # final norm; head input (full)
    items = []
    layer_tensors_small = tokens * shape.intermediate_size * t < GLIBC_MMAP_THRESHOLD_MAX
    loss_tensors_small = 4 * vocab * logit_tokens < GLIBC_MMAP_THRESHOLD_MAX
    if setup.gradient_checkpointing:
        kept = n_layers * stream * h * tokens
        mask = stream * (setup.seq_len + setup.prefix) * tokens if setup.masked else 0
        items.append(
            Item(
                "activations",
                "checkpointed layer inputs",
                kept + mask + final,
                "backward",
                f"{n_layers} layers x {stream}·{h} bytes x {tokens:,} tokens"
                + (" + one attention mask" if mask else "")
                + " + the final norm's input",
            )
        )
        layer = per_layer * tokens + working
        heap = (kept + mask + final if layer_tensors_small else 0) + (
            (layer if layer_tensors_small else 0)
            if layer >= loss_bytes
            else (loss_bytes if loss_tensors_small else 0)
        )
        items.append(
            Item(
                "activations",
                "one recomputed layer + backward working set, or the loss",
                round(max(layer, loss_bytes)),
                "backward",
                f"max(one layer's stash {per_layer:,.0f} B/token x {tokens:,} + working set "
                f"{working / MIB:,.1f} MiB, loss: {loss_how})",
            )
        )
        return items, round(heap)
    stash = round(n_layers * per_layer * tokens) + final
    heap = (stash if layer_tensors_small else 0) + (
        (working if layer_tensors_small else 0)
        if working >= loss_bytes
        else (loss_bytes if loss_tensors_small else 0)
    )
    items.append(
        Item(
            "activations",
            "saved by every layer",
            stash,
            "backward",
            f"{n_layers} layers x {per_layer:,.0f} B/token x {tokens:,} tokens + the final norm's input",
        )
    )
    items.append(
        Item(
            "activations",
            "loss over the vocabulary, or the backward working set",
            max(loss_bytes, working),
            "backward",
            f"max({loss_how}, "
            f"MLP gradients 3·{t}·{shape.intermediate_size} x {tokens:,} tokens"
            + (", + one dequantized weight" if quantized else "")
            + ")",
        )
    )
    return items, round(heap)


# ---------------------------------------------------------------------------------------------
# the whole estimate


def adapter_tensor_sizes(shape: ModelShape, setup: Setup) -> list[int]:
    """The sizes of every adapter tensor of the model (modules_to_save copies aside), as PEFT makes
    them for `setup.adapter` (module docstring)."""
    if setup.method == "full":
        return []
    linears = shape.linears()
    if setup.adapter == "prefix":
        d, layers = shape.kv_dim, shape.num_layers  # PEFT's token_dim is the key-value width
        width = 2 * layers * d
        hidden = setup.prefix_projection
        if hidden:  # embedding, then Linear(d, hidden), tanh, Linear(hidden, 2·layers·d)
            return [setup.prefix_tokens * d, d * hidden, hidden, hidden * width, width]
        return [setup.prefix_tokens * width]
    per_layer = []
    for m in setup.targets(shape):
        fan_in, fan_out = linears[m]
        if setup.adapter == "ia3":
            per_layer.append(fan_in if m in setup.ia3_feedforward else fan_out)
            continue
        per_layer += [setup.lora_r * fan_in, setup.lora_r * fan_out]
        if setup.adapter == "adalora":
            per_layer.append(setup.lora_r)  # the singular values E
        if setup.use_dora:
            per_layer.append(fan_out)
    return per_layer * shape.num_layers


def adapter_params(shape: ModelShape, setup: Setup) -> int:
    """Adapter parameters: for LoRA r·(in + out) per adapted linear layer per decoder layer (A is
    r x in, B is out x r), plus a magnitude vector (out) per adapted layer with DoRA; for the other
    methods see the module docstring."""
    return sum(adapter_tensor_sizes(shape, setup))


def adapter_matmul_params(shape: ModelShape, setup: Setup) -> int:
    """Adapter parameters that take part in matrix products on every token (LoRA's and AdaLoRA's
    A and B): the ones that cost 6 FLOPs per token. IA3's vectors scale elementwise and a prefix is
    looked up once per sequence, so theirs are 0."""
    return adapter_params(shape, setup) if setup.adapter in ("lora", "adalora") else 0


def saved_module_params(shape: ModelShape, setup: Setup) -> int:
    """Parameters of the full copies PEFT trains for `modules_to_save` (vocab x hidden each)."""
    if setup.method == "full":
        return 0
    return sum(
        shape.vocab_size * shape.hidden_size
        for m in setup.modules_to_save
        if m in ("lm_head", "embed_tokens")
    )


def trainable_tensor_sizes(shape: ModelShape, setup: Setup) -> list[int]:
    """The sizes of every trainable tensor (the 8-bit optimizer keeps tensors under 4,096 values in
    fp32, and the CPU's AdamW loop works one tensor at a time)."""
    linears = shape.linears()
    if setup.method == "full":
        biases = shape.other_params_per_layer - 2 * shape.hidden_size  # counted as one tensor
        per_layer = (
            [i * o for i, o in linears.values()] + [shape.hidden_size] * 2 + ([biases] if biases else [])
        )
        head = [shape.head_params] if shape.head_params else []
        return per_layer * shape.num_layers + [shape.embedding_params, shape.hidden_size] + head
    copies = [
        shape.vocab_size * shape.hidden_size
        for m in setup.modules_to_save
        if m in ("lm_head", "embed_tokens")
    ]
    return adapter_tensor_sizes(shape, setup) + copies


def _adapter_formula(shape: ModelShape, setup: Setup) -> str:
    """How the adapter parameters were counted, in words and numbers."""
    layers, targets = shape.num_layers, ", ".join(setup.targets(shape))
    if setup.adapter == "prefix":
        how = f"{setup.prefix_tokens} virtual tokens x {layers} layers x 2 (key, value) x kv width {shape.kv_dim}"
        if setup.prefix_projection:
            how += f", learned through an MLP of width {setup.prefix_projection} (its weights counted)"
        return how
    if setup.adapter == "ia3":
        ff = [m for m in setup.targets(shape) if m in setup.ia3_feedforward]
        out = [m for m in setup.targets(shape) if m not in setup.ia3_feedforward]
        parts = ([f"the output width of {', '.join(out)}"] if out else []) + (
            [f"the input width of {', '.join(ff)}"] if ff else []
        )
        return f"{layers} layers x ({' + '.join(parts)})"
    if setup.adapter == "adalora":
        return (
            f"{layers} layers x init_r={setup.lora_r} x (in + out + 1) of {targets} (ranks pruned toward target_r "
            "stay allocated, zeroed)"
        )
    return f"{layers} layers x r={setup.lora_r} x (in + out) of {targets}"


def _weight_items(shape: ModelShape, setup: Setup) -> list[Item]:
    n, nq, no = shape.params, shape.quantizable_params, shape.unquantized_params
    if setup.method == "full":
        items = [Item("weights", "fp32 master weights", 4 * n, "always", f"{n / 1e9:.3f}B params x 4 bytes")]
        if setup.dtype != "float32":
            items.append(
                Item(
                    "weights",
                    f"{setup.dtype} copies made by autocast",
                    2 * n,
                    "backward",
                    f"{n / 1e9:.3f}B params x 2 bytes, kept from the forward pass until the backward used them",
                )
            )
        return items
    bits = setup.bits
    if bits >= 16:
        return [
            Item(
                "weights",
                f"base in {bits} bits",
                n * bits // 8,
                "always",
                f"{n / 1e9:.3f}B params x {bits // 8} bytes",
            )
        ]
    if bits == 8:
        scales = shape.num_layers * sum(o for _, o in shape.linears().values())
        quantized = nq + 4 * scales
        how = f"{nq / 1e9:.3f}B linear weights x 1 byte + an fp32 scale per output row"
    else:
        per_weight = (
            4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_SECOND_BLOCK)
            if setup.double_quant
            else 4 + 32 / NF4_BLOCK
        )
        quantized = round(nq * per_weight / 8)
        how = f"{nq / 1e9:.3f}B linear weights x {per_weight:.3f} bits (NF4, blocks of {NF4_BLOCK})"
    return [
        Item("weights", f"{bits}-bit linear weights", quantized, "always", how),
        Item(
            "weights",
            f"embeddings, norms, head in {setup.dtype}",
            DTYPE_BYTES[setup.dtype] * no,
            "always",
            f"{no / 1e9:.3f}B params x {DTYPE_BYTES[setup.dtype]} bytes (not quantized, not upcast)",
        ),
    ]


def _optimizer_bytes(sizes: list[int], setup: Setup) -> tuple[int, str]:
    trainable = sum(sizes)
    if setup.optimizer == "adamw":
        a = adapter_bytes(setup) if setup.method != "full" else 4
        kind = "fp32" if a == 4 else "bf16"
        return 2 * a * trainable, f"{trainable:,} trainable x {2 * a} bytes (two {kind} moments)"
    small = sum(size for size in sizes if size < OPTIM8_MIN_SIZE)
    large = trainable - small
    states = round(large * (2 + 8 / OPTIM8_BLOCK)) + 8 * small
    return states, (
        f"{large:,} x (2 + 8/{OPTIM8_BLOCK}) bytes (8-bit moments, fp32 absmax per {OPTIM8_BLOCK})"
        + (f" + {small:,} in tensors under {OPTIM8_MIN_SIZE:,} values x 8 bytes" if small else "")
    )


def _mapped_checkpoint(shape: ModelShape, setup: Setup) -> list[Item]:
    """On a CPU, the loader maps the safetensors files and uses a tensor in place when its dtype is
    the one asked for (those pages are the weights, counted there); a converted or quantized load
    reads the rest into new memory while the file's pages stay mapped and resident (clean pages,
    which the kernel can drop under pressure, but resident memory counts them)."""
    if setup.method == "full" or not shape.checkpoint_bytes:
        return []
    load_dtype = setup.dtype
    if shape.checkpoint_dtype == load_dtype and setup.bits > 8:
        return []  # every weight is used in place
    in_place = (
        DTYPE_BYTES[load_dtype] * shape.unquantized_params
        if shape.checkpoint_dtype == load_dtype and setup.bits <= 8
        else 0
    )
    return [
        Item(
            "overhead",
            "checkpoint file pages",
            max(0, shape.checkpoint_bytes - in_place),
            "always",
            "the safetensors files stay mapped after the load converted or quantized them"
            + (f", less the {load_dtype} tensors used in place" if in_place else ""),
        )
    ]


def estimate_memory(shape: ModelShape, setup: Setup) -> MemoryEstimate:
    """The itemized peak memory of one training step of `shape` with `setup`."""
    if setup.batch_size < 1 or setup.seq_len < 1:
        raise PlanError(
            f"batch size and sequence length must be at least 1 (got {setup.batch_size}, {setup.seq_len})"
        )
    items = _weight_items(shape, setup)
    full = setup.method == "full"
    sizes = trainable_tensor_sizes(shape, setup)
    trainable = sum(sizes)
    if not full:
        copies = saved_module_params(shape, setup)
        if copies:
            items.append(
                Item(
                    "lora",
                    f"trained copies of {', '.join(setup.modules_to_save)}",
                    4 * copies,
                    "always",
                    f"{copies:,} params x 4 bytes",
                )
            )
        a = adapter_bytes(setup)
        adapters = trainable - copies
        items.append(
            Item(
                "lora",
                f"adapter weights ({'fp32' if a == 4 else 'bf16'})",
                a * adapters,
                "always",
                f"{adapters:,} params = {_adapter_formula(shape, setup)}, x {a} bytes",
            )
        )
        if setup.adapter == "adalora":
            items.append(
                Item(
                    "lora",
                    "AdaLoRA importance scores",
                    3 * a * adapters,
                    "always",
                    f"3 tensors per adapter weight (|w·grad|, its moving average, the uncertainty's) x "
                    f"{adapters:,} x {a} bytes",
                )
            )
        if setup.reference_adapter:
            items.append(
                Item(
                    "lora",
                    "the reference adapter (DPO from another adapter)",
                    a * adapters,
                    "always",
                    f"a frozen copy of the starting adapter: {adapters:,} x {a} bytes",
                )
            )
        if setup.objective == "dpo":
            items.append(
                Item(
                    "activations",
                    "the reference forward (DPO)",
                    0,
                    "always",
                    "the model with the adapter disabled, without gradients, before the policy's forward: its "
                    "logits are freed before the peak and one log-probability per sequence is kept",
                )
            )
    grad = 4 if full else adapter_bytes(setup)
    items.append(
        Item(
            "gradients",
            f"{'fp32' if grad == 4 else 'bf16'} gradients of the trainable weights",
            grad * trainable,
            "step" if full else "backward+step",
            f"{trainable:,} x {grad} bytes"
            + (" (they grow while the activations are freed; counted at the step)" if full else ""),
        )
    )
    states, how = _optimizer_bytes(sizes, setup)
    items.append(Item("optimizer", f"{setup.optimizer} states", states, "always", how))
    if setup.optimizer == "adamw":
        a = 4 if full else adapter_bytes(setup)
        if setup.device == "cuda":
            step_buffer, how = (
                a * trainable,
                f"{trainable:,} x {a} bytes: AdamW's sqrt(v) for all at once",
            )
        else:
            largest = max(sizes)
            step_buffer, how = (
                a * largest,
                f"{a} bytes x the largest trainable tensor (AdamW's loop on a CPU)",
            )
        items.append(Item("optimizer", "AdamW step buffer", step_buffer, "step", how))
    activation_items, heap_activations = _activation_items(shape, setup)
    items += activation_items
    estimate = MemoryEstimate(shape, setup, items)
    overhead: list[Item] = []
    if setup.device == "cuda":
        overhead.append(
            Item("overhead", "CUDA context and workspaces", GPU_CONTEXT_BYTES, "always", "about 0.5 GiB")
        )
        overhead.append(
            Item(
                "overhead",
                "caching allocator slack",
                round(GPU_FRAGMENTATION * estimate.allocated),
                "always",
                f"{GPU_FRAGMENTATION:.0%} of the allocated peak",
            )
        )
    else:
        overhead.append(
            Item(
                "overhead",
                "Python, torch and libraries",
                CPU_RUNTIME_BYTES,
                "always",
                "measured: about 600 MiB",
            )
        )
        share = cpu_fragmentation()
        if setup.gradient_checkpointing:  # recomputation allocates every layer's stash again
            heap_activations = _activation_items(shape, replace(setup, gradient_checkpointing=False))[1]
        overhead.append(
            Item(
                "overhead",
                "heap fragmentation (glibc)",
                round(share * heap_activations),
                "always",
                f"{share:.0%} of the activations in tensors under 32 MiB"
                + (" (MALLOC_MMAP_THRESHOLD_ is set)" if not share else ""),
            )
        )
        overhead += _mapped_checkpoint(shape, setup)
    return MemoryEstimate(shape, setup, items + overhead)
