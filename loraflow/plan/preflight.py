"""Preflight: compare the estimate with the device's free memory before the model is loaded, and
when it does not fit, say by how much and which settings would (each one re-estimated)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.plan.memory import GIB, MemoryEstimate
from loraflow.plan.shapes import PlanError

MAX_ALTERNATIVES = 4


@dataclass(frozen=True)
class FreeMemory:
    bytes: int
    where: str
    """The device in words, for messages."""


def free_memory(device: str | None = None) -> FreeMemory:
    """Free memory where training would run: the GPU's free bytes (torch.cuda.mem_get_info, which
    counts other processes' use) on `cuda[:N]`, else the machine's available memory (MemAvailable
    in /proc/meminfo: free plus reclaimable caches) on `cpu`. Default: the GPU when there is one."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        return FreeMemory(free, f"GPU {index} ({name}, {total / GIB:.1f} GiB)")
    return FreeMemory(available_system_memory(), "this machine's available memory (MemAvailable)")


def available_system_memory(meminfo: str | Path = "/proc/meminfo") -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    try:
        text = Path(meminfo).read_text()
    except OSError as err:
        raise PlanError(
            f"{meminfo}: cannot read the available memory ({err}); pass the free bytes yourself"
        ) from None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    if found is None:
        raise PlanError(f"{meminfo} has no MemAvailable line; pass the free bytes yourself")
    return int(found.group(1)) * 1024


@dataclass(frozen=True)
class Alternative:
    """Settings that fit: the YAML changes and their estimate."""

    changes: dict[str, object] = field(default_factory=dict)
    estimate: MemoryEstimate | None = None

    def describe(self, batch_size: int) -> str:
        parts = []
        for key, value in self.changes.items():
            if key == "batch_size":
                factor = batch_size // value
                parts.append(
                    f"training.batch_size: {value} (and gradient_accumulation_steps x{factor}, to keep "
                    f"{batch_size} examples per step)"
                )
            elif key == "gradient_checkpointing":
                parts.append("training.gradient_checkpointing: true")
            elif key == "method":
                parts.append("training.method: qlora (a 4-bit base)")
            elif key == "optimizer":
                parts.append(f"training.optimizer: {value}")
        return " + ".join(parts) + f" -> {self.estimate.peak / GIB:,.1f} GiB"


def _candidate_changes(estimate: MemoryEstimate) -> list[dict[str, object]]:
    """Setting changes to try, alone and together: gradient checkpointing, QLoRA, an 8-bit
    optimizer (GPU only), each with the batch halved down to 1."""
    setup = estimate.setup
    kinds: list[dict[str, object]] = [{}]
    if not setup.gradient_checkpointing:
        kinds.append({"gradient_checkpointing": True})
    if setup.method == "lora":
        kinds += [{"method": "qlora", "base_bits": None, **k} for k in list(kinds)]
    if setup.device == "cuda" and setup.optimizer == "adamw" and setup.method == "full":
        kinds += [{"optimizer": "adamw_8bit", **k} for k in list(kinds)]
    batches = [setup.batch_size]
    while batches[-1] > 1:
        batches.append(batches[-1] // 2)
    candidates = []
    for kind in kinds:
        for batch in batches:
            change = dict(kind) if batch == setup.batch_size else {**kind, "batch_size": batch}
            if change:
                candidates.append(change)
    return candidates


def fitting_alternatives(estimate: MemoryEstimate, free_bytes: int) -> list[Alternative]:
    """Settings that fit in `free_bytes`, fewest changes first: for each kind of change the
    largest batch that fits; a kind that fits at the full batch is not listed again with a
    smaller one."""
    fits: dict[tuple, Alternative] = {}
    for change in _candidate_changes(estimate):
        kind = tuple(sorted(k for k in change if k not in ("batch_size", "base_bits")))
        if kind in fits:
            continue  # a larger batch of this kind already fits
        candidate = estimate.with_setup(**change)
        if candidate.peak <= free_bytes:
            fits[kind] = Alternative({k: v for k, v in change.items() if k != "base_bits"}, candidate)
    return sorted(
        fits.values(), key=lambda a: (len(a.changes), -a.estimate.setup.batch_size, a.estimate.peak)
    )[:MAX_ALTERNATIVES]


def leanest(estimate: MemoryEstimate) -> MemoryEstimate:
    """The smallest estimate the candidate changes reach."""
    return min(
        (estimate.with_setup(**c) for c in _candidate_changes(estimate)),
        key=lambda e: e.peak,
        default=estimate,
    )


def preflight(estimate: MemoryEstimate, free_bytes: int, where: str = "the device") -> None:
    """Raise PlanError when the estimated peak exceeds `free_bytes`, with the numbers, the
    breakdown and the settings that would fit."""
    if estimate.peak <= free_bytes:
        return
    breakdown = ", ".join(f"{name} {value / GIB:,.2f}" for name, value in estimate.breakdown().items())
    lines = [
        f"training will not fit: it needs about {estimate.peak / GIB:,.1f} GiB at its peak "
        f"({estimate.peak_phase}), and {where} has {free_bytes / GIB:,.1f} GiB free.",
        f"  model: {estimate.shape.describe()}",
        f"  settings: {estimate.setup.describe()}",
        f"  estimate (GiB): {breakdown}",
    ]
    alternatives = fitting_alternatives(estimate, free_bytes)
    if alternatives:
        lines.append("Settings that fit (each re-estimated):")
        lines += [f"  - {a.describe(estimate.setup.batch_size)}" for a in alternatives]
        lines.append(
            "Change the pipeline YAML accordingly, or free memory on the device, or use a larger one."
        )
    else:
        smallest = leanest(estimate)
        lines.append(
            f"No setting the planner tries fits: even {smallest.setup.describe()} needs "
            f"{smallest.peak / GIB:,.1f} GiB. Use a device with at least that much free memory, a smaller "
            "base model, or shorter sequences (format.max_seq_len)."
        )
    raise PlanError("\n".join(lines))
