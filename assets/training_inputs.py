"""What a training depends on, as one fingerprint a schedule can compare.

An adapter is the product of: the data version of every source file's validated_examples
partition, the base model (its data version and its `base_model` section), and the `format` and
`training` sections (the code versions of training_dataset and adapter). training_dataset records
the partition versions it read and its format version in its manifest; adapter records the
fingerprint of all of them as metadata; the retrain schedule computes the same fingerprint from
what the instance holds now, and skips when the last adapter's is equal.
"""

import hashlib
import json

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from assets.keys import asset_key
from loraflow.spec import PipelineSpec

FINGERPRINT_KEY = "training_inputs"
INPUTS_KEY = "training_inputs_detail"
DATA_VERSION_TAG = "dagster/data_version"


def latest_materialization(instance: DagsterInstance, key: AssetKey, partition: str | None = None):
    """The newest materialization of an asset (or of one of its partitions), or None."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0].asset_materialization if records else None


def data_version_of(materialization) -> str | None:
    return (materialization.tags or {}).get(DATA_VERSION_TAG) if materialization else None


def validated_versions(
    instance: DagsterInstance, spec: PipelineSpec, partitions: list[str]
) -> dict[str, str]:
    """Partition -> data version of its newest validated_examples materialization, for those of
    `partitions` that were ever validated."""
    key = asset_key(spec, "validated_examples")
    versions = {}
    for partition in sorted(partitions):
        version = data_version_of(latest_materialization(instance, key, partition))
        if version is not None:
            versions[partition] = version
    return versions


def format_version(spec: PipelineSpec) -> str:
    """training_dataset's code version."""
    return spec.section_version("format")


def training_version(spec: PipelineSpec) -> str:
    """adapter's code version: the training section plus the format settings that shape batches."""
    batching = json.dumps([spec.format.packing, spec.format.max_seq_len])
    return hashlib.sha256((spec.section_version("training") + batching).encode()).hexdigest()[:16]


def training_inputs(
    validated: dict[str, str], base_model: str | None, base_model_section: str, format_: str, training: str
) -> dict:
    """Everything a training depends on, as plain data."""
    return {
        "validated": dict(sorted(validated.items())),
        "base_model": base_model,
        "base_model_section": base_model_section,
        "format": format_,
        "training": training,
    }


def fingerprint(inputs: dict) -> str:
    """One hash of a training's inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def describe_changes(before: dict, now: dict) -> list[str]:
    """What differs between two trainings' inputs, in words."""
    old, new = before.get("validated", {}), now.get("validated", {})
    changes = []
    for label, keys in (
        ("new source file(s)", sorted(new.keys() - old.keys())),
        ("source file(s) gone", sorted(old.keys() - new.keys())),
        (
            "source file(s) with new validated data",
            sorted(k for k in new.keys() & old.keys() if new[k] != old[k]),
        ),
    ):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            changes.append(f"{len(keys)} {label}: {shown}")
    if before.get("base_model") != now.get("base_model") or before.get("base_model_section") != now.get(
        "base_model_section"
    ):
        changes.append("the base model")
    for section in ("format", "training"):
        if before.get(section) != now.get(section):
            changes.append(f"the `{section}` section")
    return changes
