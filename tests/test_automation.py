"""Retraining on its own, decided by Dagster's automation conditions (assets/automation.py) and
evaluated with Dagster's automation-condition tester on a real instance, around real runs:
nothing changed means no run; a new file means one ingestion and one retrain at the next tick; a
failed check means no retrain; a burst of files ingests per file, formats once and trains once."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from conftest import write_yaml
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DefaultSensorStatus,
    Definitions,
    build_sensor_context,
    evaluate_automation_conditions,
    instance_for_test,
    materialize,
)

from assets import PARTITIONED_STAGES, pipeline_assets
from loraflow.demo_data import write_demo_data
from loraflow.spec import SpecError, load_spec
from pipelines.component import pipeline_definitions
from pipelines.definitions import build_definitions, pipeline_resources

PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
quality:
  max_invalid_fraction: 0.5
format:
  chat_template: chatml
  eval_size: 0.2
base_model:
  source: {model}
training:
  method: lora
  lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
  max_steps: 2
  batch_size: 4
evaluation:
  max_examples: 4
  max_new_tokens: 4
  forgetting: {{enabled: false}}
  gate: {{metric: eval_loss, min_improvement: -1000.0}}
schedule:
  cron: "0 3 * * 1"
  timezone: Europe/Berlin
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""
BERLIN = ZoneInfo("Europe/Berlin")
SUNDAY = datetime(2026, 11, 29, 12, 0, tzinfo=BERLIN)
MONDAY_TICK = datetime(2026, 11, 30, 3, 0, tzinfo=BERLIN)
INGEST = [AssetKey(["triage", stage]) for stage in PARTITIONED_STAGES]
DATASET, ADAPTER = AssetKey(["triage", "training_dataset"]), AssetKey(["triage", "adapter"])
RETRAIN = {AssetKey(["triage", s]) for s in ("adapter", "evaluation", "published_model")}


@pytest.fixture
def pipeline(project, tiny_model_dir):
    """(defs, spec, home) of a pipeline retraining Mondays at 03:00 Berlin time, with no data yet."""
    path = write_yaml(project / "pipelines", "triage", PIPELINE.format(model=tiny_model_dir))
    home = project / ".loraflow"
    return build_definitions(project / "pipelines", home), load_spec(path), home


class Daemon:
    """What the daemon does, one step at a time: sensor ticks, automation ticks at chosen times, and
    the runs they request, executed for real on the instance."""

    def __init__(self, defs, spec, home, instance):
        self.defs, self.spec, self.home, self.instance = defs, spec, home, instance
        self.sensor_cursor = None
        self.automation_cursor = None

    def sensor_tick(self):
        context = build_sensor_context(
            instance=self.instance,
            cursor=self.sensor_cursor,
            definitions=self.defs,
            resources={"warehouse": self.defs.resources["warehouse"]},
        )
        result = self.defs.resolve_sensor_def("triage__source_files")(context)
        for request in result.dynamic_partitions_requests:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        self.sensor_cursor = result.cursor
        return result

    def ingest(self, partition: str, raise_on_error: bool = True):
        """The run the source sensor requests for one file."""
        return materialize(
            pipeline_assets(self.spec),
            selection=INGEST,
            partition_key=partition,
            instance=self.instance,
            resources=pipeline_resources(self.home),
            raise_on_error=raise_on_error,
        )

    def automation_tick(self, when: datetime, defs=None) -> set[AssetKey]:
        """One evaluation of every automation condition at `when`: the unpartitioned assets it requests."""
        result = evaluate_automation_conditions(
            defs=defs or self.defs,
            instance=self.instance,
            cursor=self.automation_cursor,
            evaluation_time=when,
        )
        self.automation_cursor = result.cursor
        requested = {r.key for r in result.results if result.get_num_requested(r.key)}
        assert all(result.get_requested_partitions(k) == {None} for k in requested), "unpartitioned only"
        return requested

    def run(self, keys: set[AssetKey]):
        """One run of the requested assets, as the daemon launches them together."""
        result = materialize(
            pipeline_assets(self.spec),
            selection=sorted(keys, key=lambda k: k.path),
            instance=self.instance,
            resources=pipeline_resources(self.home),
        )
        assert result.success
        return result

    def trainings(self) -> int:
        return len(
            self.instance.fetch_materializations(AssetRecordsFilter(asset_key=ADAPTER), limit=100).records
        )


def with_resources(spec, home):
    """The definitions of a pipeline with settings other than its YAML's, as a reload would build them."""
    return Definitions.merge(pipeline_definitions(spec), Definitions(resources=pipeline_resources(home)))


def first_training(daemon: Daemon, partitions: list[str]) -> None:
    """Ingest every file; automation prepares the base model, then formats the data, and trains at the tick."""
    for partition in partitions:
        daemon.ingest(partition)
    base_model = AssetKey(["triage", "base_model"])
    assert daemon.automation_tick(SUNDAY) == {base_model}  # missing
    daemon.run({base_model})
    assert daemon.automation_tick(SUNDAY + timedelta(minutes=1)) == {DATASET}  # not trained before the tick
    daemon.run({DATASET})
    assert daemon.automation_tick(SUNDAY + timedelta(hours=1)) == set()
    assert daemon.automation_tick(MONDAY_TICK + timedelta(minutes=1)) == RETRAIN
    daemon.run(RETRAIN)
    assert daemon.trainings() == 1


def test_sensors_start_as_the_yaml_says_and_a_bad_cron_names_the_key(pipeline, project):
    defs, _, _ = pipeline
    for name in ("triage__source_files", "triage__automation", "triage__retrain"):
        assert defs.resolve_sensor_def(name).default_status == DefaultSensorStatus.RUNNING
    job = defs.resolve_job_def("triage__retrain")
    assert {"/".join(k.path) for k in job.asset_layer.selected_asset_keys} == {
        f"triage/{s}" for s in ("base_model", "training_dataset", "adapter", "evaluation", "published_model")
    }
    text = (project / "pipelines" / "triage.yaml").read_text()
    (project / "pipelines" / "triage.yaml").write_text(
        text.replace(
            "  timezone: Europe/Berlin", "  timezone: Europe/Berlin\n  enabled: false\n  watch_files: false"
        )
    )
    defs = build_definitions(project / "pipelines", project / ".loraflow")
    for name in ("triage__source_files", "triage__automation", "triage__retrain"):
        assert defs.resolve_sensor_def(name).default_status == DefaultSensorStatus.STOPPED

    (project / "pipelines" / "triage.yaml").write_text(text.replace("0 3 * * 1", "0 3 * *"))
    with pytest.raises(SpecError, match=r"schedule.cron .*five fields"):
        build_definitions(project / "pipelines", project / ".loraflow")
    (project / "pipelines" / "triage.yaml").write_text(text.replace("0 3 * * 1", "0 25 * * 1"))
    with pytest.raises(SpecError, match=r"schedule.cron '0 25 \* \* 1' is not a cron string"):
        build_definitions(project / "pipelines", project / ".loraflow")
    (project / "pipelines" / "triage.yaml").write_text(text.replace("Europe/Berlin", "Europe/Atlantis"))
    with pytest.raises(SpecError, match=r"schedule.timezone .*unknown time zone"):
        build_definitions(project / "pipelines", project / ".loraflow")


def test_nothing_changed_means_no_run_and_a_new_file_means_one_ingestion_and_one_retrain(pipeline, project):
    defs, spec, home = pipeline
    write_demo_data(project / "data", n=40, files=2)
    with instance_for_test() as instance:
        daemon = Daemon(defs, spec, home, instance)
        first = daemon.sensor_tick()
        first_training(daemon, [r.partition_key for r in first.run_requests])

        # nothing changed: no run, neither now nor at the next tick, nor from the sensor
        assert daemon.automation_tick(MONDAY_TICK + timedelta(minutes=5)) == set()
        assert daemon.automation_tick(MONDAY_TICK + timedelta(days=7, minutes=1)) == set()
        assert daemon.sensor_tick().run_requests == []

        # a changed evaluation section retrains nothing; a changed training section does, at a tick
        stricter = spec.model_copy(
            update={"evaluation": spec.evaluation.model_copy(update={"max_examples": 2})}
        )
        faster = spec.model_copy(
            update={"training": spec.training.model_copy(update={"learning_rate": 1e-3})}
        )
        saved = daemon.automation_cursor
        assert (
            daemon.automation_tick(MONDAY_TICK + timedelta(days=8), with_resources(stricter, home)) == set()
        )
        assert ADAPTER in daemon.automation_tick(
            MONDAY_TICK + timedelta(days=14, minutes=1), with_resources(faster, home)
        )
        daemon.automation_cursor = saved  # back to the YAML's settings, which the last adapter was trained on

        # a new file: one ingestion run, formatted right after, trained once at the next tick
        write_demo_data(project / "data" / "more", n=20, files=1, seed=3)[0].rename(
            project / "data" / "new.jsonl"
        )
        new = daemon.sensor_tick()
        assert [r.partition_key for r in new.run_requests] == ["data/new.jsonl"]
        daemon.ingest("data/new.jsonl")
        wednesday = MONDAY_TICK + timedelta(days=16)
        assert daemon.automation_tick(wednesday) == {DATASET}
        daemon.run({DATASET})
        assert daemon.automation_tick(wednesday + timedelta(minutes=2)) == set()  # waits for the tick
        assert daemon.automation_tick(MONDAY_TICK + timedelta(days=21, minutes=1)) == RETRAIN
        daemon.run(RETRAIN)
        assert daemon.trainings() == 2
        assert daemon.automation_tick(MONDAY_TICK + timedelta(days=28, minutes=1)) == set()


def test_a_file_failing_its_blocking_check_means_no_retrain(pipeline, project):
    defs, spec, home = pipeline
    write_demo_data(project / "data", n=40, files=1)
    with instance_for_test() as instance:
        daemon = Daemon(defs, spec, home, instance)
        first_training(daemon, [r.partition_key for r in daemon.sensor_tick().run_requests])

        # a file where every row is quarantined: quality_suite fails, and blocks its run
        (project / "data" / "broken.jsonl").write_text('{"instruction": "", "output": ""}\n' * 10)
        (request,) = daemon.sensor_tick().run_requests
        ingestion = daemon.ingest(request.partition_key, raise_on_error=False)
        assert not ingestion.success
        checks = ingestion.get_asset_check_evaluations()
        assert any(not c.passed and c.check_name == "quality_suite" for c in checks)

        assert daemon.automation_tick(MONDAY_TICK + timedelta(days=2)) == set()  # not formatted
        assert daemon.automation_tick(MONDAY_TICK + timedelta(days=7, minutes=1)) == set()  # not trained
        assert daemon.trainings() == 1


def test_a_burst_of_three_new_files_ingests_each_formats_once_and_trains_once(pipeline, project):
    defs, spec, home = pipeline
    write_demo_data(project / "data", n=60, files=3)
    with instance_for_test() as instance:
        daemon = Daemon(defs, spec, home, instance)
        burst = daemon.sensor_tick()
        assert len(burst.run_requests) == 3  # one ingestion run per file
        daemon.run({AssetKey(["triage", "base_model"])})
        assert daemon.automation_tick(SUNDAY) == set()
        for i, request in enumerate(burst.run_requests):
            daemon.ingest(request.partition_key)
            formatting = daemon.automation_tick(SUNDAY + timedelta(minutes=i + 1))
            assert formatting == ({DATASET} if i == 2 else set())  # once, after the last file
        daemon.run({DATASET})
        assert (
            daemon.automation_tick(SUNDAY + timedelta(minutes=10)) == set()
        )  # formatted; trains at the tick
        assert daemon.automation_tick(MONDAY_TICK + timedelta(minutes=1)) == RETRAIN
        daemon.run(RETRAIN)
        assert daemon.automation_tick(MONDAY_TICK + timedelta(minutes=2)) == set()
        assert daemon.trainings() == 1
