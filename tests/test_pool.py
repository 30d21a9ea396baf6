"""The "gpu" pool on an instance configured like the repository's dagster.yaml: one training at a time,
and a training whose process dies does not hold the slot forever."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import dagster._daemon.monitoring.concurrency as slot_monitor
import pytest
import yaml
from conftest import materialize_upstream_of_adapter, write_yaml
from dagster import (
    AssetKey,
    AssetsDefinition,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    EventLogEntry,
    materialize,
)
from dagster import instance_for_test as dagster_instance_for_test

from assets import pipeline_assets
from assets.training import GPU_POOL
from loraflow.demo_data import write_demo_data
from loraflow.spec import PipelineSpec, load_spec
from pipelines.definitions import pipeline_resources
from resources import Trainer

REPO = Path(__file__).resolve().parent.parent
# The instance sections that decide how pools behave, exactly as the repository configures them.
REPO_CONFIG = yaml.safe_load((REPO / "dagster.yaml").read_text())
POOL_SETTINGS = {section: REPO_CONFIG[section] for section in ("concurrency", "run_monitoring")}
WAIT_SECONDS = 180

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
  lora: {{r: 4, alpha: 8}}
  max_steps: 2
  batch_size: 4
  log_every: 1
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""

# A training process that dies while it holds the slot (OOM-killed, the machine rebooted): it claims
# the slot through the real adapter asset, then never finishes, and the test kills it.
KILLED_TRAINING = """
import sys
import threading
from pathlib import Path

from dagster import AssetKey, DagsterInstance, materialize

from assets import pipeline_assets
from loraflow.spec import load_spec
from pipelines.definitions import pipeline_resources
from resources import Trainer


class TrainerThatNeverFinishes(Trainer):
    def train(self, *args, **kwargs):
        threading.Event().wait()


spec = load_spec(Path(sys.argv[1]))
with DagsterInstance.get() as instance:
    materialize(
        pipeline_assets(spec),
        selection=[AssetKey([spec.name, "adapter"])],
        instance=instance,
        resources={**pipeline_resources(Path(sys.argv[2])), "trainer": TrainerThatNeverFinishes()},
    )
"""


@dataclass(frozen=True)
class TrainingInputs:
    spec_path: Path
    spec: PipelineSpec
    home: Path


@pytest.fixture(scope="module")
def training_inputs(tmp_path_factory, tiny_model_dir) -> TrainingInputs:
    """Everything upstream of `adapter` materialized once, its manifests in `home`."""
    project = tmp_path_factory.mktemp("pool-project")
    (project / "data").mkdir()
    (project / "pipelines").mkdir()
    write_demo_data(project / "data", n=60)
    spec_path = write_yaml(project / "pipelines", "triage", PIPELINE.format(model=tiny_model_dir))
    spec = load_spec(spec_path)
    home = project / ".loraflow"
    materialize_upstream_of_adapter(spec, home)
    return TrainingInputs(spec_path, spec, home)


@pytest.fixture
def instance():
    """A fresh instance with the repository's pool limit and run monitoring."""
    with dagster_instance_for_test(overrides=POOL_SETTINGS) as dagster_instance:
        yield dagster_instance


T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str) -> T:
    """Poll `condition` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up after {WAIT_SECONDS}s waiting until {what}")


def adapter_of(spec: PipelineSpec) -> AssetsDefinition:
    return next(a for a in pipeline_assets(spec) if a.key == AssetKey([spec.name, "adapter"]))


def train_adapter_run(spec: PipelineSpec, home: Path, instance: DagsterInstance, trainer: Trainer):
    """One run materializing only `adapter`; its inputs load from the upstream manifests."""
    return materialize(
        pipeline_assets(spec),
        selection=[AssetKey([spec.name, "adapter"])],
        instance=instance,
        resources={**pipeline_resources(home), "trainer": trainer},
    )


def step_events(instance: DagsterInstance, run_id: str, kind: DagsterEventType) -> list[EventLogEntry]:
    return instance.all_logs(run_id, of_type=kind)


def blocked_by_pool(instance: DagsterInstance, run_id: str, step: str) -> list[EventLogEntry]:
    """The run's "Step blocked by limit for pool gpu" events for `step`."""
    return [
        entry
        for entry in step_events(instance, run_id, DagsterEventType.ENGINE_EVENT)
        if entry.step_key == step and f"blocked by limit for pool {GPU_POOL}" in (entry.message or "")
    ]


def holders(instance: DagsterInstance) -> list[tuple[str, str]]:
    return [
        (s.run_id, s.step_key)
        for s in instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots
    ]


def waiting_runs(instance: DagsterInstance) -> list[str]:
    """Runs queued for the slot and not given it yet."""
    info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    return [p.run_id for p in info.pending_steps if p.assigned_timestamp is None]


def run_monitoring_frees_slots(instance: DagsterInstance) -> None:
    """One pass of what the monitoring daemon (`dagster dev`, `make ui`) does for pool slots."""
    list(
        slot_monitor.execute_concurrency_slots_iteration(
            SimpleNamespace(instance=instance), logging.getLogger()
        )
    )


def test_a_second_training_waits_for_the_gpu_slot_until_the_first_releases_it(training_inputs, instance):
    spec, home = training_inputs.spec, training_inputs.home
    adapter = adapter_of(spec)
    assert adapter.op.pool == GPU_POOL
    step = adapter.op.name
    first_is_training, first_may_train = threading.Event(), threading.Event()

    class TrainerHeldAtTheStart(Trainer):
        """The real trainer, held back until the test has seen the second training queue for the slot."""

        def train(self, *args, **kwargs):
            first_is_training.set()
            if not first_may_train.wait(timeout=WAIT_SECONDS):
                raise TimeoutError("the test never let the first training go on")
            return super().train(*args, **kwargs)

    with ThreadPoolExecutor(max_workers=2) as runs:
        try:
            first = runs.submit(train_adapter_run, spec, home, instance, TrainerHeldAtTheStart())
            ((first_run, held_step),) = wait_until(
                lambda: holders(instance), "the first training holds the slot"
            )
            assert held_step == step
            # Dagster reconfigures Python logging (logging.config.dictConfig) as each run starts; a run
            # starting while another thread of this process logs an event can deadlock (python/cpython
            # #96727), so the second run starts once the first sits quietly in its training step.
            assert first_is_training.wait(timeout=WAIT_SECONDS), "the first training never started"
            second = runs.submit(train_adapter_run, spec, home, instance, Trainer())
            (second_run,) = wait_until(
                lambda: waiting_runs(instance), "the second training queues for the slot"
            )
            assert second_run != first_run
            wait_until(
                lambda: blocked_by_pool(instance, second_run, step), "the second run logs that it is blocked"
            )

            info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
            assert (info.limit, info.slot_count) == (1, 1)
            assert holders(instance) == [(first_run, step)]
            assert waiting_runs(instance) == [second_run]
            assert step_events(instance, second_run, DagsterEventType.STEP_START) == []
        finally:
            first_may_train.set()
    first_result, second_result = first.result(), second.result()

    assert (first_result.run_id, second_result.run_id) == (first_run, second_run)
    assert first_result.success and second_result.success
    for result in (first_result, second_result):
        assert [m.asset_key for m in result.get_asset_materialization_events()] == [adapter.key]
    # the second training started only after the first had finished and given the slot back
    (first_done,) = step_events(instance, first_run, DagsterEventType.STEP_SUCCESS)
    (second_started,) = step_events(instance, second_run, DagsterEventType.STEP_START)
    assert first_done.timestamp <= second_started.timestamp
    assert holders(instance) == [] and waiting_runs(instance) == []


def test_a_killed_training_gives_the_gpu_slot_back_after_its_run_has_ended(
    training_inputs, instance, monkeypatch, tmp_path
):
    spec, home = training_inputs.spec, training_inputs.home
    step = adapter_of(spec).op.name
    free_after = instance.run_monitoring_settings.get("free_slots_after_run_end_seconds")
    assert free_after == REPO_CONFIG["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert "MONITORING" in instance.get_required_daemon_types()  # the daemon that frees them runs

    log = tmp_path / "killed_training.log"
    with log.open("w") as output:
        worker = subprocess.Popen(
            [sys.executable, "-c", KILLED_TRAINING, str(training_inputs.spec_path), str(home)],
            cwd=REPO,
            env={**os.environ, "DAGSTER_HOME": instance.root_directory},
            stdout=output,
            stderr=subprocess.STDOUT,
        )

        def worker_holds_the_slot():
            if worker.poll() is not None:
                raise AssertionError(f"the training process exited early:\n{log.read_text()[-3000:]}")
            return holders(instance)

        try:
            ((dead_run, held_step),) = wait_until(worker_holds_the_slot, "the doomed training holds the slot")
        finally:
            worker.kill()
            worker.wait()
    assert held_step == step
    # nothing notices a dead in-process run on its own: it still looks started and keeps the slot
    assert instance.get_run_by_id(dead_run).status == DagsterRunStatus.STARTED
    assert holders(instance) == [(dead_run, step)]

    with ThreadPoolExecutor(max_workers=1) as runs:
        next_training = runs.submit(train_adapter_run, spec, home, instance, Trainer())
        try:
            (next_run,) = wait_until(lambda: waiting_runs(instance), "the next training queues for the slot")
            wait_until(
                lambda: blocked_by_pool(instance, next_run, step), "the next training logs it is blocked"
            )

            # once the run has ended (terminated from the UI, or past run monitoring's max_runtime_seconds
            # where that is set), it still holds the slot at first ...
            instance.report_run_failed(instance.get_run_by_id(dead_run), "the training process was killed")
            run_monitoring_frees_slots(instance)
            assert holders(instance) == [(dead_run, step)]
            assert waiting_runs(instance) == [next_run]

            # ... and run monitoring gives it back free_slots_after_run_end_seconds after the run ended
            later = datetime.now(UTC) + timedelta(seconds=free_after + 1)
            monkeypatch.setattr(slot_monitor, "get_current_datetime", lambda: later)
            run_monitoring_frees_slots(instance)
            assert dead_run not in {run_id for run_id, _ in holders(instance)}
        finally:
            # whatever failed above, never leave the next training waiting on a dead run
            instance.event_log_storage.free_concurrency_slots_for_run(dead_run)
    result = next_training.result()

    assert result.success and result.run_id == next_run
    assert [m.asset_key for m in result.get_asset_materialization_events()] == [
        AssetKey([spec.name, "adapter"])
    ]
    assert holders(instance) == [] and waiting_runs(instance) == []


def test_evaluation_and_publishing_share_the_gpu_pool_with_training(training_inputs):
    """Both load a full-precision model on the training device: run beside another pipeline's
    training they could run it out of memory."""
    from assets import pipeline_assets

    pools = {tuple(a.key.path)[-1]: a.op.pool for a in pipeline_assets(training_inputs.spec)}
    assert pools["adapter"] == pools["evaluation"] == pools["published_model"] == GPU_POOL
    assert pools["raw_examples"] is None and pools["training_dataset"] is None
