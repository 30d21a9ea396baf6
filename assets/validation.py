"""`validated_examples`: the partition's rows that pass the quality rules; the rest are quarantined."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetRecordsFilter,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableSchema,
    asset,
)

from assets.automation import conditions
from assets.ingestion import PER_FILE, partition_source
from assets.keys import asset_key
from loraflow.base_model import load_tokenizer
from loraflow.expectations import run_suite
from loraflow.spec import PipelineSpec
from loraflow.validate import (
    PII_PATTERNS_PYTHON,
    SchemaError,
    classified_frame,
    partition_counts,
    quarantine_sample,
    record_schema,
    schema_drift,
    valid_sample,
    validate_partition,
    validated_fingerprint,
)
from resources import Warehouse


def _md_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def build_validated_examples(spec: PipelineSpec, partitions: DynamicPartitionsDefinition):
    key = asset_key(spec, "validated_examples")
    quality = spec.quality
    threshold = quality.max_invalid_fraction

    def validate(context: AssetExecutionContext, warehouse: Warehouse, tokenizer) -> MaterializeResult:
        partition = context.partition_key
        path, source = partition_source(spec, partition)
        previous = context.instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1).records
        previous_schema = None
        if previous and "record_schema" in previous[0].asset_materialization.metadata:
            previous_schema = previous[0].asset_materialization.metadata["record_schema"].value
        try:
            with warehouse.connect() as con:
                result = validate_partition(con, spec.name, partition, source, quality, tokenizer)
                frame = classified_frame(con)
                raw, valid, quarantined = partition_counts(con, spec.name, partition)
                rejected = quarantine_sample(con, spec.name, partition)
                accepted = valid_sample(con, spec.name, partition)
                fields = record_schema(con, spec.name, partition, quality.max_record_chars)
                version = validated_fingerprint(con, spec.name, partition)
        except SchemaError as err:
            raise Failure(description=f"{path}: {err}") from None
        suite = run_suite(frame, quality, PII_PATTERNS_PYTHON)
        fraction = result.invalid_fraction
        drift = schema_drift(previous_schema, fields)
        context.log.info(
            "%s (%s): %d raw = %d valid + %d quarantined", partition, result.schema, raw, valid, quarantined
        )
        over = fraction > threshold
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "detected_schema": result.schema,
                "raw_rows": raw,
                "valid_rows": valid,
                "quarantined_rows": quarantined,
                "invalid_fraction": fraction,
                **{f"quarantined_{reason}": count for reason, count in result.reasons.items() if count},
                "redacted_rows": result.redacted.get("rows", 0),
                "record_schema": fields,
                "dagster/column_schema": TableSchema(
                    columns=[TableColumn(name=name, type=kind) for name, kind in fields.items()]
                ),
                "sample": MetadataValue.md(
                    _md_table(("record", "example"), accepted) if accepted else "no rows"
                ),
                "quarantine_sample": MetadataValue.md(
                    _md_table(("record", "reason", "detail", "original"), rejected) if rejected else "nothing"
                ),
            },
            check_results=[
                AssetCheckResult(
                    check_name="counts_add_up",
                    passed=raw == valid + quarantined,
                    metadata={"raw_rows": raw, "valid_rows": valid, "quarantined_rows": quarantined},
                ),
                AssetCheckResult(
                    check_name="quality_suite",
                    passed=not over and suite.success,
                    severity=AssetCheckSeverity.ERROR,
                    metadata={
                        "invalid_fraction": fraction,
                        "threshold": threshold,
                        **{r: n for r, n in result.reasons.items() if n},
                        **suite.to_metadata(),
                    },
                    description=(
                        f"{path}: {quarantined} of {raw} rows ({fraction:.1%}) quarantined, over the limit of "
                        f"{threshold:.0%} (quality.max_invalid_fraction). See {spec.name}.quarantine for the "
                        "rows and reasons; fix the file or raise the limit"
                    )
                    if over
                    else (None if suite.success else f"failing expectations: {', '.join(suite.failing)}"),
                ),
                AssetCheckResult(
                    check_name="schema_drift",
                    passed=not drift,
                    severity=AssetCheckSeverity.WARN,
                    metadata={"record_schema": fields, **{k: ", ".join(v) for k, v in drift.items()}},
                    description=None
                    if not drift
                    else f"record keys differ from the previous materialization: {drift}",
                ),
            ],
        )

    common = dict(
        key=key,
        group_name=spec.name,
        kinds={"duckdb", "great_expectations"},
        partitions_def=partitions,
        deps=[asset_key(spec, "raw_examples")],
        code_version=spec.section_version("data", "quality"),
        automation_condition=conditions(spec)["validated_examples"],
        backfill_policy=PER_FILE,
        description="Rows of one source file normalized to chat messages (or a text) that pass the quality rules "
        f"(table `{spec.name}.validated_examples`); the others go to `{spec.name}.quarantine` with a reason code and "
        "the original record.",
        check_specs=[
            AssetCheckSpec(
                "counts_add_up",
                asset=key,
                blocking=True,
                description="Nothing is lost: raw rows = validated rows + quarantined rows.",
            ),
            AssetCheckSpec(
                "quality_suite",
                asset=key,
                blocking=True,
                description=f"The Great Expectations suite built from the quality rules passes; at most "
                f"{threshold:.0%} of the partition's rows quarantined (quality.max_invalid_fraction).",
            ),
            AssetCheckSpec(
                "schema_drift",
                asset=key,
                description="Warns when the records' keys or types differ from the previous materialization.",
            ),
        ],
    )
    if quality.max_tokens is None:

        @asset(**common)
        def validated_examples(context: AssetExecutionContext, warehouse: Warehouse) -> MaterializeResult:
            return validate(context, warehouse, None)

    else:

        @asset(**common, ins={"base_model": AssetIn(asset_key(spec, "base_model"))})
        def validated_examples(
            context: AssetExecutionContext, warehouse: Warehouse, base_model: dict
        ) -> MaterializeResult:
            return validate(context, warehouse, load_tokenizer(base_model.path, base_model.trust_remote_code))

    return validated_examples
