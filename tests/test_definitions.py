"""pipelines/definitions.py: one asset group per fine-tune; a broken file stops the load with its name."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_yaml

from loraflow.spec import SpecError
from pipelines.definitions import build_definitions

REPO = Path(__file__).resolve().parent.parent
SOURCES = "data:\n  sources:\n    - path: data/*.jsonl\n"


def test_each_yaml_becomes_one_prefixed_group(project):
    write_yaml(project / "pipelines", "triage", SOURCES)
    write_yaml(project / "pipelines", "roleplay", SOURCES + "training:\n  method: lora\n")
    defs = build_definitions(project / "pipelines", project / ".loraflow")
    groups: dict[str, set[str]] = {}
    for key in defs.resolve_all_asset_keys():
        spec = defs.resolve_assets_def(key).specs_by_key[key]
        groups.setdefault(spec.group_name, set()).add("/".join(key.path))
    stages = {
        "base_model",
        "raw_examples",
        "validated_examples",
        "training_dataset",
        "adapter",
        "evaluation",
        "published_model",
    }
    assert groups == {name: {f"{name}/{stage}" for stage in stages} for name in ("triage", "roleplay")}
    adapter = defs.resolve_assets_def(
        next(k for k in defs.resolve_all_asset_keys() if k.path[-1] == "adapter")
    )
    assert adapter.op.pool == "gpu"  # one training at a time


def test_one_broken_yaml_stops_the_load_naming_every_broken_file(project):
    write_yaml(project / "pipelines", "good", SOURCES)
    write_yaml(project / "pipelines", "typo", SOURCES + "trainng:\n  seed: 1\n")
    write_yaml(project / "pipelines", "badtype", SOURCES + "training:\n  max_steps: many\n")
    with pytest.raises(SpecError) as error:
        build_definitions(project / "pipelines", project / ".loraflow")
    message = str(error.value)
    assert "2 pipeline file(s)" in message
    assert "typo.yaml" in message and "trainng (line 4): unknown key" in message
    assert "badtype.yaml" in message and "training.max_steps" in message
    assert "good.yaml" not in message


def test_loraflow_pipelines_points_the_code_location_at_another_folder_of_either_layout(
    project, tmp_path, monkeypatch
):
    """The project's own folder goes through Dagster's component loader (tests/test_dg.py runs dg on
    it); LORAFLOW_PIPELINES points the same code location at another folder of either layout."""
    from pipelines.definitions import location_definitions

    write_yaml(project / "pipelines", "triage", SOURCES)
    (project / "pipelines" / "roleplay").mkdir()
    (project / "pipelines" / "roleplay" / "defs.yaml").write_text(
        "type: pipelines.component.FineTune\nattributes:\n  " + SOURCES.replace("\n", "\n  ")
    )
    monkeypatch.setenv("LORAFLOW_PIPELINES", str(project / "pipelines"))
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    defs = location_definitions()
    assert {k.path[0] for k in defs.resolve_all_asset_keys()} == {"triage", "roleplay"}

    path = write_yaml(project / "pipelines", "typo", SOURCES + "evaluation:\n  max_exmaples: 3\n")
    with pytest.raises(SpecError) as error:
        location_definitions()
    assert str(path) in str(error.value)
    assert "evaluation.max_exmaples (line 5): unknown key" in str(error.value)


def test_the_repositorys_instance_queues_runs_limits_backfills_and_the_gpu_pool_and_retries_crashes(tmp_path):
    """What README's "The instance" says of dagster.yaml, read through the instance Dagster builds from it."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef
    from dagster._core.run_coordinator import QueuedRunCoordinator

    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(REPO))
    with DagsterInstance.from_ref(ref) as instance:
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        queue = concurrency.run_queue_config
        assert queue.max_concurrent_runs == 4
        assert queue.tag_concurrency_limits == [{"key": "dagster/backfill", "limit": 2}]
        assert concurrency.pool_config.default_pool_limit == 1  # one training at a time
        monitoring = instance.run_monitoring_settings
        assert monitoring["enabled"] and monitoring["start_timeout_seconds"] == 300
        assert monitoring["free_slots_after_run_end_seconds"] == 10  # a crashed run frees the gpu slot
        assert monitoring["poll_interval_seconds"] == 10  # ... seen within this long
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        assert not instance.telemetry_enabled
        assert instance.managed_python_loggers == ["loraflow"] and instance.python_log_level == "INFO"
        assert str(tmp_path) in instance.root_directory  # history under DAGSTER_HOME, here a temp folder


def test_a_broken_yaml_beside_it_does_not_stop_running_another_pipeline_from_the_command_line(
    project, tmp_path, monkeypatch, capsys
):
    from pipelines.run import main

    write_yaml(project / "pipelines", "good", "data:\n  sources:\n    - path: data/none-yet/*.jsonl\n")
    write_yaml(project / "pipelines", "typo", SOURCES + "trainng:\n  seed: 1\n")
    monkeypatch.setenv("LORAFLOW_PIPELINES", str(project / "pipelines"))
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))

    # python -m pipelines.run good: it gets as far as its own data (none yet), and never reads the
    # broken file beside it
    with pytest.raises(SystemExit, match="pipeline 'good': data.sources matches no files"):
        main(["good"])
    out, err = capsys.readouterr()
    assert "typo.yaml" not in out + err
