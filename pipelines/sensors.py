"""The source-file sensor of a pipeline: new, changed and deleted files become partition changes and runs."""

import json

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from assets.keys import asset_key
from loraflow.sources import diff_sources, hash_cache, scan_sources
from loraflow.spec import PipelineSpec
from loraflow.validate import drop_partition
from resources import Warehouse


def _latest(instance: DagsterInstance, key: AssetKey, partition: str):
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    )
    return records.records[0].asset_materialization if records.records else None


def last_validation(instance: DagsterInstance, spec: PipelineSpec, partitions: list[str]) -> dict[str, dict]:
    """Per partition that was ingested and validated: the file sha256 it was ingested from (`sha256`)
    and the code version of the rules it was validated with (`code_version`)."""
    raw, validated = asset_key(spec, "raw_examples"), asset_key(spec, "validated_examples")
    state = {}
    for partition in partitions:
        ingested, checked = _latest(instance, raw, partition), _latest(instance, validated, partition)
        if ingested is None or checked is None or "file_sha256" not in ingested.metadata:
            continue
        state[partition] = {
            "sha256": ingested.metadata["file_sha256"].value,
            "code_version": (checked.tags or {}).get("dagster/code_version"),
        }
    return state


def ingested_hashes(instance: DagsterInstance, spec: PipelineSpec, partitions: list[str]) -> dict[str, str]:
    """The file sha256 each partition was last ingested and validated from (a partition whose
    validation never succeeded has none, so it counts as changed)."""
    return {k: v["sha256"] for k, v in last_validation(instance, spec, partitions).items() if v["sha256"]}


def build_source_sensor(spec: PipelineSpec, partitions: DynamicPartitionsDefinition) -> SensorDefinition:
    @sensor(
        name=f"{spec.name}__source_files",
        asset_selection=[asset_key(spec, "raw_examples"), asset_key(spec, "validated_examples")],
        default_status=DefaultSensorStatus.RUNNING
        if spec.schedule.watch_files
        else DefaultSensorStatus.STOPPED,
        minimum_interval_seconds=30,
        description=f"Watches {', '.join(s.path for s in spec.data.sources)}: adds a partition per new file, "
        "re-ingests a file whose content changed, and removes the partition and rows of a deleted file.",
    )
    def source_files(context: SensorEvaluationContext, warehouse: Warehouse) -> SensorResult:
        cache = json.loads(context.cursor) if context.cursor else {}
        files = scan_sources(spec, cache)
        known = set(context.instance.get_dynamic_partitions(partitions.name))
        changes = diff_sources(
            files, known, ingested_hashes(context.instance, spec, sorted(known & set(files)))
        )
        if changes.removed:
            with warehouse.connect() as con:
                for partition in changes.removed:
                    drop_partition(con, spec.name, partition)
        for kind in ("added", "changed", "removed"):
            if getattr(changes, kind):
                context.log.info("%s: %s", kind, ", ".join(getattr(changes, kind)))
        requests = []
        if changes.added:
            requests.append(partitions.build_add_request(changes.added))
        if changes.removed:
            requests.append(partitions.build_delete_request(changes.removed))
        return SensorResult(
            run_requests=[
                RunRequest(partition_key=key, run_key=f"{key}@{files[key].sha256}")
                for key in changes.to_ingest
            ],
            dynamic_partitions_requests=requests,
            cursor=json.dumps(hash_cache(files), sort_keys=True),
        )

    return source_files
