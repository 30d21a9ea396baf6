"""A backfill after a change to the quality rules: launched from the command line through the webserver
(the request the UI sends), run by the daemon of a real `dagster dev`, one run per source file, and
every file re-validated under the new rules before the dataset is formatted once."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import write_yaml
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance, DagsterRunStatus, RunsFilter, materialize
from ui_browser import ARTIFACTS, REPO, DagsterDev

from assets import PARTITIONED_STAGES, pipeline_assets
from loraflow.demo_data import write_demo_data
from loraflow.spec import load_spec
from pipelines.definitions import pipeline_resources
from pipelines.run import sync_partitions

PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
quality:
  max_invalid_fraction: 0.9
  max_response_chars: {limit}
base_model:
  source: models/tiny-llama
schedule:
  watch_files: false   # only the backfill starts runs here
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""


def latest(instance, key: AssetKey, partition: str | None = None):
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0] if records else None


def partition_of(run) -> str | None:
    """The source file a run covered: a one-partition range in a backfill, else its partition tag."""
    return run.tags.get("dagster/asset_partition_range_start") or run.tags.get("dagster/partition")


def test_a_backfill_from_the_command_line_revalidates_every_file_under_new_rules(tmp_path, tiny_model_dir):
    project, dagster_home = tmp_path / "project", tmp_path / "dagster-home"
    (project / "pipelines").mkdir(parents=True)
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    shutil.copytree(tiny_model_dir, project / "models" / "tiny-llama")
    write_demo_data(project / "data", n=40, files=2)
    yaml_path = write_yaml(project / "pipelines", "triage", PIPELINE.format(limit=400))
    home = project / ".loraflow"
    validated = AssetKey(["triage", "validated_examples"])

    # both files ingested and validated under the first rules, on the instance dagster dev will use
    spec = load_spec(yaml_path)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        partitions = sync_partitions(spec, instance, pipeline_resources(home)).to_ingest
        for partition in partitions:
            materialize(
                pipeline_assets(spec),
                selection=[AssetKey(["triage", s]) for s in PARTITIONED_STAGES],
                partition_key=partition,
                instance=instance,
                resources=pipeline_resources(home),
            )
        materialize(  # formatting after the backfill reads the base model's tokenizer
            pipeline_assets(spec),
            selection=[AssetKey(["triage", "base_model"])],
            instance=instance,
            resources=pipeline_resources(home),
        )
        before = {p: latest(instance, validated, p).asset_materialization.metadata for p in partitions}
    assert len(partitions) == 2

    # stricter rules: every partition is now out of date
    write_yaml(project / "pipelines", "triage", PIPELINE.format(limit=95))
    rules = load_spec(yaml_path).section_version("data", "quality")
    env = {"LORAFLOW_PIPELINES": str(project / "pipelines"), "LORAFLOW_HOME": str(home)}
    with DagsterDev(dagster_home, ARTIFACTS.parent / "backfill" / "dagster-dev.log", env) as dev:
        dev.wait_until_loaded(timeout=180)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines.backfill",
                "triage",
                "--url",
                dev.url,
                "--wait",
                "--timeout",
                "400",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{dev.log_tail()}"
        assert "COMPLETED" in done.stdout

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        backfill_id = done.stdout.split()[1]  # "backfill <id> launched: <url>"
        runs = [
            r.dagster_run
            for r in instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id}))
        ]
        assert all(run.status == DagsterRunStatus.SUCCESS for run in runs)
        per_file = sorted(filter(None, map(partition_of, runs)))
        assert per_file == sorted(partitions)  # one run per source file
        for partition in partitions:
            record = latest(instance, validated, partition)
            assert record.asset_materialization.tags["dagster/code_version"] == rules
            quarantined = record.asset_materialization.metadata["quarantined_rows"].value
            assert quarantined > before[partition]["quarantined_rows"].value  # the new limit bites
        formatted = latest(instance, AssetKey(["triage", "training_dataset"]))
        assert formatted is not None and formatted.run_id in {run.run_id for run in runs}
