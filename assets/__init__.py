"""Dagster asset factories, one module per stage. Thin: read inputs, call loraflow, report metadata.

base_model ─────────────────────────────────────────────┐
raw_examples (partition per file) -> validated_examples  │
    -> training_dataset -> adapter (pool "gpu") -> evaluation (gate) -> published_model [-> hub_model]
"""

import warnings

from dagster import AssetsDefinition, AssetSpec, BetaWarning
from transformers.utils import logging as transformers_logging

from assets.base_model import build_base_model
from assets.dataset import build_training_dataset
from assets.evaluation import build_evaluation
from assets.ingestion import build_raw_examples, source_partitions
from assets.keys import PARTITIONED_STAGES, STAGES, asset_key, downstream_of_ingestion, keys, stages_of
from assets.publish import build_hub_model, build_published_model
from assets.training import build_adapter
from assets.validation import build_validated_examples
from loraflow.spec import PipelineSpec

# Content-addressed data versions are the point of these assets; the beta notice on every run is noise.
warnings.filterwarnings("ignore", message=r"Parameter `data_version`", category=BetaWarning)
# One run per source file in a backfill is what per-file partitions need; the beta notice is noise too.
warnings.filterwarnings("ignore", message=r"Parameter `backfill_policy`", category=BetaWarning)
# Per-tensor loading bars are unreadable in a run's log; progress is logged with rates instead.
transformers_logging.disable_progress_bar()


def pipeline_assets(spec: PipelineSpec) -> list[AssetsDefinition]:
    """Every asset of one pipeline, keyed `<pipeline>/<stage>`, in one group named after it."""
    partitions = source_partitions(spec)
    built = [
        build_base_model(spec),
        build_raw_examples(spec, partitions),
        build_validated_examples(spec, partitions),
        build_training_dataset(spec),
        build_adapter(spec),
        build_evaluation(spec),
        build_published_model(spec),
        *([build_hub_model(spec)] if spec.publish.hub_repo else []),
    ]
    # each description ends with when the asset materializes on its own, so the UI and `dg list defs` say it
    return [asset.map_asset_specs(with_automation_note) for asset in built]


def with_automation_note(asset_spec: AssetSpec) -> AssetSpec:
    condition = asset_spec.automation_condition
    if condition is not None:
        note = f"Automation: {condition.get_label() or condition.name}."
    elif asset_spec.key.path[-1] == "raw_examples":
        note = "Automation: the source-file sensor, one run per new or changed file."
    else:
        note = "Automation: none; materialized by hand."
    return asset_spec.replace_attributes(description=f"{asset_spec.description or ''} {note}".strip())


__all__ = [
    "PARTITIONED_STAGES",
    "STAGES",
    "asset_key",
    "downstream_of_ingestion",
    "keys",
    "pipeline_assets",
    "source_partitions",
    "stages_of",
]
