"""The model card (README.md) of a published model: what it is and exactly what made it."""

from __future__ import annotations

import json
import platform
from importlib import metadata

LIBRARIES = ("loraflow", "torch", "transformers", "peft", "bitsandbytes", "dagster", "duckdb")


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
) -> str:
    """Markdown with a YAML metadata header and the lineage of the weights: every input by hash."""
    source_lines = "\n".join(
        f"| {s['file']} | `{s['sha256']}` | {s['valid']} | {s['quarantined']} |" for s in sources
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

## Lineage

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
