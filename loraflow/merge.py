"""Merge an adapter into a full-precision copy of its base and write a self-contained model folder.

The folder holds safetensors weights, the tokenizer with the chat template training used (taken
from the adapter), the generation config (stopping at the template's end-of-turn token),
the adapter on its own (under `adapter/`), any exports made from them (GGUF files and Modelfiles,
loraflow.export), and a model card (README.md). It is written to a
temporary folder and renamed into `<models_dir>/<version>/`; a `latest` file then names the
newest version (replaced in one rename), so a failed publish leaves the previous one intact.

LoRA, AdaLoRA and IA3 adapters merge (PEFT's merge_and_unload: a low-rank update added to each
weight, a scaling folded into its rows or columns). A prefix-tuning adapter cannot: its trained
key/value vectors come before every sequence and are not a change to any weight. Its version holds
the adapter alone (`adapter/`, no model weights), the tokenizer, the generation config and a
record naming the base it must be loaded on (`publish_record.json`: `merged: false`); it is checked
by loading the written adapter on the base again and comparing the logits with the trained ones.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraflow.adapters import adapter_method, mergeable
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
    if not mergeable(adapter_method(adapter_dir)):
        identity["dtype"] = None  # an adapter published alone: no weights are cast, the dtype changes nothing
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
    merged: bool = True
    """False for an adapter that cannot be merged (prefix tuning): the published model is then base
    plus adapter itself, and the merge differences are 0 by construction."""
    adapter_method: str = "lora"
    """The trained adapter's method (loraflow.adapters.adapter_method): lora, adalora, ia3 or prefix."""


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
    base_model_dir: Path | None = None
    """The base the adapter was applied to: an unmerged version is reloaded on it to be checked."""

    @property
    def merged(self) -> bool:
        """Whether `model` holds merged weights; False for a prefix adapter (`model` is base plus adapter)."""
        return self.fidelity.merged


def merge_in_memory(
    base_model_dir: Path,
    adapter_dir: Path,
    dtype: str,
    trust_remote_code: bool = False,
    probes: list[str] | None = None,
) -> MergedModel:
    """Merge the adapter into the base in float32 and cast to `dtype`; measure the merged logits
    against base plus adapter in float32 and against the base in `dtype`, on the probes. An adapter
    that cannot be merged (prefix tuning) stays base plus adapter in float32, `dtype` aside: its
    figures say how much it changes the base."""
    import copy

    from peft import PeftModel

    method = adapter_method(adapter_dir)
    if not mergeable(method):
        dtype = "float32"  # no weights are written, so none are rounded
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
    if not mergeable(method):
        fidelity = MergeFidelity(
            dtype=dtype,
            merge_max_abs_diff=0.0,
            merge_mean_abs_diff=0.0,
            adapter_effect=_mean_abs(tuned_logits, base_logits),
            changed=not all(torch.equal(t, b) for t, b in zip(tuned_logits, base_logits, strict=True)),
            probes=len(texts),
            merged=False,
            adapter_method=method,
        )
        return MergedModel(tuned, tokenizer, fidelity, inputs, tuned_logits, Path(base_model_dir))
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
        adapter_method=method,
    )
    return MergedModel(merged, tokenizer, fidelity, inputs, merged_logits, Path(base_model_dir))


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
    function of that report (None without exports), so the card lists what was exported.

    An unmerged model (a prefix adapter, `merged.merged` False) is written without weights: the
    adapter, the tokenizer, the generation config and the record; the reload check loads that
    adapter on the base again."""
    verdict = verdict or merge_verdict(merged.fidelity)
    allowed_reload = reload_tolerance(merged.fidelity, verdict)
    from transformers import AutoModelForCausalLM

    model, tokenizer = merged.model, merged.tokenizer
    _stop_at_end_of_turn(model, tokenizer)
    target = Path(models_dir) / version
    with atomic_dir(target) as tmp:
        if merged.merged:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if load_tokenizer(tmp, trust_remote_code).chat_template != tokenizer.chat_template:
            raise MergeError(f"{target}: the saved chat template differs from the adapter's")
        shutil.copytree(adapter_dir, tmp / "adapter")
        (tmp / RECORD).write_text(
            json.dumps(
                {
                    "version": version,
                    "dtype": merged.fidelity.dtype,
                    "merged": merged.merged,
                    "adapter_method": merged.fidelity.adapter_method,
                    **(record or {}),
                },
                indent=2,
                sort_keys=True,
            )
        )
        if merged.merged:
            reloaded = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=model.dtype, use_safetensors=True, device_map={"": str(model.device)}
            )
        else:
            reloaded = load_published_model(tmp, merged.base_model_dir, trust_remote_code=trust_remote_code)
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


def load_published_model(
    folder: Path, base_model_dir: Path | None = None, dtype: str = "float32", trust_remote_code: bool = False
):
    """A published version as a model to score or generate with: its merged weights, or, for a
    version that holds an adapter alone (`merged: false` in its record: prefix tuning), that adapter
    on `base_model_dir`, which must be the base the record names."""
    from peft import PeftModel

    folder = Path(folder)
    record = published_record(folder)
    if record.get("merged", True):
        return load_causal_lm(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    if base_model_dir is None:
        raise MergeError(
            f"{folder}: this version holds a {record.get('adapter_method', 'prefix')} adapter alone (it cannot be "
            f"merged); load it on its base model {record.get('base_model', '(not recorded)')}"
        )
    base = load_causal_lm(Path(base_model_dir), dtype=dtype, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, folder / "adapter")


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
