"""A pipeline's asset keys, from one place: `<pipeline>/<stage>`.

base_model ─────────────────────────────────────────────┐
raw_examples (partition per file) -> validated_examples  │
    -> training_dataset -> adapter (pool "gpu") -> evaluation (gate) -> published_model [-> hub_model]
"""

from __future__ import annotations

from dagster import AssetKey

from loraflow.spec import PipelineSpec

PARTITIONED_STAGES = ("raw_examples", "validated_examples")
"""One partition per source file; materialized per file (the sensor, a backfill)."""

STAGES = ("base_model", *PARTITIONED_STAGES, "training_dataset", "adapter", "evaluation", "published_model")
"""Every pipeline's stages, upstream first."""

HUB_STAGE = "hub_model"
"""Only for pipelines with `publish.hub_repo`."""


def stages_of(spec: PipelineSpec) -> tuple[str, ...]:
    """The stages this pipeline has: every one in STAGES, and hub_model when it publishes there."""
    return STAGES + ((HUB_STAGE,) if spec.publish.hub_repo else ())


def asset_key(spec: PipelineSpec | str, stage: str) -> AssetKey:
    """The asset key of one stage of a pipeline (given as its spec or its name)."""
    name = spec if isinstance(spec, str) else spec.name
    return AssetKey([name, stage])


def keys(spec: PipelineSpec, stages: tuple[str, ...] | list[str] | None = None) -> list[AssetKey]:
    """The asset keys of `stages` (default: all the pipeline has), upstream first."""
    return [asset_key(spec, stage) for stage in (stages_of(spec) if stages is None else stages)]


def downstream_of_ingestion(spec: PipelineSpec) -> list[AssetKey]:
    """Everything a pipeline materializes after its files are ingested and validated."""
    return keys(spec, [s for s in stages_of(spec) if s not in PARTITIONED_STAGES])
