"""Retraining on its own: the schedule skips when nothing upstream of the adapter changed and retrains
when something did; a burst of new files ingests per file, formats once and trains once."""

from __future__ import annotations

import pytest
from conftest import write_yaml
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    build_schedule_context,
    build_sensor_context,
    evaluate_automation_conditions,
    instance_for_test,
    materialize,
)
from dagster._core.test_utils import create_run_for_test

from assets import PARTITIONED_STAGES, pipeline_assets
from loraflow.demo_data import write_demo_data
from loraflow.spec import SpecError, load_spec
from pipelines.definitions import build_definitions, pipeline_resources
from pipelines.schedules import retrain_decision

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
INGEST = [AssetKey(["triage", stage]) for stage in PARTITIONED_STAGES]
ADAPTER = AssetKey(["triage", "adapter"])


@pytest.fixture
def pipeline(project, tiny_model_dir):
    """(defs, spec, home) of a pipeline with a weekly retrain schedule and no data yet."""
    path = write_yaml(project / "pipelines", "triage", PIPELINE.format(model=tiny_model_dir))
    home = project / ".loraflow"
    return build_definitions(project / "pipelines", home), load_spec(path), home


def sensor_tick(defs, instance, cursor=None):
    """One tick of the source-file sensor, with its partition requests applied as the daemon would."""
    context = build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        resources={"warehouse": defs.resources["warehouse"]},
    )
    result = defs.resolve_sensor_def("triage__source_files")(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def ingest(spec, home, instance, partition: str) -> None:
    """The run the sensor requests for one file."""
    materialize(
        pipeline_assets(spec),
        selection=INGEST,
        partition_key=partition,
        instance=instance,
        resources=pipeline_resources(home),
    )


def schedule_tick(defs, instance):
    """One tick of the retrain schedule: (run requests, skip message)."""
    schedule = defs.resolve_schedule_def("triage__retrain_schedule")
    data = schedule.evaluate_tick(build_schedule_context(instance=instance))
    return list(data.run_requests or []), data.skip_message


def retrain(defs, instance, request):
    """The run the schedule requests: the retrain job with the request's tags."""
    job = defs.resolve_job_def("triage__retrain")
    return job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)


def trainings(instance) -> int:
    return len(instance.fetch_materializations(AssetRecordsFilter(asset_key=ADAPTER), limit=100).records)


def test_the_schedule_and_sensors_start_as_the_yaml_says_and_a_bad_cron_names_the_key(pipeline, project):
    defs, _, _ = pipeline
    schedule = defs.resolve_schedule_def("triage__retrain_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 3 * * 1", "Europe/Berlin")
    assert schedule.default_status == DefaultScheduleStatus.RUNNING
    assert defs.resolve_sensor_def("triage__source_files").default_status == DefaultSensorStatus.RUNNING
    job = defs.resolve_job_def("triage__retrain")
    assert {"/".join(k.path) for k in job.asset_layer.selected_asset_keys} == {
        f"triage/{s}" for s in ("base_model", "training_dataset", "adapter", "evaluation", "published_model")
    }

    text = (project / "pipelines" / "triage.yaml").read_text()
    stopped = text.replace(
        "  timezone: Europe/Berlin", "  timezone: Europe/Berlin\n  enabled: false\n  watch_files: false"
    )
    (project / "pipelines" / "triage.yaml").write_text(stopped)
    defs = build_definitions(project / "pipelines", project / ".loraflow")
    assert (
        defs.resolve_schedule_def("triage__retrain_schedule").default_status == DefaultScheduleStatus.STOPPED
    )
    for name in ("triage__source_files", "triage__automation"):
        assert defs.resolve_sensor_def(name).default_status == DefaultSensorStatus.STOPPED

    (project / "pipelines" / "triage.yaml").write_text(text.replace("0 3 * * 1", "0 3 * *"))
    with pytest.raises(SpecError, match=r"schedule.cron .*five fields"):
        build_definitions(project / "pipelines", project / ".loraflow")
    (project / "pipelines" / "triage.yaml").write_text(text.replace("Europe/Berlin", "Europe/Atlantis"))
    with pytest.raises(SpecError, match=r"schedule.timezone .*unknown time zone"):
        build_definitions(project / "pipelines", project / ".loraflow")


def test_the_schedule_skips_when_nothing_changed_and_retrains_when_a_partition_changed(pipeline, project):
    defs, spec, home = pipeline
    files = write_demo_data(project / "data", n=40, files=2)
    with instance_for_test() as instance:
        for request in sensor_tick(defs, instance).run_requests:
            ingest(spec, home, instance, request.partition_key)

        (first,), _ = schedule_tick(defs, instance)
        assert "has no adapter yet" in first.tags["loraflow/reason"]
        assert retrain(defs, instance, first).success
        assert trainings(instance) == 1

        requests, skipped = schedule_tick(defs, instance)
        assert requests == []
        assert "nothing upstream of triage/adapter changed" in skipped and "2 source file(s)" in skipped

        # one file gains a line; the sensor re-ingests it
        files[0].write_text(files[0].read_text() + files[1].read_text().splitlines()[0] + "\n")
        changed = sensor_tick(defs, instance)
        assert [r.partition_key for r in changed.run_requests] == ["data/" + files[0].name]
        ingest(spec, home, instance, changed.run_requests[0].partition_key)
        (again,), _ = schedule_tick(defs, instance)
        assert (
            "1 source file(s) with new validated data: data/" + files[0].name in again.tags["loraflow/reason"]
        )

        # a changed training section retrains too, a changed evaluation section does not
        faster = spec.model_copy(
            update={"training": spec.training.model_copy(update={"learning_rate": 1e-3})}
        )
        assert "the `training` section" in retrain_decision(instance, faster).reason
        ingest_free = retrain(defs, instance, again)
        assert ingest_free.success and trainings(instance) == 2
        stricter = spec.model_copy(
            update={"evaluation": spec.evaluation.model_copy(update={"max_examples": 2})}
        )
        assert not retrain_decision(instance, stricter).retrain


def test_a_burst_of_three_new_files_ingests_each_formats_once_and_trains_once(pipeline, project):
    defs, spec, home = pipeline
    write_demo_data(project / "data", n=60, files=3)
    dataset = AssetKey(["triage", "training_dataset"])
    with instance_for_test() as instance:
        materialize(
            pipeline_assets(spec),
            selection=[AssetKey(["triage", "base_model"])],
            instance=instance,
            resources=pipeline_resources(home),
        )
        burst = sensor_tick(defs, instance)
        assert len(burst.run_requests) == 3  # one ingestion run per file

        # while the daemon has them queued, the schedule waits instead of training on a part
        queued = create_run_for_test(
            instance,
            job_name="__ASSET_JOB",
            status=DagsterRunStatus.NOT_STARTED,
            asset_selection=frozenset(INGEST),
        )
        _, skipped = schedule_tick(defs, instance)
        assert "ingestion run(s) queued or running" in skipped
        instance.delete_run(queued.run_id)

        automation = evaluate_automation_conditions(defs=defs, instance=instance)
        for i, request in enumerate(burst.run_requests):
            ingest(spec, home, instance, request.partition_key)
            automation = evaluate_automation_conditions(
                defs=defs, instance=instance, cursor=automation.cursor
            )
            formatting = automation.get_num_requested(dataset)
            assert formatting == (1 if i == 2 else 0)  # not while files are missing: once, after the last
        assert automation.total_requested == 1
        materialize(
            pipeline_assets(spec),
            selection=[dataset],
            instance=instance,
            resources=pipeline_resources(home),
        )
        automation = evaluate_automation_conditions(defs=defs, instance=instance, cursor=automation.cursor)
        assert automation.total_requested == 0  # formatted; training is never automatic

        (request,), _ = schedule_tick(defs, instance)
        assert retrain(defs, instance, request).success
        requests, skipped = schedule_tick(defs, instance)
        assert requests == [] and isinstance(skipped, str)
        assert trainings(instance) == 1


def test_a_schedule_tick_skips_while_a_training_is_queued(pipeline, project):
    defs, spec, home = pipeline
    write_demo_data(project / "data", n=20, files=1)
    with instance_for_test() as instance:
        for request in sensor_tick(defs, instance).run_requests:
            ingest(spec, home, instance, request.partition_key)
        create_run_for_test(
            instance,
            job_name="triage__retrain",
            status=DagsterRunStatus.STARTED,
            asset_selection=frozenset({ADAPTER}),
        )
        requests, skipped = schedule_tick(defs, instance)
        assert requests == [] and "already queued or running" in skipped
