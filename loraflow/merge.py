"""Merge an adapter into a full-precision copy of its base and write a self-contained model folder.

The folder holds safetensors weights, the tokenizer with the chat template training used (taken
from the adapter), the generation config (stopping at the template's end-of-turn token),
the adapter on its own (under `adapter/`), and a model card (README.md). It is written to a
temporary folder and renamed into `<models_dir>/<version>/`; a `latest` file then names the
newest version (replaced in one rename), so a failed publish leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from loraflow.artifacts import atomic_dir, file_sha256
from loraflow.base_model import checkpoint_dtype, load_causal_lm, load_tokenizer, torch_dtype
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


def publish_version(adapter_dir: Path, base_model_hash: str, dtype: str) -> str:
    """Version of a merged model: hash of the adapter's files, the base and the dtype."""
    # the adapter's weights and config decide the merged weights; its training log does not
    files = [Path(adapter_dir) / name for name in ("adapter_model.safetensors", "adapter_config.json")]
    blob = ":".join([*(file_sha256(f) for f in files), base_model_hash, dtype]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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
    """Merge in float32 and cast to `dtype`, check the merged logits against base plus adapter in
    float32 and against the base (an adapter that changes nothing, or whose change the dtype's
    rounding erases, is refused), save, reload and compare again, then point `latest` at the new
    version. Any failure leaves `latest` where it was and writes no version folder.

    The check: in float32 the merged logits are within `tolerance` (default 1e-3) of base plus
    adapter everywhere. In a 16-bit dtype they are, on average, within half of the adapter's own
    average effect on the logits (or within `tolerance`, when given, at the largest difference).
    """
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # the adapter's tokenizer carries the chat template the adapter was trained with
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code)
    model = load_causal_lm(base_model_dir, dtype="float32", trust_remote_code=trust_remote_code)
    model.eval()
    inputs = [
        tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        for text in (probes or PROBE_TEXTS)
    ]

    def logits_of(m) -> list[torch.Tensor]:
        with torch.no_grad():
            return [m(input_ids=ids).logits.float() for ids in inputs]

    base_logits = logits_of(model)
    base_in_dtype = None
    if dtype != "float32":  # the base as it would be published without the adapter
        rounded = copy.deepcopy(model).to(torch_dtype(dtype))
        base_in_dtype = logits_of(rounded)
        del rounded
    tuned = PeftModel.from_pretrained(model, adapter_dir)
    tuned.eval()
    tuned_logits = logits_of(tuned)
    merged = tuned.merge_and_unload()
    if dtype != "float32":
        merged = merged.to(torch_dtype(dtype))
    merged.eval()
    merged_logits = logits_of(merged)

    def mean_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return float(sum((x - y).abs().sum() for x, y in zip(a, b, strict=True)) / sum(x.numel() for x in a))

    effect = mean_abs(tuned_logits, base_logits)
    unchanged = all(
        torch.equal(m, b) for m, b in zip(merged_logits, base_in_dtype or base_logits, strict=True)
    )
    if effect == 0.0 or unchanged:
        raise MergeError(
            "the merged model's logits equal the base's on every probe: the adapter changed nothing "
            "(trained for too few steps, or with a learning rate too small to move it)"
            + (
                f", or nothing it changed survives rounding to {dtype}"
                if effect and dtype != "float32"
                else ""
            )
            + "; nothing was published"
        )
    merge_max = max(float((m - t).abs().max()) for m, t in zip(merged_logits, tuned_logits, strict=True))
    merge_mean = mean_abs(merged_logits, tuned_logits)
    if dtype == "float32" or tolerance is not None:
        allowed = tolerance if tolerance is not None else FLOAT32_TOLERANCE
        if merge_max > allowed:
            raise MergeError(
                f"the merged model's logits differ from base plus adapter by {merge_max:.4g} (allowed {allowed:.4g}) "
                f"in {dtype}; nothing was published. Publish in float32 (publish.dtype), or raise publish.merge_tolerance "
                "if the difference is expected for this dtype"
            )
    else:
        allowed = SIXTEEN_BIT_SHARE * effect
        if merge_mean > allowed:
            raise MergeError(
                f"in {dtype} the merged model's logits differ from base plus adapter (float32) by {merge_mean:.4g} on "
                f"average, more than half of the adapter's own effect on them ({effect:.4g}): rounding to {dtype} "
                "would wash out what training changed; nothing was published. Publish in float32 (publish.dtype), "
                "or set publish.merge_tolerance to accept it"
            )
    _stop_at_end_of_turn(merged, tokenizer)

    target = Path(models_dir) / version
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if load_tokenizer(tmp, trust_remote_code).chat_template != tokenizer.chat_template:
            raise MergeError(f"{target}: the saved chat template differs from the adapter's")
        shutil.copytree(adapter_dir, tmp / "adapter")
        (tmp / "README.md").write_text(model_card, encoding="utf-8")
        (tmp / RECORD).write_text(
            json.dumps({"version": version, "dtype": dtype, **(record or {})}, indent=2, sort_keys=True)
        )
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=merged.dtype, use_safetensors=True, device_map={"": str(merged.device)}
        )
        reloaded.eval()
        reload_diff = max(
            float((r - m).abs().max()) for r, m in zip(logits_of(reloaded), merged_logits, strict=True)
        )
        # saved and reloaded, the same weights give the same logits; a GPU's kernels may differ by
        # as much as the merge itself may
        if reload_diff > (allowed if dtype == "float32" or tolerance is not None else merge_max):
            raise MergeError(
                f"{target}: the saved model reloads with logits {reload_diff:.4g} away from the merged one"
            )
    _point_latest(Path(models_dir), version)
    return PublishResult(
        version=version,
        path=str(target),
        merge_max_abs_diff=merge_max,
        merge_tolerance=allowed,
        reload_max_abs_diff=reload_diff,
        merge_mean_abs_diff=merge_mean,
        adapter_effect=effect,
    )


def _stop_at_end_of_turn(model, tokenizer) -> None:
    """Make generation stop at the template's end-of-turn token as well as at eos."""
    _, eot_id = end_of_turn(tokenizer)
    config = model.generation_config
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stops = [t for t in stops if t is not None]
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
