"""How long a run takes and what it costs: tokens x FLOPs per token / (peak FLOP/s x utilisation).

FLOPs per token (N: the decoder layers' linear weights; H = vocab x hidden, the output head,
which loraflow runs only on trained tokens, a share f of them; Na: adapter parameters;
A = 4·layers·q_dim·c, the forward attention scores and weighted sum over c = seq_len/2 keys on
average for a causal model):

    full         6·N + 6·f·H + 3·A   forward 2 per weight, backward 4 (input and weight gradients)
    LoRA, QLoRA  4·N + 4·f·H + 3·A + 6·Na
                                     forward 2·N; backward 2·N for the input gradients only: frozen
                                     weights get no weight gradients; the adapters train in full
    checkpointing adds one more forward of the layers: + 2·N + A (+ 2·Na)
    DPO's reference  + 2·N + 2·H + A   a forward without gradients of the model with its adapter
                                     disabled, on every position (TRL's DPO and ORPO run the head
                                     on every position: f = 1)

Na counts the adapter weights that are matrix products on every token (LoRA's and AdaLoRA's, at
init_r); IA3's vectors are elementwise and a prefix is looked up once per sequence, so theirs
count 0. A prefix of P virtual tokens makes every query attend to P more keys: c = seq_len/2 + P.
Preference pairs: the tokens are both sequences' (the dataset's train_tokens counts both).

Attention has no weights, so its backward (2·A: gradients for both operands of both matrix
products) is the same whether the weights train or not. Time divides the hardware FLOPs (with the
recomputation) by the accelerator's dense peak and an assumed utilisation; padded tokens are
computed like real ones, so a run's tokens are divided by the padding or packing efficiency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraflow.plan.memory import Setup, adapter_matmul_params
from loraflow.plan.shapes import ModelShape, PlanError

QLORA_THROUGHPUT = 0.75
"""QLoRA dequantizes every 4-bit weight for each matrix product, forward and backward: the planner
assumes it reaches three quarters of LoRA's utilisation."""


@dataclass(frozen=True)
class Accelerator:
    """A device the planner can time a run on."""

    name: str
    peak_flops: float
    """Dense bf16 peak FLOP/s (no sparsity); for the CPU, fp32 (it has no bf16 units)."""
    memory_gib: float
    """Memory as the device reports it."""
    utilisation: float
    """Assumed share of the peak a LoRA training step reaches (hardware FLOPs, recomputation
    included). An assumption, not a measurement, except for the CPU."""
    note: str
    fp32_flops: float = 0.0
    """Dense fp32 peak FLOP/s without TF32 (PyTorch's default for matrix products), what a
    training in float32 gets; 0 means the same as `peak_flops`."""

    def peak(self, dtype: str) -> float:
        """The peak a training in `dtype` computes at."""
        return self.fp32_flops if dtype == "float32" and self.fp32_flops else self.peak_flops


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("A100", 312e12, 80.0, 0.40, "A100 SXM 80GB, 312 TFLOP/s bf16", 19.5e12),
        Accelerator("H100", 989e12, 79.6, 0.35, "H100 SXM 80GB, 989 TFLOP/s bf16", 67e12),
        Accelerator("H200", 989e12, 140.4, 0.35, "H200 141GB, the H100's compute with more memory", 67e12),
        Accelerator("L4", 121e12, 22.5, 0.40, "L4 24GB, 121 TFLOP/s bf16", 30.3e12),
        Accelerator(
            "RTX 4090", 165e12, 24.0, 0.40, "RTX 4090 24GB, 165 TFLOP/s bf16 with fp32 accumulation", 82.6e12
        ),
        Accelerator(
            "CPU",
            157e9,
            0.0,
            0.40,
            "2 x86 cores with AVX2 at 2.45 GHz (this project's machine): 2 x 32 fp32 FLOP/cycle; the "
            "demo's measured 100 tokens/s of QLoRA on SmolLM2-135M is 30% of it, three quarters of 40%",
        ),
    )
}


def accelerator(name: str) -> Accelerator:
    """A named accelerator (A100, H100, H200, L4, RTX 4090, CPU), case and spaces aside."""
    wanted = name.replace(" ", "").upper()
    for accel in ACCELERATORS.values():
        if accel.name.replace(" ", "").upper() == wanted:
            return accel
    raise PlanError(f"unknown GPU {name!r}; the planner knows {', '.join(ACCELERATORS)}")


@dataclass(frozen=True)
class Flops:
    model: float
    """Model FLOPs per token: what the step needs without recomputation."""
    hardware: float
    """What the device computes per token: the model FLOPs plus checkpointing's recomputation."""


def flops_per_token(shape: ModelShape, setup: Setup) -> Flops:
    """FLOPs per token of a training step (see the module docstring for the formulas)."""
    n = shape.quantizable_params
    head = shape.vocab_size * shape.hidden_size * setup.trained_fraction
    attention = 4 * shape.num_layers * shape.q_dim * (setup.seq_len / 2 + setup.prefix)
    if setup.method == "full":
        model, lora = 6 * n + 6 * head + 3 * attention, 0
    else:
        lora = adapter_matmul_params(shape, setup)
        model = 4 * n + 4 * head + 3 * attention + 6 * lora
    if setup.objective == "dpo":  # the reference: a forward without the adapter
        model += 2 * n + 2 * shape.vocab_size * shape.hidden_size + attention
    recompute = (2 * n + attention + 2 * lora) if setup.gradient_checkpointing else 0
    return Flops(model=model, hardware=model + recompute)


@dataclass(frozen=True)
class TimeEstimate:
    tokens: float
    """Real (non-padding) tokens trained."""
    processed_tokens: float
    """Tokens computed, padding included."""
    flops: Flops
    accelerator: Accelerator
    utilisation: float
    hours: float
    price_per_hour: float
    gpus: int = 1
    peak_flops: float = 0.0
    """The peak this run's dtype computes at on the accelerator (fp32 trainings get the fp32 one)."""

    @property
    def cost(self) -> float:
        return self.hours * self.price_per_hour * self.gpus

    def describe(self) -> str:
        return (
            f"{_count(self.tokens)} tokens ({_count(self.processed_tokens)} computed with padding) x "
            f"{self.flops.hardware / 1e9:,.2f} GFLOP/token on {self.accelerator.name} at "
            f"{self.utilisation:.0%} of {(self.peak_flops or self.accelerator.peak_flops) / 1e12:,.3g} TFLOP/s: "
            f"{_duration(self.hours)}, {self.cost:,.2f} at {self.price_per_hour:,.2f}/GPU-hour"
        )


def _count(value: float) -> str:
    return f"{value / 1e6:,.2f}M" if value >= 1e6 else f"{value:,.0f}"


def _duration(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.1f} h"
    minutes = hours * 60
    seconds = minutes * 60
    return (
        f"{minutes:.1f} min" if minutes >= 1 else f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    )


def estimate_time(
    shape: ModelShape,
    setup: Setup,
    tokens: float,
    gpu: str | Accelerator = "A100",
    price_per_hour: float = 3.0,
    efficiency: float = 1.0,
) -> TimeEstimate:
    """Hours and cost to train `tokens` real tokens; `efficiency` is real over computed tokens
    (padding or packing), 1.0 for none."""
    accel = gpu if isinstance(gpu, Accelerator) else accelerator(gpu)
    flops = flops_per_token(shape, setup)
    utilisation = accel.utilisation * (QLORA_THROUGHPUT if setup.method == "qlora" else 1.0)
    processed = tokens / max(efficiency, 1e-6)
    seconds = processed * flops.hardware / (accel.peak(setup.dtype) * utilisation)
    return TimeEstimate(
        tokens,
        processed,
        flops,
        accel,
        utilisation,
        seconds / 3600,
        price_per_hour,
        peak_flops=accel.peak(setup.dtype),
    )


# ---------------------------------------------------------------------------------------------
# tokens from a training dataset


def dataset_summary(dataset_dir: str | Path) -> dict:
    """The summary.json a training dataset folder holds (token counts and length percentiles)."""
    path = Path(dataset_dir) / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(
            f"{path}: no dataset summary; is {dataset_dir} a training dataset folder (materialize the "
            "pipeline's training_dataset first)?"
        ) from None


def padding_efficiency(summary: dict, batch_size: int) -> float:
    """Real over computed tokens when each batch is padded to its longest example: the mean length
    over the expected longest of `batch_size` examples, taken as the b/(b+1) quantile of the
    lengths (interpolated between the stored percentiles p50, p90, p95, p99, p100)."""
    if batch_size <= 1:
        return 1.0
    points = sorted((float(k[1:]), v) for k, v in summary.get("token_percentiles", {}).items())
    mean = summary.get("mean_tokens") or 0
    if not points or not mean:
        return 1.0
    q = 100 * batch_size / (batch_size + 1)
    longest = points[-1][1]
    for (q0, v0), (q1, v1) in zip(points, points[1:], strict=False):
        if q0 <= q <= q1:
            longest = v0 + (v1 - v0) * (q - q0) / (q1 - q0)
            break
    else:
        if q < points[0][0]:
            longest = points[0][1]
    return min(1.0, mean / longest) if longest else 1.0
