"""What one training runs with on the device it runs on: dtypes, attention kernel, kernels, optimizer.

The spec's speed settings may say `auto`; `resolve_runtime` turns them into concrete choices for
a device and refuses, before any weight loads, a choice that cannot run there, saying why:

    dtype auto           bfloat16 on a GPU that has it (else float16), bfloat16 on a CPU with
                         bf16 units (AVX512-BF16 or AMX), float32 on every other CPU: there bf16 is
                         emulated, about 75x slower than float32 on this project's machine
    compute_dtype auto   the dtype above (QLoRA dequantizes each 4-bit weight to it)
    attention auto       flash_attention_2 on CUDA with the flash-attn package and a 16-bit dtype,
                         else sdpa
    liger_kernel auto    on with CUDA and the liger-kernel package, else off
    torch_compile auto   off: compiling costs minutes that short fine-tunes do not win back
    optimizer adamw      torch's fused AdamW on CUDA, its foreach AdamW on a CPU

`describe` names each choice and where it came from, for the training's log.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from loraflow.spec import TrainingSpec

SIXTEEN_BIT = ("bfloat16", "float16")


class TrainingError(RuntimeError):
    """Training stopped, or cannot start: what happened, and what to change."""


@dataclass(frozen=True)
class Runtime:
    device: str
    """`cuda` or `cpu`."""
    dtype: str
    """The base weights' dtype for `lora`, the non-quantized weights' for `qlora`; also the autocast dtype."""
    compute_dtype: str | None
    """QLoRA: the dtype each 4-bit weight is dequantized to for its product. None for `lora`."""
    attention: str
    liger_kernel: bool
    torch_compile: bool
    optimizer: str
    """The Trainer's optimizer name (`adamw_torch_fused`, `adamw_bnb_8bit`, ...)."""
    notes: tuple[str, ...] = ()
    """Why each `auto` resolved the way it did."""

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def fp16(self) -> bool:
        return self.dtype == "float16"

    def describe(self) -> str:
        parts = [f"{self.device}, {self.dtype}"]
        if self.compute_dtype:
            parts.append(f"4-bit compute in {self.compute_dtype}")
        parts += [f"attention {self.attention}", f"optimizer {self.optimizer}"]
        if self.liger_kernel:
            parts.append("Liger kernels")
        if self.torch_compile:
            parts.append("torch.compile")
        return ", ".join(parts)


@lru_cache(maxsize=1)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), from its feature flags."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def this_device() -> str:
    """`cuda` when this process sees a GPU, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def auto_dtype(device: str, cuda_bf16: bool | None = None, cpu_bf16: bool | None = None) -> str:
    """The dtype `auto` means on `device` (`cuda` or `cpu`)."""
    if device == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return "bfloat16" if cuda_bf16 else "float16"
    return "bfloat16" if (cpu_has_bf16_units() if cpu_bf16 is None else cpu_bf16) else "float32"


def resolve_dtypes(training: TrainingSpec, device: str) -> tuple[str, str | None]:
    """(dtype, compute dtype) of a training on `device`, `auto` resolved; no check of what runs."""
    dtype = auto_dtype(device) if training.dtype == "auto" else training.dtype
    if training.method != "qlora":
        return dtype, None
    compute = training.quantization.compute_dtype
    return dtype, dtype if compute == "auto" else compute


def resolve_runtime(training: TrainingSpec, device: str | None = None, packing: bool = False) -> Runtime:
    """The concrete settings of `training` on `device` (default: this process's), or a TrainingError
    naming the key and why it cannot run here."""
    device = device or this_device()
    notes = []
    dtype, compute = resolve_dtypes(training, device)
    if training.dtype == "auto":
        notes.append(f"dtype auto: {dtype} on {device}")
    if device == "cpu":
        if "float16" in (dtype, compute):
            raise TrainingError(
                "float16 needs a CUDA GPU (mixed precision with loss scaling); on a CPU set training.dtype "
                "and quantization.compute_dtype to float32 or auto"
            )
        if "bfloat16" in (dtype, compute) and not cpu_has_bf16_units():
            notes.append(
                "bfloat16 on a CPU without bf16 units is emulated, about 75x slower than float32: "
                "training.dtype auto picks float32 here"
            )

    attention = training.attn_implementation
    if attention == "auto":
        fast = device == "cuda" and installed("flash_attn") and (compute or dtype) in SIXTEEN_BIT
        attention = "flash_attention_2" if fast else "sdpa"
        notes.append(f"attention auto: {attention}")
    if attention == "flash_attention_2":
        if device != "cuda" or not installed("flash_attn"):
            raise TrainingError(
                "training.attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package "
                "(pip install flash-attn); use sdpa or auto here"
            )
        if dtype not in SIXTEEN_BIT or (compute is not None and compute not in SIXTEEN_BIT):
            raise TrainingError(
                f"training.attn_implementation flash_attention_2 runs in bfloat16 or float16 only, and this "
                f"training computes in {compute or dtype}: set training.dtype (and quantization.compute_dtype) "
                "to bfloat16 or auto, or use sdpa"
            )

    liger = training.liger_kernel
    if liger == "auto":
        liger = device == "cuda" and installed("liger_kernel")
    elif liger and (device != "cuda" or not installed("liger_kernel")):
        raise TrainingError(
            "training.liger_kernel: true needs a CUDA GPU and the liger-kernel package (pip install "
            "'loraflow[gpu]'); set it to auto or false here"
        )

    compile_ = training.torch_compile
    if compile_ == "auto":
        compile_ = False

    optimizer = {
        "adamw": "adamw_torch_fused" if device == "cuda" else "adamw_torch",
        "adamw_8bit": "adamw_bnb_8bit",
        "paged_adamw_8bit": "paged_adamw_8bit",
    }[training.optimizer]
    if training.optimizer != "adamw" and device != "cuda":
        raise TrainingError(
            f"training.optimizer {training.optimizer} runs on a CUDA GPU only (bitsandbytes); use adamw here"
        )

    if training.distributed == "deepspeed" and (device != "cuda" or not installed("deepspeed")):
        raise TrainingError(
            "training.distributed deepspeed needs CUDA GPUs and the deepspeed package (pip install deepspeed); "
            "on this machine use ddp (several processes under torchrun) or fsdp"
        )
    return Runtime(
        device=device,
        dtype=dtype,
        compute_dtype=compute,
        attention=attention,
        liger_kernel=bool(liger),
        torch_compile=bool(compile_),
        optimizer=optimizer,
        notes=tuple(notes),
    )
