"""`raw_examples`: one dynamic partition per source file, every line stored with where it came from."""

from dagster import (
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    DynamicPartitionsDefinition,
    MaterializeResult,
    asset,
)

from loraflow.ingest import ingest_jsonl
from loraflow.spec import PipelineSpec
from resources import Warehouse


def source_partitions(spec: PipelineSpec) -> DynamicPartitionsDefinition:
    """The pipeline's partitions: one per source file, keyed by its path."""
    return DynamicPartitionsDefinition(name=f"{spec.name}__source_files")


def build_raw_examples(spec: PipelineSpec, partitions: DynamicPartitionsDefinition):
    @asset(
        key=AssetKey([spec.name, "raw_examples"]),
        group_name=spec.name,
        kinds={"duckdb"},
        partitions_def=partitions,
        code_version=spec.section_version("data"),
        description="Every non-blank line of one source file, untouched, with its file, line number and "
        "the file's sha256. Table <pipeline>.raw_examples in the warehouse.",
    )
    def raw_examples(context: AssetExecutionContext, warehouse: Warehouse) -> MaterializeResult:
        files = spec.partitions()
        key = context.partition_key
        if key not in files:
            raise FileNotFoundError(
                f"partition {key!r} of pipeline {spec.name!r}: no such source file any more "
                f"(data.sources matches: {', '.join(files) or 'nothing'})"
            )
        path, _ = files[key]
        with warehouse.connect() as con:
            result = ingest_jsonl(con, spec.name, key, path)
        context.log.info("%s: %d rows (%d blank lines skipped)", key, result.rows, result.blank_lines)
        return MaterializeResult(
            data_version=DataVersion(result.file_sha256),
            metadata={
                "source_file": result.source_file,
                "file_sha256": result.file_sha256,
                "rows": result.rows,
                "blank_lines": result.blank_lines,
            },
        )

    return raw_examples
