"""A pipeline's automation: the sensors that evaluate its assets' automation conditions, and the
retrain job for a retraining started by hand.

    source files --sensor (pipelines/sensors.py)--> raw_examples + validated_examples, per file
    <name>__automation   validated_examples, training_dataset   (schedule.watch_files)
    <name>__retrain      base_model, adapter on schedule.cron when an input changed,
                         evaluation and publishing after it     (schedule.enabled)

The conditions themselves are in `assets/automation.py`; whether a retrain is due is Dagster's
decision from data and code versions, shown per tick on each asset's Automation tab.
"""

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    JobDefinition,
    define_asset_job,
)

from assets.keys import asset_key, keys, stages_of
from loraflow.spec import PipelineSpec

DATA_STAGES = ("validated_examples", "training_dataset")
"""Formatted as soon as new data is in (the data-side sensor)."""

MODEL_STAGES = ("base_model", "adapter", "evaluation", "published_model", "hub_model")
"""Trained on the cron, evaluated and published after it (the retrain sensor)."""


def retrain_job(spec: PipelineSpec) -> JobDefinition:
    """base_model -> training_dataset -> adapter -> evaluation -> published_model (-> hub_model), with
    their checks: the gate on evaluation stops publishing as it does anywhere else."""
    stages = [s for s in stages_of(spec) if s not in ("raw_examples", "validated_examples")]
    return define_asset_job(
        name=f"{spec.name}__retrain",
        selection=AssetSelection.assets(*keys(spec, stages)),
        description=f"Retrain {spec.name!r} now from its validated data: format, train, evaluate, and publish "
        "when the gate passes.",
    )


def automation_sensors(spec: PipelineSpec) -> list[AutomationConditionSensorDefinition]:
    """The data-side sensor (runs when schedule.watch_files) and the retrain sensor (runs when
    schedule.cron is set and schedule.enabled)."""
    model_stages = [s for s in MODEL_STAGES if s in stages_of(spec)]
    retrains = spec.schedule.cron is not None and spec.schedule.enabled
    cron = (
        f"at `{spec.schedule.cron}` ({spec.schedule.timezone})" if spec.schedule.cron else "never on its own"
    )
    return [
        AutomationConditionSensorDefinition(
            name=f"{spec.name}__automation",
            target=AssetSelection.assets(*[asset_key(spec, s) for s in DATA_STAGES]),
            default_status=DefaultSensorStatus.RUNNING
            if spec.schedule.watch_files
            else DefaultSensorStatus.STOPPED,
            minimum_interval_seconds=30,
            description="Re-validates a file after its raw rows change, and formats the training dataset once "
            "new validated data is in, nothing upstream is still running and every blocking check passed.",
        ),
        AutomationConditionSensorDefinition(
            name=f"{spec.name}__retrain",
            target=AssetSelection.assets(*[asset_key(spec, s) for s in model_stages]),
            default_status=DefaultSensorStatus.RUNNING if retrains else DefaultSensorStatus.STOPPED,
            minimum_interval_seconds=30,
            description=f"Trains {cron} when the validated data, the base model or the training settings changed "
            "since the last training (skips otherwise), then evaluates and publishes when the gate passes; "
            "prepares the base model when it is missing or its section changed.",
        ),
    ]
