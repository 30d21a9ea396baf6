"""Merge an adapter into a full-precision copy of its base and write a self-contained model folder.

The folder holds safetensors weights, the tokenizer with the chat template training used (taken
from the adapter), the generation config (stopping at the template's end-of-turn token),
the adapter on its own (under `adapter/`), and a model card (README.md). It is written to a
temporary folder and renamed into `<models_dir>/<version>/`; a `latest` file then names the
newest version (replaced in one rename), so a failed publish leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from loraflow.artifacts import atomic_dir, file_sha256
from loraflow.base_model import load_causal_lm, load_tokenizer
from loraflow.templates import end_of_turn

LATEST = "latest"


@dataclass(frozen=True)
class PublishResult:
    version: str
    path: str
    reload_max_abs_diff: float
    weights_changed: bool


def publish_version(adapter_dir: Path, base_model_hash: str, dtype: str) -> str:
    """Version of a merged model: hash of the adapter's files, the base and the dtype."""
    # the adapter's weights and config decide the merged weights; its training log does not
    files = [Path(adapter_dir) / name for name in ("adapter_model.safetensors", "adapter_config.json")]
    blob = ":".join([*(file_sha256(f) for f in files), base_model_hash, dtype]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def merge_adapter(
    base_model_dir: Path,
    adapter_dir: Path,
    models_dir: Path,
    version: str,
    dtype: str,
    model_card: str,
    trust_remote_code: bool = False,
) -> PublishResult:
    """Merge, save, reload and compare logits on a probe, then point `latest` at the new version."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # the adapter's tokenizer carries the chat template the adapter was trained with
    tokenizer = load_tokenizer(adapter_dir, trust_remote_code)
    base = load_causal_lm(base_model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    probe = tokenizer("Merged weights must match base plus adapter.", return_tensors="pt")["input_ids"].to(
        base.device
    )
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits

    _stop_at_end_of_turn(merged, tokenizer)

    target = Path(models_dir) / version
    with atomic_dir(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if load_tokenizer(tmp, trust_remote_code).chat_template != tokenizer.chat_template:
            raise RuntimeError(f"{target}: the saved chat template differs from the adapter's")
        shutil.copytree(adapter_dir, tmp / "adapter")
        (tmp / "README.md").write_text(model_card, encoding="utf-8")
        reloaded = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=merged.dtype, use_safetensors=True, device_map={"": str(merged.device)}
        )
        with torch.no_grad():
            reloaded_logits = reloaded(input_ids=probe).logits
    _point_latest(Path(models_dir), version)
    return PublishResult(
        version=version,
        path=str(target),
        reload_max_abs_diff=float((reloaded_logits - merged_logits).abs().max()),
        weights_changed=not torch.allclose(base_logits, merged_logits),
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
