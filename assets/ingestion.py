"""`raw_examples`: one dynamic partition per source file, every record stored with where it came from."""

from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    asset,
)

from assets.keys import asset_key
from loraflow.ingest import IngestError, ingest_file
from loraflow.spec import PipelineSpec
from resources import Warehouse

# One run per source file in a backfill: a file that fails (bad rows, over the quarantine limit)
# fails its own run and no other, and its run's log and checks are about that file only.
PER_FILE = BackfillPolicy.multi_run(max_partitions_per_run=1)


def source_partitions(spec: PipelineSpec) -> DynamicPartitionsDefinition:
    """The pipeline's partitions: one per source file, keyed by its path."""
    return DynamicPartitionsDefinition(name=f"{spec.name}__source_files")


def partition_source(spec: PipelineSpec, partition: str):
    """(file, source spec) of a partition, or a Failure that says the file is gone."""
    files = spec.partitions()
    if partition not in files:
        raise Failure(
            description=f"partition {partition!r} of pipeline {spec.name!r}: no such source file any more "
            f"(data.sources matches: {', '.join(files) or 'nothing'}). The source-file sensor removes "
            "partitions of deleted files."
        )
    return files[partition]


def build_raw_examples(spec: PipelineSpec, partitions: DynamicPartitionsDefinition):
    @asset(
        key=asset_key(spec, "raw_examples"),
        group_name=spec.name,
        kinds={"duckdb"},
        partitions_def=partitions,
        backfill_policy=PER_FILE,
        code_version=spec.section_version("data"),
        description="Every record of one source file (JSON Lines, JSON array, CSV or Parquet), untouched, with "
        f"its file, record index and the file's sha256. Table `{spec.name}.raw_examples` in the warehouse.",
    )
    def raw_examples(context: AssetExecutionContext, warehouse: Warehouse) -> MaterializeResult:
        key = context.partition_key
        path, source = partition_source(spec, key)
        try:
            with warehouse.connect() as con:
                result = ingest_file(con, spec.name, key, path, source)
        except IngestError as err:
            raise Failure(description=str(err)) from None
        context.log.info(
            "%s (%s): %d records, %d rows (%d blank lines skipped)",
            key,
            result.file_type,
            result.records,
            result.rows,
            result.blank_lines,
        )
        return MaterializeResult(
            data_version=DataVersion(result.file_sha256),
            metadata={
                "source_file": result.source_file,
                "file_sha256": result.file_sha256,
                "file_type": result.file_type,
                "records": result.records,
                "rows": result.rows,
                "blank_lines": result.blank_lines,
            },
        )

    return raw_examples
