"""Merge an adapter into a full-precision copy of its base and write a self-contained model folder.

The folder holds safetensors weights, the tokenizer with the chat template training used (taken
from the adapter), the generation config (stopping at the template's end-of-turn token),
the adapter on its own (under `adapter/`), any exports made from them (GGUF files and Modelfiles,
loraflow.export), and a model card (README.md). It is written to a
temporary folder and renamed into `<models_dir>/<version>/`; a `latest` file then names the
newest version (replaced in one rename), so a failed publish leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraflow.artifacts import atomic_dir, file_sha256
from loraflow.base_model import checkpoint_dtype, load_causal_lm, load_tokenizer, torch_dtype
from loraflow.hashing import content_hash
from loraflow.templates import end_of_turn

LATEST = "latest"
RECORD = "publish_record.json"
PROBE_TEXTS = ("Merged weights must match base plus adapter.",)


class MergeError(RuntimeError):
    """The merged model does not behave like base plus adapter; nothing was published."""


@dataclass(frozen=True)
class PublishResult:
    version: str
    path: str
    merge_max_abs_diff: float
    """Largest logit difference between the merged model (in the publish dtype) and base plus
    adapter computed in float32, on the probes."""
    merge_tolerance: float
    """The largest difference allowed (float32), or the mean difference allowed (16-bit dtypes)."""
    reload_max_abs_diff: float
    """Largest logit difference between the saved-and-reloaded folder and the merged model."""
    merge_mean_abs_diff: float = 0.0
    """Mean logit difference between the merged model and base plus adapter in float32."""
    adapter_effect: float = 0.0
    """Mean logit difference between base plus adapter and the base, both in float32: how much
    training moved the model, the yardstick a 16-bit merge is held to."""
    exports: Any = None
    """What the `exports` step of write_published reported (loraflow.export.ExportReport), or None."""


def publish_version(
    adapter_dir: Path, base_model_hash: str, dtype: str, gguf_types: list[str] | None = None
) -> str:
    """Version of a merged model: hash of the adapter's files, the base, the dtype and the GGUF
    types exported beside it (a folder with other files is another version)."""
    # the adapter's weights and config decide the merged weights; its training log does not
    files = [Path(adapter_dir) / name for name in ("adapter_model.safetensors", "adapter_config.json")]
    identity = {"adapter": [file_sha256(f) for f in files], "base_model": base_model_hash, "dtype": dtype}
    if gguf_types:  # absent without GGUF exports, so safetensors-only versions keep their names
        identity["gguf"] = list(gguf_types)
    return content_hash(identity)


FLOAT32_TOLERANCE = 1e-3
"""Largest logit difference allowed between a float32 merge and base plus adapter."""
SIXTEEN_BIT_SHARE = 0.5
"""A 16-bit merge may differ from base plus adapter (float32) by at most this share of the
adapter's own effect on the logits, on average: past it, rounding washes out what training changed."""


def publish_dtype(choice: str, base_model_dir: Path) -> str:
    """`publish.dtype` resolved: `auto` is the dtype the base checkpoint is stored in."""
    return checkpoint_dtype(base_model_dir) if choice == "auto" else choice


def latest_published(models_dir: Path) -> tuple[str, Path] | None:
    """(version, folder) that `latest` names, or None when nothing is published yet."""
    pointer = Path(models_dir) / LATEST
    if not pointer.is_file():
        return None
    version = pointer.read_text().strip()
    folder = Path(models_dir) / version
    return (version, folder) if folder.is_dir() else None


def published_record(folder: Path) -> dict:
    """The record a published version carries (empty for folders written before records existed)."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class MergeFidelity:
    """How the merged model compares with base plus adapter (in float32) and with the base, on the probes."""

    dtype: str
    merge_max_abs_diff: float
    merge_mean_abs_diff: float
    adapter_effect: float
    """Mean logit difference between base plus adapter and the base, both in float32."""
    changed: bool
    """Whether the merged model's logits differ from the base's (in the publish dtype)."""
    probes: int


@dataclass(frozen=True)
class MergeVerdict:
    passed: bool
    tolerance: float
    """The largest difference allowed (float32, or publish.merge_tolerance), or the mean difference
    allowed (16-bit dtypes: half of the adapter's effect)."""
    failures: list[str]

    def describe(self) -> str:
        return "; ".join(self.failures)


def merge_verdict(fidelity: MergeFidelity, tolerance: float | None = None) -> MergeVerdict:
    """Whether a merge may be published: it changed the model, and its logits are those of base plus
    adapter: within `tolerance` (default 1e-3) at the largest difference in float32 (or whenever a
    tolerance is given), within half of the adapter's own average effect in a 16-bit dtype."""
    failures = []
    if fidelity.adapter_effect == 0.0 or not fidelity.changed:
        failures.append(
            "the merged model's logits equal the base's on every probe: the adapter changed nothing "
            "(trained for too few steps, or with a learning rate too small to move it)"
            + (
                f", or nothing it changed survives rounding to {fidelity.dtype}"
                if fidelity.adapter_effect and fidelity.dtype != "float32"
                else ""
            )
        )
    if fidelity.dtype == "float32" or tolerance is not None:
        allowed = tolerance if tolerance is not None else FLOAT32_TOLERANCE
        if fidelity.merge_max_abs_diff > allowed:
            failures.append(
                f"the merged model's logits differ from base plus adapter by {fidelity.merge_max_abs_diff:.4g} "
                f"(allowed {allowed:.4g}) in {fidelity.dtype}. Publish in float32 (publish.dtype), or raise "
                "publish.merge_tolerance if the difference is expected for this dtype"
            )
    else:
        allowed = SIXTEEN_BIT_SHARE * fidelity.adapter_effect
        if fidelity.merge_mean_abs_diff > allowed:
            failures.append(
                f"in {fidelity.dtype} the merged model's logits differ from base plus adapter (float32) by "
                f"{fidelity.merge_mean_abs_diff:.4g} on average, more than half of the adapter's own effect on "
                f"them ({fidelity.adapter_effect:.4g}): rounding to {fidelity.dtype} would wash out what training "
                "changed. Publish in float32 (publish.dtype), or set publish.merge_tolerance to accept it"
            )
    return MergeVerdict(passed=not failures, tolerance=allowed, failures=failures)


@dataclass
class MergedModel:
    """A merge held in memory, before anything is written: the model in the publish dtype, its
    tokenizer (the adapter's, with its chat template), its fidelity figures and its probe logits."""

    model: object
    tokenizer: object
    fidelity: MergeFidelity
    inputs: list
    logits: list


def merge_in_memory(
    base_model_dir: Path,
    adapter_dir: Path,
    dtype: str,
    trust_remote_code: bool = False,
    probes: list[str] | None = None,
) -> MergedModel:
    """Merge the adapter into the base in float32 and cast to `dtype`; measure the merged logits
    against base plus adapter in float32 and against the base in `dtype`, on the probes."""
    import copy

    from peft import PeftModel

    tokenizer = load_tokenizer(adapter_dir, trust_remote_code)
    model = load_causal_lm(base_model_dir, dtype="float32", trust_remote_code=trust_remote_code)
    model.eval()
    texts = probes or list(PROBE_TEXTS)
    inputs = [
        tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        for text in texts
    ]
    base_logits = _logits(model, inputs)
    base_in_dtype = None
    if dtype != "float32":  # the base as it would be published without the adapter
        rounded = copy.deepcopy(model).to(torch_dtype(dtype))
        base_in_dtype = _logits(rounded, inputs)
        del rounded
    tuned = PeftModel.from_pretrained(model, adapter_dir)
    tuned.eval()
    tuned_logits = _logits(tuned, inputs)
    merged = tuned.merge_and_unload()
    if dtype != "float32":
        merged = merged.to(torch_dtype(dtype))
    merged.eval()
    merged_logits = _logits(merged, inputs)
    fidelity = MergeFidelity(
        dtype=dtype,
        merge_max_abs_diff=max(
            float((m - t).abs().max()) for m, t in zip(merged_logits, tuned_logits, strict=True)
        ),
        merge_mean_abs_diff=_mean_abs(merged_logits, tuned_logits),
        adapter_effect=_mean_abs(tuned_logits, base_logits),
        changed=not all(
            torch.equal(m, b) for m, b in zip(merged_logits, base_in_dtype or base_logits, strict=True)
        ),
        probes=len(texts),
    )
    return MergedModel(merged, tokenizer, fidelity, inputs, merged_logits)


def write_published(
    merged: MergedModel,
    adapter_dir: Path,
    models_dir: Path,
    version: str,
    model_card: str | Callable[[Any], str],
    trust_remote_code: bool = False,
    record: dict | None = None,
    verdict: MergeVerdict | None = None,
    exports: Callable[[Path], Any] | None = None,
) -> PublishResult:
    """Write a merge that passed its verdict to `<models_dir>/<version>/` (a temporary folder renamed
    into place), reload it and compare its logits again, then point `latest` at it. A reload that
    moves further than the merge may (see reload_tolerance) raises MergeError, and nothing is
    published.

    `exports`, when given, is called with the unfinished folder once the safetensors reload
    correctly; it writes further files there and returns a report (loraflow.export.ExportReport).
    It may raise to stop the publish, which then leaves nothing behind. `model_card` may be a
    function of that report (None without exports), so the card lists what was exported."""
    verdict = verdict or merge_verdict(merged.fidelity)
    allowed_reload = reload_tolerance(merged.fidelity, verdict)
    from transformers import AutoModelForCausalLM

    model, tokenizer = merged.model, merged.tokenizer
    _stop_at_end_of_turn(model, tokenizer)
    target = Path(models_dir) / version
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if load_tokenizer(tmp, trust_remote_code).chat_template != tokenizer.chat_template:
            raise MergeError(f"{target}: the saved chat template differs from the adapter's")
        shutil.copytree(adapter_dir, tmp / "adapter")
        (tmp / RECORD).write_text(
            json.dumps(
                {"version": version, "dtype": merged.fidelity.dtype, **(record or {})},
                indent=2,
                sort_keys=True,
            )
        )
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=model.dtype, use_safetensors=True, device_map={"": str(model.device)}
        )
        reloaded.eval()
        reload_diff = max(
            float((r - m).abs().max())
            for r, m in zip(_logits(reloaded, merged.inputs), merged.logits, strict=True)
        )
        if reload_diff > allowed_reload:
            raise MergeError(
                f"{target}: the saved model reloads with logits {reload_diff:.4g} away from the merged one"
            )
        del reloaded
        report = exports(tmp) if exports is not None else None
        card = model_card(report) if callable(model_card) else model_card
        (tmp / "README.md").write_text(card, encoding="utf-8")
    _point_latest(Path(models_dir), version)
    fidelity = merged.fidelity
    return PublishResult(
        version=version,
        path=str(target),
        merge_max_abs_diff=fidelity.merge_max_abs_diff,
        merge_tolerance=verdict.tolerance,
        reload_max_abs_diff=reload_diff,
        merge_mean_abs_diff=fidelity.merge_mean_abs_diff,
        adapter_effect=fidelity.adapter_effect,
        exports=report,
    )


def reload_tolerance(fidelity: MergeFidelity, verdict: MergeVerdict) -> float:
    """How far a saved and reloaded merge may move: as far as the merge itself may in float32 (the
    same weights give the same logits), as far as it did in 16 bits (a GPU's kernels may differ)."""
    return (
        verdict.tolerance
        if fidelity.dtype == "float32"
        else max(fidelity.merge_max_abs_diff, FLOAT32_TOLERANCE)
    )


def merge_adapter(
    base_model_dir: Path,
    adapter_dir: Path,
    models_dir: Path,
    version: str,
    dtype: str,
    model_card: str,
    trust_remote_code: bool = False,
    probes: list[str] | None = None,
    tolerance: float | None = None,
    record: dict | None = None,
) -> PublishResult:
    """Merge, judge the merge (merge_verdict), and publish it only when it passes; a merge that
    fails raises MergeError with the verdict's reasons, and nothing is written. (The published_model
    asset runs the same three steps and reports the verdict as its `merge_fidelity` check.)"""
    merged = merge_in_memory(base_model_dir, adapter_dir, dtype, trust_remote_code, probes)
    verdict = merge_verdict(merged.fidelity, tolerance)
    if not verdict.passed:
        raise MergeError(verdict.describe() + "; nothing was published")
    return write_published(
        merged,
        adapter_dir,
        models_dir,
        version,
        model_card,
        trust_remote_code,
        record,
        verdict,
    )


def _logits(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in inputs]


def _mean_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x - y).abs().sum() for x, y in zip(a, b, strict=True)) / sum(x.numel() for x in a))


def stop_token_ids(generation_config) -> list[int]:
    """The token ids a generation config stops at (its eos_token_id, one or a list), as a list."""
    ids = generation_config.eos_token_id
    return [t for t in (ids if isinstance(ids, list) else [ids]) if t is not None]


def _stop_at_end_of_turn(model, tokenizer) -> None:
    """Make generation stop at the template's end-of-turn token as well as at eos."""
    _, eot_id = end_of_turn(tokenizer)
    config = model.generation_config
    stops = stop_token_ids(config)
    for token in (tokenizer.eos_token_id, eot_id):
        if token is not None and token not in stops:
            stops.append(token)
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id


def _point_latest(models_dir: Path, version: str) -> None:
    tmp = models_dir / f".{LATEST}.tmp"
    tmp.write_text(version + "\n")
    tmp.replace(models_dir / LATEST)
