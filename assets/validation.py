"""`validated_examples`: the partition's rows that pass the quality rules; the rest are quarantined."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    DataVersion,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from loraflow.spec import PipelineSpec
from loraflow.validate import (
    REASONS,
    partition_counts,
    quarantine_sample,
    validate_partition,
    validated_fingerprint,
)
from resources import Warehouse


def build_validated_examples(spec: PipelineSpec, partitions: DynamicPartitionsDefinition):
    key = AssetKey([spec.name, "validated_examples"])
    threshold = spec.quality.max_invalid_fraction

    @asset(
        key=key,
        group_name=spec.name,
        kinds={"duckdb"},
        partitions_def=partitions,
        deps=[AssetKey([spec.name, "raw_examples"])],
        code_version=spec.section_version("data", "quality"),
        description="Rows of one source file that pass the quality rules (table <pipeline>.validated_examples); "
        "the others go to <pipeline>.quarantine with a reason code and the original line.",
        check_specs=[
            AssetCheckSpec(
                "counts_add_up",
                asset=key,
                blocking=True,
                description="Nothing is lost: raw rows = validated rows + quarantined rows.",
            ),
            AssetCheckSpec(
                "invalid_fraction",
                asset=key,
                blocking=True,
                description=f"At most {threshold:.0%} of the partition's rows quarantined "
                "(quality.max_invalid_fraction).",
            ),
        ],
    )
    def validated_examples(context: AssetExecutionContext, warehouse: Warehouse) -> MaterializeResult:
        partition = context.partition_key
        files = spec.partitions()
        if partition not in files:
            raise FileNotFoundError(
                f"partition {partition!r} of pipeline {spec.name!r}: no such source file any more"
            )
        _, source = files[partition]
        with warehouse.connect() as con:
            result = validate_partition(con, spec.name, partition, source, spec.quality)
            raw, valid, quarantined = partition_counts(con, spec.name, partition)
            sample = quarantine_sample(con, spec.name, partition)
            version = validated_fingerprint(con, spec.name, partition)
        rejected = "\n".join(f"| {line} | {reason} | `{record}` |" for line, reason, record in sample)
        fraction = result.invalid_fraction
        context.log.info("%s: %d raw = %d valid + %d quarantined", partition, raw, valid, quarantined)
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "raw_rows": raw,
                "valid_rows": valid,
                "quarantined_rows": quarantined,
                "invalid_fraction": fraction,
                **{f"quarantined_{reason}": count for reason, count in result.reasons.items() if count},
                "quarantine_sample": MetadataValue.md(
                    "| line | reason | record |\n|---|---|---|\n" + rejected
                    if sample
                    else "nothing quarantined"
                ),
            },
            check_results=[
                AssetCheckResult(
                    check_name="counts_add_up",
                    passed=raw == valid + quarantined,
                    metadata={"raw_rows": raw, "valid_rows": valid, "quarantined_rows": quarantined},
                ),
                AssetCheckResult(
                    check_name="invalid_fraction",
                    passed=fraction <= threshold,
                    severity=AssetCheckSeverity.ERROR,
                    metadata={
                        "invalid_fraction": fraction,
                        "threshold": threshold,
                        **{reason: result.reasons[reason] for reason in REASONS if result.reasons[reason]},
                    },
                    description=None
                    if fraction <= threshold
                    else f"{quarantined} of {raw} rows ({fraction:.1%}) quarantined, over the limit of "
                    f"{threshold:.0%}; see the quarantine table, fix the file or raise quality.max_invalid_fraction",
                ),
            ],
        )

    return validated_examples
