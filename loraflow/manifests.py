"""The contracts between stages: what each asset hands the next, as typed, checked manifests.

A manifest is small (paths, versions, counts); the heavy artifacts it points at stay in the
artifact store. Each is stored as JSON (`.loraflow/manifests/<pipeline>/<asset>.json`) and read
back into its model, so a stage reads `base_model.path`, not `base_model["path"]`, and a manifest
missing a field or holding a wrong type fails when it is read, naming the field, instead of a
default standing in for it. `metadata()` is each one's view for the Dagster UI: plain values.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Manifest(BaseModel):
    """Base of every manifest: unknown fields are errors, values are frozen once written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def metadata(self) -> dict[str, Any]:
        """The manifest's figures for an asset's metadata: every scalar field (nested values stay out)."""
        return {
            k: v for k, v in self.model_dump(mode="json").items() if isinstance(v, str | int | float | bool)
        }


class BaseModelManifest(Manifest):
    """`base_model`: the model to fine-tune as a local Hugging Face folder."""

    source: str
    """What the spec named: the built-in name, a folder or a hub id."""
    kind: str
    """How it was found: builtin, local or hub."""
    path: str
    """The local folder of safetensors, config and tokenizer."""
    content_hash: str
    """sha256 over the weight, config and tokenizer files: the base's identity."""
    trust_remote_code: bool
    """Whether its own Python code may run (from the spec)."""


class DatasetManifest(Manifest):
    """`training_dataset`: the tokenized train and eval splits, with their counts."""

    version: str
    """Content hash of examples, splits, tokenizer, template and format settings."""
    path: str
    """The dataset folder (train/eval Parquet, the chat template, the summary)."""
    chat_template_source: str
    """Where the chat template came from (the tokenizer's, a built-in name, a file)."""
    end_of_turn: str
    """The token that ends an assistant turn, trained so the model learns to stop."""
    train_examples: int
    eval_examples: int
    truncated: int
    dropped_too_long: int
    dropped_untrainable_after_truncation: int
    duplicates_dropped: int
    train_tokens: int
    trainable_tokens: int
    examples_without_trained_tokens: int
    examples_without_trained_end: int
    token_percentiles: dict[str, int]
    mean_tokens: float
    packing_efficiency: float
    reused: bool
    preference_pairs: int = 0
    """Examples that are chosen/rejected pairs (what dpo and orpo train on)."""


class AdapterManifest(Manifest):
    """`adapter`: the trained LoRA/QLoRA weights."""

    version: str
    """Content hash of the dataset version, the base, the training settings and resolved dtypes."""
    path: str
    """The adapter folder (PEFT safetensors, config, tokenizer, training summary)."""
    weights_sha256: str
    """sha256 over the adapter's safetensors files."""
    dataset_version: str
    steps: int
    final_loss: float | None
    """Training loss at the last logged step."""
    packing_efficiency: float | None = None
    final_training_eval_loss: float | None = None
    """Training's own eval loss (the first 256 eval rows) at the last evaluation."""
    best_training_eval_loss: float | None = None


class EvaluationManifest(Manifest):
    """`evaluation`: base and tuned side by side, and the gate's verdict."""

    adapter_version: str
    examples: int
    base: dict[str, float | None]
    """The base model's metrics (eval_loss, perplexity, exact_match, token_f1, rouge_l, format_match)."""
    tuned: dict[str, float | None]
    published: dict[str, float | None] | None = None
    """The currently published version's metrics, when the gate compares with it."""
    forgetting_ratio: float | None = None
    gate: dict[str, Any]
    """passed, the figures the rules compared and the failures in words."""
    table: str
    """The metrics as a Markdown table."""
    report: str
    """Path of the evaluation report (Markdown)."""


class PublishedManifest(Manifest):
    """`published_model`: the merged model folder."""

    version: str
    path: str
    adapter_version: str


class HubManifest(Manifest):
    """`hub_model`: the commit that uploaded a published version."""

    version: str
    repo_id: str
    repo_url: str
    commit: str


MANIFESTS: dict[str, type[Manifest]] = {
    "base_model": BaseModelManifest,
    "training_dataset": DatasetManifest,
    "adapter": AdapterManifest,
    "evaluation": EvaluationManifest,
    "published_model": PublishedManifest,
    "hub_model": HubManifest,
}
"""The manifest of each stage that hands one on (raw and validated examples live in the warehouse)."""
