"""A pipeline's retraining: the job, the schedule that runs it only when something changed, and the
automation that formats new data.

    source files --sensor--> raw_examples + validated_examples (one run per new or changed file)
                 --automation (eager, once nothing upstream is in progress)--> training_dataset
    schedule.cron --retrain schedule, skipped when nothing changed--> base_model .. published_model

Training is never eager: a burst of new files becomes one ingestion run per file, one formatting
run once they are all in, and at most one training at the next scheduled tick.
"""

from dataclasses import dataclass

from dagster import (
    AssetKey,
    AssetSelection,
    AutomationConditionSensorDefinition,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    JobDefinition,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    define_asset_job,
    schedule,
)

from assets import PARTITIONED_STAGES, source_partitions
from assets.keys import asset_key
from assets.training_inputs import (
    FINGERPRINT_KEY,
    INPUTS_KEY,
    data_version_of,
    describe_changes,
    fingerprint,
    format_version,
    latest_materialization,
    training_inputs,
    training_version,
    validated_versions,
)
from loraflow.spec import PipelineSpec

RETRAIN_STAGES = ("base_model", "training_dataset", "adapter", "evaluation", "published_model", "hub_model")
UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]
INPUTS_TAG = "loraflow/training_inputs"


def retrain_job(spec: PipelineSpec) -> JobDefinition:
    """base_model -> training_dataset -> adapter -> evaluation -> published_model (-> hub_model),
    with their checks: the gate on evaluation stops publishing as it does anywhere else."""
    stages = [s for s in RETRAIN_STAGES if s != "hub_model" or spec.publish.hub_repo]
    return define_asset_job(
        name=f"{spec.name}__retrain",
        selection=AssetSelection.assets(*[asset_key(spec, s) for s in stages]),
        description=f"Retrain {spec.name!r} from its validated data: format, train, evaluate, and publish "
        "when the gate passes.",
    )


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    inputs: dict | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs) if self.inputs is not None else ""


def unfinished_runs(instance: DagsterInstance, keys: set[AssetKey]) -> list[str]:
    """Ids of queued or running runs that materialize any of `keys`."""
    records = instance.get_run_records(RunsFilter(statuses=UNFINISHED))
    return [
        r.dagster_run.run_id
        for r in records
        if r.dagster_run.asset_selection and keys & set(r.dagster_run.asset_selection)
    ]


def retrain_decision(instance: DagsterInstance, spec: PipelineSpec) -> RetrainDecision:
    """Whether the pipeline should retrain now, and why (or why not).

    Waits while files are being ingested (a burst of files trains once, after the last) or a
    training is queued or running; retrains when no adapter exists or when the validated data,
    the base model, or the `format` or `training` section differ from what the last adapter was
    trained on; otherwise skips."""
    name = spec.name
    ingesting = unfinished_runs(instance, {asset_key(name, stage) for stage in PARTITIONED_STAGES})
    if ingesting:
        return RetrainDecision(
            False,
            f"{len(ingesting)} ingestion run(s) queued or running ({', '.join(ingesting[:3])}); retraining "
            "waits for them, so that a burst of new files trains once",
        )
    training = unfinished_runs(instance, {asset_key(name, "adapter")})
    if training:
        return RetrainDecision(False, f"a training of {name!r} is already queued or running ({training[0]})")
    partitions = instance.get_dynamic_partitions(source_partitions(spec).name)
    validated = validated_versions(instance, spec, partitions)
    if not validated:
        return RetrainDecision(
            False, f"no source file of {name!r} has been validated yet: nothing to train on"
        )
    base = data_version_of(latest_materialization(instance, asset_key(name, "base_model")))
    now = training_inputs(
        validated, base, spec.section_version("base_model"), format_version(spec), training_version(spec)
    )
    last = latest_materialization(instance, asset_key(name, "adapter"))
    if last is None:
        return RetrainDecision(True, f"{name!r} has no adapter yet", now)
    recorded = last.metadata.get(FINGERPRINT_KEY)
    if recorded is not None and recorded.value == fingerprint(now):
        return RetrainDecision(
            False,
            f"nothing upstream of {name}/adapter changed since its last training: {len(validated)} "
            "source file(s) at the same data versions, the same base model, format and training settings",
        )
    detail = last.metadata.get(INPUTS_KEY)
    changes = describe_changes(detail.value, now) if detail is not None else []
    return RetrainDecision(
        True,
        "changed since the last training: " + ("; ".join(changes) or "its inputs were not recorded"),
        now,
    )


def build_retrain_schedule(spec: PipelineSpec, job: JobDefinition) -> ScheduleDefinition:
    settings = spec.schedule

    @schedule(
        name=f"{spec.name}__retrain_schedule",
        cron_schedule=settings.cron,
        execution_timezone=settings.timezone,
        job=job,
        default_status=DefaultScheduleStatus.RUNNING if settings.enabled else DefaultScheduleStatus.STOPPED,
        description=f"Retrains {spec.name!r} at `{settings.cron}` ({settings.timezone}) when its validated "
        "data, base model, format or training settings changed since the last training; skips otherwise.",
    )
    def retrain(context: ScheduleEvaluationContext):
        decision = retrain_decision(context.instance, spec)
        context.log.info("%s: %s", "retraining" if decision.retrain else "skipped", decision.reason)
        if not decision.retrain:
            return SkipReason(decision.reason)
        return RunRequest(tags={INPUTS_TAG: decision.fingerprint, "loraflow/reason": decision.reason[:255]})

    return retrain


def build_automation_sensor(spec: PipelineSpec) -> AutomationConditionSensorDefinition:
    """Evaluates the pipeline's automation conditions (validated_examples and training_dataset are
    eager; nothing else has one)."""
    return AutomationConditionSensorDefinition(
        name=f"{spec.name}__automation",
        target=AssetSelection.groups(spec.name),
        default_status=DefaultSensorStatus.RUNNING
        if spec.schedule.watch_files
        else DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=30,
        description="Re-validates a file after its raw rows change, and formats the training dataset once new "
        "validated data is in and nothing upstream is still running. Never trains.",
    )
