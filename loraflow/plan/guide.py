"""The fine-tuning guide's memory and cost tables, recomputed by the planner and compared.

The guide gives full fine-tuning and LoRA memory for 7B, 13B and 70B models, a QLoRA breakdown for
65B, and GPU hours for three runs. It states no batch size, sequence length or data size, so the
planner states its own (GUIDE_WORKLOAD, GUIDE_RUN) and explains each difference from the numbers:
what bytes per parameter a figure implies, which base precision it can hold, how many tokens an
activation or time figure corresponds to.
"""

from __future__ import annotations

from dataclasses import replace

from loraflow.plan.cost import ACCELERATORS, estimate_time
from loraflow.plan.memory import GB, MemoryEstimate, Setup, estimate_memory
from loraflow.plan.shapes import NAMED_SHAPES

# The guide's figures, GB.
GUIDE_MEMORY = {"7B": (140, 8), "13B": (260, 16), "70B": (1400, 48)}
"""Size -> (full fine-tuning, LoRA) GPU memory."""
GUIDE_QLORA_65B = {
    "base (4-bit)": 35,
    "adapters": 0.4,
    "optimizer states (offloaded to CPU)": 130,
    "activations": 16,
    "total GPU": 48,
}
GUIDE_COST = [
    # (label, size, method, rank, GPU, hours, cost at ~$3/GPU-hour)
    ("Llama 7B + LoRA (r=16)", "7B", "lora", 16, "A100", 4, 12),
    ("Llama 13B + LoRA (r=16)", "13B", "lora", 16, "A100", 8, 24),
    ("Llama 70B + QLoRA (r=64)", "70B", "qlora", 64, "A100", 48, 144),
]
GUIDE_PRICE = 3.0

GUIDE_WORKLOAD = Setup(
    method="lora",
    dtype="bfloat16",
    lora_r=16,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    lora_dropout=0.05,
    optimizer="adamw",
    batch_size=4,
    seq_len=512,
    gradient_checkpointing=True,
    device="cuda",
)
"""The step every memory estimate below assumes: bf16, 4 sequences of 512 tokens, gradient
checkpointing, LoRA r=16 on q/k/v/o, AdamW, one GPU."""

GUIDE_RUN = {"examples": 10_000, "tokens_per_example": 512, "epochs": 3}
"""The run every time estimate assumes: the guide's upper end of a typical LoRA dataset."""


def _gb(value: float) -> str:
    return f"{value / GB:,.1f}"


def memory_rows() -> list[dict]:
    """Per guide size: the planner's full, LoRA (16- and 8-bit base) and QLoRA estimates."""
    rows = []
    for size, (full_gb, lora_gb) in GUIDE_MEMORY.items():
        shape = NAMED_SHAPES[size]
        rows.append(
            {
                "size": size,
                "shape": shape,
                "guide_full": full_gb,
                "guide_lora": lora_gb,
                "full": estimate_memory(shape, replace(GUIDE_WORKLOAD, method="full")),
                "lora16": estimate_memory(shape, GUIDE_WORKLOAD),
                "lora8": estimate_memory(shape, replace(GUIDE_WORKLOAD, base_bits=8)),
                "qlora": estimate_memory(shape, replace(GUIDE_WORKLOAD, method="qlora")),
            }
        )
    return rows


def explain_full(size: str, guide_gb: float, estimate: MemoryEstimate) -> str:
    n = estimate.shape.params
    step = estimate.step
    gap = estimate.peak / (guide_gb * GB) - 1
    return (
        f"{size} full: the guide's ~{guide_gb:,} GB is {guide_gb * GB / n:.1f} bytes per parameter. The "
        f"planner's peak is the optimizer step: 4 (fp32 weights) + 4 (fp32 gradients) + 8 (AdamW's two "
        f"moments) + 4 (AdamW's step buffer) = 20 bytes per parameter, {_gb(step)} GB, plus "
        f"{_gb(estimate.overhead)} GB of CUDA context and allocator slack: {_gb(estimate.peak)} GB, "
        f"{'+' if gap >= 0 else ''}{gap:.0%} from the guide."
    )


def explain_lora(row: dict) -> str:
    size, guide_gb, shape = row["size"], row["guide_lora"], row["shape"]
    guide = guide_gb * GB
    weights = {bits: shape.params * bits / 8 for bits in (16, 8, 4)}
    held = next((bits for bits in (16, 8, 4) if weights[bits] < guide), None)
    planner = f"the planner's LoRA on a 16-bit base is {_gb(row['lora16'].peak)} GB, on an 8-bit base " + (
        f"{_gb(row['lora8'].peak)} GB, QLoRA {_gb(row['qlora'].peak)} GB"
    )
    if held == 16:
        return f"{size} LoRA: ~{guide_gb} GB holds a 16-bit base ({_gb(weights[16])} GB); {planner}."
    if held is None:
        return (
            f"{size} LoRA: ~{guide_gb} GB is less than even a 4-bit base ({_gb(weights[4])} GB); {planner}."
        )
    why = (
        f"it is less than the 16-bit base alone ({_gb(weights[16])} GB)"
        if held == 8
        else f"it is less than an 8-bit base ({_gb(weights[8])} GB)"
    )
    rest = guide - weights[held]
    text = (
        f"{size} LoRA: ~{guide_gb} GB implies a base held in {held} bits, not 16: {why}, while {held} bits "
        f"take {_gb(weights[held])} GB and leave {_gb(rest)} GB for adapters, optimizer, activations and "
        f"the CUDA context. {planner[0].upper() + planner[1:]}"
    )
    if held == 8:
        text += (
            f"; the 8-bit estimate is above the guide's by the embeddings and head, which stay in bf16 "
            f"({_gb(2 * shape.unquantized_params)} GB), the bf16 activations and the CUDA context."
        )
    else:
        text += ": the guide's LoRA figure at this size is a QLoRA figure (its QLoRA 65B breakdown totals 48 GB too)."
    return text


def tokens_for_activations(shape_name: str, target_bytes: float, checkpointing: bool) -> int:
    """Tokens per step (rows of up to 512) at which the planner's QLoRA activations reach `target_bytes`."""
    shape, row = NAMED_SHAPES[shape_name], GUIDE_WORKLOAD.seq_len
    tokens = 0
    while tokens < 4096 * row:
        tokens += 64
        setup = replace(
            GUIDE_WORKLOAD,
            method="qlora",
            batch_size=-(-tokens // row),
            seq_len=min(tokens, row),
            gradient_checkpointing=checkpointing,
        )
        if estimate_memory(shape, setup).total("activations") >= target_bytes:
            break
    return tokens


def qlora_65b_lines() -> list[str]:
    shape = NAMED_SHAPES["65B"]
    est = estimate_memory(shape, replace(GUIDE_WORKLOAD, method="qlora"))
    base = est.total("weights")
    adapters = est.total("lora")
    optimizer = est.total("optimizer")
    guide = GUIDE_QLORA_65B
    with_ckpt = tokens_for_activations("65B", guide["activations"] * GB, True)
    without = tokens_for_activations("65B", guide["activations"] * GB, False)
    lines = [
        "| QLoRA 65B | guide (GB) | planner (GB) |",
        "|---|---|---|",
        f"| base (4-bit) | ~{guide['base (4-bit)']} | {_gb(base)} |",
        f"| LoRA adapters | ~{guide['adapters']} | {_gb(adapters)} (+ {_gb(est.total('gradients'))} gradients) |",
        f"| optimizer states | ~{guide['optimizer states (offloaded to CPU)']} (on the CPU) | {_gb(optimizer)} (on the GPU) |",
        f"| activations | ~{guide['activations']} | {_gb(est.total('activations'))} |",
        f"| overhead | | {_gb(est.overhead)} |",
        f"| total GPU | ~{guide['total GPU']} | {_gb(est.peak)} |",
        "",
        f"- Base: {shape.quantizable_params / 1e9:.1f}B linear weights at 4.127 bits (NF4, double-quantized) are "
        f"{_gb(shape.quantizable_params * 4.127 / 8)} GB; embeddings, norms and head in bf16 add "
        f"{_gb(2 * shape.unquantized_params)} GB.",
        f"- Optimizer: ~130 GB is two bytes for each of 65B parameters, the size of a 16-bit Adam moment of "
        f"the whole model. LoRA's optimizer covers only the adapters: {est.setup.lora_r and _gb(optimizer)} GB of "
        f"bf16 moments for r={est.setup.lora_r} on q/k/v/o (TRL keeps a 4-bit model's adapters in bf16), small "
        "enough to stay on the GPU (paged 8-bit optimizers move pages to the CPU only under memory pressure).",
        f"- Activations: the guide's ~16 GB corresponds, in the planner's model, to about {with_ckpt:,} tokens per "
        f"step with gradient checkpointing, or {without:,} without (QLoRA's activations are bf16: the training "
        "engine does not upcast a 4-bit model's other weights to fp32).",
    ]
    return lines


def cost_lines() -> list[str]:
    run = GUIDE_RUN
    tokens = run["examples"] * run["tokens_per_example"] * run["epochs"]
    lines = [
        f"| configuration | guide: GPU hours | guide: cost at ${GUIDE_PRICE:.0f}/h | planner: hours | planner: cost "
        "| tokens the guide's hours imply |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for label, size, method, rank, gpu, hours, cost in GUIDE_COST:
        shape = NAMED_SHAPES[size]
        setup = replace(GUIDE_WORKLOAD, method=method, lora_r=rank)
        estimate = estimate_time(shape, setup, tokens, gpu, GUIDE_PRICE)
        rate = tokens / (estimate.hours * 3600)
        implied = hours * 3600 * rate
        lines.append(
            f"| {label} | ~{hours} ({gpu}) | ~${cost} | {estimate.hours:,.1f} | ${estimate.cost:,.0f} | "
            f"{implied / 1e6:,.0f}M ({implied / tokens:.1f}x the planner's run) |"
        )
        notes.append(
            f"- {label}: {estimate.flops.hardware / 1e9:,.1f} GFLOP per token (with recomputation) at "
            f"{estimate.utilisation:.0%} of the {gpu}'s {ACCELERATORS[gpu].peak_flops / 1e12:,.0f} TFLOP/s is "
            f"{rate:,.0f} tokens/s; the guide's {hours} h are {implied / 1e6:,.0f}M tokens, "
            f"{implied / (run['tokens_per_example'] * run['epochs']):,.0f} examples of {run['tokens_per_example']} "
            f"tokens for {run['epochs']} epochs."
        )
    return lines + [""] + notes


def report() -> str:
    """The whole comparison as Markdown."""
    w = GUIDE_WORKLOAD
    out = [
        "### Memory: the guide's table beside the planner's estimates",
        "",
        f"Every estimate: {w.dtype}, {w.batch_size} sequences x {w.seq_len} tokens per step, gradient "
        f"checkpointing on, LoRA r={w.lora_r} on q/k/v/o (dropout {w.lora_dropout}), AdamW, one GPU; "
        "peak including the CUDA context and allocator slack. GB = 10^9 bytes.",
        "",
        "| size | params | full: guide | full: planner | LoRA: guide | LoRA, 16-bit base | LoRA, 8-bit base "
        "| QLoRA | reduction: guide | reduction: planner (LoRA 16-bit, QLoRA) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = memory_rows()
    for r in rows:
        full = r["full"].peak
        out.append(
            f"| {r['size']} | {r['shape'].params / 1e9:.2f}B | ~{r['guide_full']:,} | {_gb(full)} | ~{r['guide_lora']} "
            f"| {_gb(r['lora16'].peak)} | {_gb(r['lora8'].peak)} | {_gb(r['qlora'].peak)} "
            f"| ~{1 - r['guide_lora'] / r['guide_full']:.0%} "
            f"| {1 - r['lora16'].peak / full:.0%}, {1 - r['qlora'].peak / full:.0%} |"
        )
    out += ["", "Where they differ:", ""]
    for r in rows:
        out.append("- " + explain_full(r["size"], r["guide_full"], r["full"]))
    for r in rows:
        out.append("- " + explain_lora(r))
    out += ["", "### QLoRA 65B: the guide's breakdown beside the planner's", ""] + qlora_65b_lines()
    run = GUIDE_RUN
    out += [
        "",
        "### Time and cost: the guide's table beside the planner's",
        "",
        f"Every estimate: {run['examples']:,} examples of {run['tokens_per_example']} tokens, {run['epochs']} epochs "
        f"({run['examples'] * run['tokens_per_example'] * run['epochs'] / 1e6:,.2f}M tokens), the memory table's "
        "step (gradient checkpointing recomputes the forward pass), one GPU at the guide's price. FLOPs per token: "
        "4·N + 6·N_lora + attention for LoRA and QLoRA (no weight gradients for frozen weights), 6·N for full "
        "fine-tuning; assumed utilisation: "
        + ", ".join(f"{a.name} {a.utilisation:.0%}" for a in ACCELERATORS.values() if a.name != "CPU")
        + " of the dense bf16 peak, three quarters of that for QLoRA (it dequantizes every weight for every "
        "product). The guide names no data size; the last column is what its hours buy at these rates.",
        "",
    ] + cost_lines()
    return "\n".join(out)
