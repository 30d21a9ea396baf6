"""`training_dataset`: every validated example formatted as chat, tokenized with a loss mask, split."""

from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from assets.automation import conditions
from assets.keys import asset_key
from loraflow.base_model import load_tokenizer, tokenizer_hash
from loraflow.dataset import (
    DatasetError,
    DatasetSummary,
    build_dataset,
    load_split,
    sample_view,
    select_examples,
    template_round_trip,
)
from loraflow.manifests import BaseModelManifest, DatasetManifest
from loraflow.spec import PipelineSpec
from loraflow.templates import TemplateError, resolve_template
from loraflow.validate import partitions_not_adding_up, partitions_over_limit
from resources import ArtifactStore, Warehouse

LENGTH_WARN_FRACTION = 0.05
"""token_lengths warns when more than this share of examples was truncated or dropped for length."""
SAMPLES_SHOWN = 3


def debug_view(tokenizer, rows: list[dict], n: int = SAMPLES_SHOWN) -> str:
    """Markdown: a few examples as rendered for training, trained spans in [[ ]]."""
    parts = [
        f"**{row['source_file']}** record {row['record_index']}: {row['num_tokens']} tokens, "
        f"{row['trainable_tokens']} trained{' (truncated)' if row['truncated'] else ''}\n\n"
        f"```\n{sample_view(tokenizer, row)}\n```"
        for row in rows[:n]
    ]
    return "Trained tokens are inside [[ ]]; everything else is context only.\n\n" + "\n\n".join(parts)


def dataset_checks(summary: DatasetSummary, mismatched: list[str], total: int) -> list[AssetCheckResult]:
    """The four checks on a stored dataset (computed from its summary and a re-rendered sample)."""
    dropped = summary.dropped_too_long + summary.dropped_untrainable_after_truncation
    affected = dropped + summary.truncated
    return [
        AssetCheckResult(
            check_name="every_example_trains",
            passed=summary.examples_without_trained_tokens == 0
            and summary.train_examples > 0
            and summary.eval_examples > 0,
            metadata={
                "examples_without_trained_tokens": summary.examples_without_trained_tokens,
                "train": summary.train_examples,
                "eval": summary.eval_examples,
            },
        ),
        AssetCheckResult(
            check_name="end_of_turn_trained",
            passed=summary.examples_without_trained_end == 0 and bool(summary.end_of_turn.strip()),
            metadata={
                "end_of_turn": repr(summary.end_of_turn),
                "examples_without_trained_end": summary.examples_without_trained_end,
                "fix": "a template must end each assistant turn with a token, and that token must be trained; "
                "set format.chat_template to one that does (e.g. chatml or zephyr)",
            },
        ),
        AssetCheckResult(
            check_name="template_round_trip",
            passed=not mismatched,
            metadata={
                "template": summary.chat_template_source,
                "mismatched_examples": len(mismatched),
                "first_mismatch": mismatched[0] if mismatched else "",
            },
        ),
        AssetCheckResult(
            check_name="token_lengths",
            passed=total == 0 or affected / total <= LENGTH_WARN_FRACTION,
            severity=AssetCheckSeverity.WARN,
            metadata={
                **{f"tokens_{k}": v for k, v in summary.token_percentiles.items()},
                "train_tokens": summary.train_tokens,
                "trainable_tokens": summary.trainable_tokens,
                "truncated": summary.truncated,
                "dropped_for_length": dropped,
            },
        ),
    ]


def build_training_dataset(spec: PipelineSpec):
    key = asset_key(spec, "training_dataset")

    def check(name: str, description: str, blocking: bool = True) -> AssetCheckSpec:
        return AssetCheckSpec(name, asset=key, blocking=blocking, description=description)

    @asset(
        key=key,
        group_name=spec.name,
        kinds={"parquet"},
        deps=[asset_key(spec, "validated_examples")],
        ins={"base_model": AssetIn(asset_key(spec, "base_model"))},
        code_version=spec.section_version("format"),
        automation_condition=conditions(spec)["training_dataset"],
        description="Validated examples of all source files rendered with the chat template, tokenized with "
        "only assistant tokens trained, and split train/eval by content hash. Parquet in the artifact store.",
        check_specs=[
            check("every_example_trains", "Every example has a trained token; both splits are non-empty."),
            check(
                "end_of_turn_trained",
                "Every assistant turn's end-of-turn token is trained, so the model learns to stop.",
            ),
            check(
                "template_round_trip",
                "The stored chat template, on a fresh tokenizer, renders a sample exactly as training saw it.",
            ),
            check(
                "token_lengths",
                f"Token-length percentiles; warns when over {LENGTH_WARN_FRACTION:.0%} of examples exceed "
                "format.max_seq_len.",
                blocking=False,
            ),
        ],
    )
    def training_dataset(
        context: AssetExecutionContext,
        base_model: BaseModelManifest,
        warehouse: Warehouse,
        store: ArtifactStore,
    ) -> Output[DatasetManifest]:
        with warehouse.connect() as con:
            rejected = partitions_over_limit(con, spec.name, spec.quality.max_invalid_fraction)
            lossy = partitions_not_adding_up(con, spec.name)
            rows, duplicates = select_examples(con, spec.name)
        if lossy:
            # counts_add_up failed on these and stopped its own run; this keeps a later run from training
            listing = ", ".join(
                f"{p} ({raw} raw, {valid} valid + {bad} quarantined)" for p, raw, valid, bad in lossy
            )
            raise Failure(
                description=f"source files whose rows do not add up (raw = valid + quarantined): {listing}. "
                "Re-materialize their raw_examples and validated_examples partitions"
            )
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
        base_dir = Path(base_model.path)
        tokenizer = load_tokenizer(base_dir, base_model.trust_remote_code)
        try:
            template, template_source = resolve_template(spec.format.chat_template, tokenizer, spec.root)
            summary = build_dataset(
                rows,
                tokenizer,
                spec.format,
                template,
                tokenizer_hash(base_dir),
                store.path("datasets", spec.name),
                duplicates,
                roles={key: source.split for key, (_, source) in spec.partitions().items()},
                template_source=template_source,
            )
        except (TemplateError, DatasetError) as err:
            raise Failure(description=f"pipeline {spec.name!r}: {err}") from None
        context.log.info(
            "dataset %s%s: %d train, %d eval, template %s",
            summary.version,
            " (reused)" if summary.reused else "",
            summary.train_examples,
            summary.eval_examples,
            summary.chat_template_source,
        )
        # a fresh tokenizer, so nothing set on the one that built the dataset can hide a difference
        fresh = load_tokenizer(base_dir, base_model.trust_remote_code)
        mismatched = template_round_trip(fresh, Path(summary.path), spec.format)
        train = load_split(Path(summary.path), "train")
        yield Output(
            DatasetManifest(**summary.to_json()),
            data_version=DataVersion(summary.version),
            metadata={
                "path": MetadataValue.path(summary.path),
                "chat_template": summary.chat_template_source,
                "end_of_turn": repr(summary.end_of_turn),
                "train_examples": summary.train_examples,
                "eval_examples": summary.eval_examples,
                "truncated": summary.truncated,
                "dropped_too_long": summary.dropped_too_long,
                "dropped_untrainable_after_truncation": summary.dropped_untrainable_after_truncation,
                "duplicates_dropped": summary.duplicates_dropped,
                "train_tokens": summary.train_tokens,
                "trainable_tokens": summary.trainable_tokens,
                **{f"tokens_{k}": v for k, v in summary.token_percentiles.items()},
                "mean_tokens": summary.mean_tokens,
                "packing_efficiency": summary.packing_efficiency,
                "reused": summary.reused,
                "samples": MetadataValue.md(debug_view(fresh, train)),
            },
        )
        yield from dataset_checks(summary, mismatched, len(rows))

    return training_dataset
