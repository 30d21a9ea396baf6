"""`training_dataset`: every validated example formatted as chat, tokenized with a loss mask, split."""

from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from loraflow.base_model import load_tokenizer
from loraflow.dataset import build_dataset, load_split, sample_view, select_examples
from loraflow.spec import PipelineSpec
from loraflow.validate import partitions_over_limit
from resources import ArtifactStore, Warehouse


def build_training_dataset(spec: PipelineSpec):
    key = AssetKey([spec.name, "training_dataset"])

    @asset(
        key=key,
        group_name=spec.name,
        kinds={"parquet"},
        deps=[AssetKey([spec.name, "validated_examples"])],
        ins={"base_model": AssetIn(AssetKey([spec.name, "base_model"]))},
        code_version=spec.section_version("format"),
        description="Validated examples of all source files rendered with the chat template, tokenized with "
        "only assistant tokens trained, and split train/eval by content hash. Parquet in the artifact store.",
        check_specs=[
            AssetCheckSpec(
                "every_example_trains",
                asset=key,
                blocking=True,
                description="Every example has at least one trained token, and both splits are non-empty.",
            )
        ],
    )
    def training_dataset(
        context: AssetExecutionContext, base_model: dict, warehouse: Warehouse, store: ArtifactStore
    ) -> Output[dict]:
        with warehouse.connect() as con:
            rejected = partitions_over_limit(con, spec.name, spec.quality.max_invalid_fraction)
            rows, duplicates = select_examples(con, spec.name)
        if rejected:
            # the blocking data check stops its own run; this keeps a later run from training on the file
            listing = ", ".join(f"{p} ({bad} of {n} rows quarantined)" for p, bad, n in rejected)
            raise Failure(
                description=f"source files over quality.max_invalid_fraction "
                f"({spec.quality.max_invalid_fraction:.0%}): {listing}. Fix or remove them, or raise the limit"
            )
        if not rows:
            raise ValueError(
                f"pipeline {spec.name!r} has no validated examples: materialize raw_examples and "
                "validated_examples for its source files first"
            )
        tokenizer = load_tokenizer(Path(base_model["path"]), base_model["trust_remote_code"])
        summary = build_dataset(
            rows,
            tokenizer,
            spec.format,
            base_model["content_hash"],
            store.path("datasets", spec.name),
            duplicates,
        )
        context.log.info(
            "dataset %s%s: %d train, %d eval",
            summary.version,
            " (reused)" if summary.reused else "",
            summary.train_examples,
            summary.eval_examples,
        )
        train = load_split(Path(summary.path), "train")
        untrained = sum(1 for row in train if row["trainable_tokens"] == 0)
        views = "\n\n".join(f"```\n{sample_view(tokenizer, row)}\n```" for row in train[:2])
        yield Output(
            summary.to_json(),
            data_version=DataVersion(summary.version),
            metadata={
                "path": MetadataValue.path(summary.path),
                "train_examples": summary.train_examples,
                "eval_examples": summary.eval_examples,
                "dropped_too_long": summary.dropped_too_long,
                "duplicates_dropped": summary.duplicates_dropped,
                "train_tokens": summary.train_tokens,
                "trainable_tokens": summary.trainable_tokens,
                "max_tokens": summary.max_tokens,
                "mean_tokens": summary.mean_tokens,
                "reused": summary.reused,
                "samples (trained text in [[ ]])": MetadataValue.md(views),
            },
        )
        yield AssetCheckResult(
            check_name="every_example_trains",
            passed=untrained == 0 and summary.train_examples > 0 and summary.eval_examples > 0,
            metadata={
                "examples_without_trained_tokens": untrained,
                "train": summary.train_examples,
                "eval": summary.eval_examples,
            },
        )

    return training_dataset
