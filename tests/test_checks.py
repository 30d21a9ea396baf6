"""The data checks, each made to fail in a real materialization: a blocking check stops the run before
anything downstream of it, and a later run does not build on what it rejected; a warning does not."""

from __future__ import annotations

import json

from conftest import write_yaml
from dagster import AssetCheckKey, AssetCheckSeverity, AssetKey, instance_for_test, materialize

from assets import PARTITIONED_STAGES, pipeline_assets
from loraflow.demo_data import generate_examples
from loraflow.spec import load_spec
from pipelines.definitions import pipeline_resources
from pipelines.run import run_pipeline, sync_partitions

PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
format:
  chat_template: {template}
  eval_size: 0.2
base_model:
  source: {model}
training:
  method: lora
  lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
  max_steps: 2
  batch_size: 4
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""

# A template that writes nothing after an answer: a model trained with it never learns to stop.
NO_END_OF_TURN = (
    "\"{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}\""
)


def write_records(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def pipeline(project, tiny_model_dir, template: str = "chatml"):
    write_records(project / "data" / "a.jsonl", generate_examples(30, seed=5))
    return load_spec(
        write_yaml(project / "pipelines", "triage", PIPELINE.format(model=tiny_model_dir, template=template))
    )


def check_of(instance, asset: str, name: str):
    key = AssetCheckKey(AssetKey(["triage", asset]), name)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return record.event.dagster_event.event_specific_data  # type: ignore[union-attr]


def materialized(instance, stage: str) -> bool:
    return instance.get_latest_materialization_event(AssetKey(["triage", stage])) is not None


def step_failure(instance, run_id: str) -> str:
    failure = next(
        e for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.is_step_failure
    )
    return failure.dagster_event.step_failure_data.error.message


def test_rows_lost_in_validation_fail_counts_add_up_and_nothing_trains_on_the_file(
    project, tiny_model_dir, monkeypatch
):
    import assets.validation

    spec = pipeline(project, tiny_model_dir)
    real = assets.validation.validate_partition

    def losing_a_row(con, pipeline_name, partition, *args, **kwargs):
        result = real(con, pipeline_name, partition, *args, **kwargs)
        con.execute(
            f'DELETE FROM "{pipeline_name}".validated_examples WHERE partition = ? AND record_index = 7',
            [partition],
        )
        return result

    monkeypatch.setattr(assets.validation, "validate_partition", losing_a_row)
    with instance_for_test() as instance:
        outcome = run_pipeline(spec, instance, project / ".loraflow")
        assert outcome == {"success": False, "failed_at": "partition data/a.jsonl"}
        counts = check_of(instance, "validated_examples", "counts_add_up")
        assert counts.passed is False
        figures = {k: v.value for k, v in counts.metadata.items()}
        assert figures == {"raw_rows": 30, "valid_rows": 29, "quarantined_rows": 0}
        assert not materialized(instance, "training_dataset")

        # the partition looks ingested to the next run; formatting refuses to build on it
        monkeypatch.setattr(assets.validation, "validate_partition", real)
        assert sync_partitions(spec, instance, pipeline_resources(project / ".loraflow")).to_ingest == []
        again = run_pipeline(spec, instance, project / ".loraflow")
        assert not again["success"] and not materialized(instance, "training_dataset")
        assert (
            "rows do not add up (raw = valid + quarantined): data/a.jsonl (30 raw, 29 valid + 0 quarantined)"
            in (step_failure(instance, again["run_id"]))
        )


def test_a_template_that_ends_answers_with_nothing_fails_end_of_turn_and_stops_training(
    project, tiny_model_dir
):
    spec = pipeline(project, tiny_model_dir, template=NO_END_OF_TURN)
    with instance_for_test() as instance:
        outcome = run_pipeline(spec, instance, project / ".loraflow")
        assert not outcome["success"] and outcome["evaluation"] is None
        check = check_of(instance, "training_dataset", "end_of_turn_trained")
        assert check.passed is False
        assert check.metadata["examples_without_trained_end"].value == 30
        assert check.metadata["end_of_turn"].value == repr("")
        assert check_of(instance, "training_dataset", "every_example_trains").passed
        assert materialized(instance, "training_dataset") and not materialized(instance, "adapter")


def test_a_stored_template_that_does_not_reproduce_training_fails_the_round_trip_and_stops_training(
    project, tiny_model_dir, monkeypatch
):
    import assets.dataset
    from loraflow.dataset import TEMPLATE_FILE
    from loraflow.templates import NAMED_TEMPLATES

    spec = pipeline(project, tiny_model_dir, template="chatml")
    real = assets.dataset.build_dataset

    def storing_another_template(*args, **kwargs):
        # the fault: the template kept with the dataset is not the one its tokens were rendered with
        summary = real(*args, **kwargs)
        (project / ".loraflow" / "datasets" / "triage" / summary.version / TEMPLATE_FILE).write_text(
            NAMED_TEMPLATES["zephyr"], encoding="utf-8"
        )
        return summary

    monkeypatch.setattr(assets.dataset, "build_dataset", storing_another_template)
    with instance_for_test() as instance:
        outcome = run_pipeline(spec, instance, project / ".loraflow")
        assert not outcome["success"] and outcome["evaluation"] is None
        check = check_of(instance, "training_dataset", "template_round_trip")
        assert check.passed is False
        assert check.metadata["mismatched_examples"].value == 30  # every stored conversation
        assert check.metadata["first_mismatch"].value
        assert not materialized(instance, "adapter")


def test_a_file_whose_records_gain_a_key_warns_of_schema_drift_and_still_validates(project, tiny_model_dir):
    spec = pipeline(project, tiny_model_dir)
    records = [dict(r, ticket_id=i) for i, r in enumerate(generate_examples(12, seed=9))]
    write_records(project / "data" / "b.jsonl", records)
    resources = pipeline_resources(project / ".loraflow")
    with instance_for_test() as instance:
        partitions = sync_partitions(spec, instance, resources).to_ingest
        assert partitions == ["data/a.jsonl", "data/b.jsonl"]
        for partition in partitions:
            result = materialize(
                pipeline_assets(spec),
                selection=[AssetKey(["triage", stage]) for stage in PARTITIONED_STAGES],
                partition_key=partition,
                instance=instance,
                resources=resources,
            )
            assert result.success  # a warning never stops a run
            drift = check_of(instance, "validated_examples", "schema_drift")
            if partition == "data/a.jsonl":  # nothing to compare with yet
                assert drift.passed
        assert drift.passed is False and drift.severity == AssetCheckSeverity.WARN
        assert drift.metadata["added"].value == "ticket_id"
        assert "removed" not in drift.metadata and "changed_type" not in drift.metadata
        assert drift.metadata["record_schema"].value == {
            "input": "VARCHAR",
            "instruction": "VARCHAR",
            "output": "VARCHAR",
            "ticket_id": "UBIGINT",
        }


def test_files_with_the_same_keys_raise_no_drift(project, tiny_model_dir):
    spec = pipeline(project, tiny_model_dir)
    write_records(project / "data" / "b.jsonl", generate_examples(12, seed=9))
    resources = pipeline_resources(project / ".loraflow")
    with instance_for_test() as instance:
        for partition in sync_partitions(spec, instance, resources).to_ingest:
            materialize(
                pipeline_assets(spec),
                selection=[AssetKey(["triage", s]) for s in PARTITIONED_STAGES],
                partition_key=partition,
                instance=instance,
                resources=resources,
            )
        assert check_of(instance, "validated_examples", "schema_drift").passed
