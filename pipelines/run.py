"""Materialize every asset of one pipeline through Dagster, from the command line.

    python -m pipelines.run demo

Registers one partition per source file (and retires the partitions of files that are gone),
runs raw_examples and validated_examples for each partition, then one run for everything
downstream. Runs are recorded in the Dagster instance at DAGSTER_HOME, so `make ui` shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dagster import DagsterInstance, materialize

from assets import PARTITIONED_STAGES, downstream_of_ingestion, pipeline_assets, source_partitions
from assets.keys import asset_key
from loraflow.sources import SourceChanges, diff_sources, scan_sources
from loraflow.spec import PipelineSpec, SpecError, load_spec
from loraflow.validate import drop_partition
from pipelines.deployment import deployment_resources
from pipelines.paths import PROJECT_ROOT, default_home, pipeline_file
from pipelines.sensors import last_validation


def sync_partitions(spec: PipelineSpec, instance: DagsterInstance, resources: dict) -> SourceChanges:
    """Add a partition for each new source file, remove those of deleted files (and their rows), and
    say which partitions need ingesting: new ones, those whose file content changed, and those
    validated under different data or quality rules."""
    name = source_partitions(spec).name
    files = scan_sources(spec)
    known = set(instance.get_dynamic_partitions(name))
    state = last_validation(instance, spec, sorted(known & set(files)))
    rules = spec.section_version("data", "quality")
    changes = diff_sources(
        files,
        known,
        ingested={k: v["sha256"] for k, v in state.items() if v["sha256"]},
        rules_changed={k for k, v in state.items() if v["code_version"] != rules},
    )
    if changes.added:
        instance.add_dynamic_partitions(name, changes.added)
    for key in changes.removed:
        instance.delete_dynamic_partition(name, key)
        with resources["warehouse"].connect() as con:
            drop_partition(con, spec.name, key)
    return changes


def run_pipeline(spec: PipelineSpec, instance: DagsterInstance, home: Path) -> dict:
    """Materialize the whole pipeline; returns {'success', 'published', 'evaluation'}."""
    assets = pipeline_assets(spec)
    resources = deployment_resources(home)
    changes = sync_partitions(spec, instance, resources)
    keys = list(spec.partitions())
    if not keys:
        raise SystemExit(f"pipeline {spec.name!r}: data.sources matches no files; nothing to do")
    print(
        f"[{spec.name}] {len(keys)} source file(s): {len(changes.added)} new, {len(changes.changed)} changed, "
        f"{len(changes.removed)} removed, {len(keys) - len(changes.to_ingest)} unchanged"
    )
    if spec.quality.max_tokens is not None and changes.to_ingest:
        # token limits are counted with the base model's tokenizer: validation needs it first
        materialize(assets, selection=[asset_key(spec, "base_model")], instance=instance, resources=resources)
    for key in changes.to_ingest:
        print(f"[{spec.name}] ingesting and validating {key}")
        result = materialize(
            assets,
            selection=[asset_key(spec, stage) for stage in PARTITIONED_STAGES],
            partition_key=key,
            instance=instance,
            resources=resources,
            raise_on_error=False,
            tags={"loraflow/pipeline": spec.name},
        )
        if not result.success:
            return {"success": False, "failed_at": f"partition {key}"}
    print(f"[{spec.name}] formatting, training, evaluating and publishing")
    result = materialize(
        assets,
        selection=downstream_of_ingestion(spec),
        instance=instance,
        resources=resources,
        raise_on_error=False,
        tags={"loraflow/pipeline": spec.name},
    )
    materialized = {tuple(m.asset_key.path) for m in result.get_asset_materialization_events()}
    manifests = home / "manifests" / spec.name
    evaluation = _read(manifests / "evaluation.json") if (spec.name, "evaluation") in materialized else None
    published = (
        _read(manifests / "published_model.json") if (spec.name, "published_model") in materialized else None
    )
    return {
        "success": result.success and published is not None,
        "evaluation": evaluation,
        "published": published,
        "run_id": result.run_id,
    }


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline", help="the pipeline's name: pipelines/defs/<name>/defs.yaml")
    args = parser.parse_args(argv)
    if "DAGSTER_HOME" not in os.environ:
        os.environ["DAGSTER_HOME"] = str(PROJECT_ROOT / ".dagster")
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        (dagster_home / "dagster.yaml").symlink_to(PROJECT_ROOT / "dagster.yaml")

    try:
        spec = load_spec(pipeline_file(args.pipeline))
    except SpecError as err:
        print(err, file=sys.stderr)
        return 2
    home = default_home()
    with DagsterInstance.get() as instance:
        outcome = run_pipeline(spec, instance, home)

    evaluation, published = outcome.get("evaluation"), outcome.get("published")
    if evaluation:
        print(f"\nEvaluation on {evaluation['examples']} held-out examples ({evaluation['report']}):\n")
        print(evaluation["table"])
    if published:
        print(f"\nPublished model: {published['path']}")
        print(f"Artifacts: {home}   Dagster runs: {dagster_home} (make ui to browse them)")
        return 0
    print(
        f"\nThe pipeline did not publish ({outcome.get('failed_at') or 'see the run log: a check or step failed'}).",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
