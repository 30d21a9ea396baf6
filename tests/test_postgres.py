"""The cluster instance (deploy/dagster.yaml) on a real PostgreSQL server: the demo data ingested and
a tiny model trained through the real assets, in process, with runs, event logs, partitions, data
versions, a sensor's state and the "gpu" pool kept in Postgres, and read back from it, through
Dagster and straight from its tables. The file is used as it is: the environment gives it the
connection settings (and the image name the launcher reads), and the Kubernetes launcher alone is
pointed at a throwaway kubeconfig (runs execute in process; nothing launches a pod)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from conftest import write_yaml
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    Definitions,
    materialize,
)
from dagster._core.definitions.data_version import extract_data_provenance_from_entry
from dagster._core.instance.ref import InstanceRef
from dagster._core.remote_representation.external import RemoteRepository
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._core.remote_representation.handle import RepositoryHandle
from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType
from dagster._core.storage.partition_status_cache import AssetPartitionStatus
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from postgres_server import PostgresServer, postgres_server, why_no_server
from test_deploy import throwaway_kubeconfig

from assets import PARTITIONED_STAGES, pipeline_assets, source_partitions
from assets.training import GPU_POOL
from loraflow.artifacts import folder_sha256
from loraflow.demo_data import write_demo_data
from loraflow.spec import PipelineSpec, load_spec
from pipelines.component import pipeline_definitions
from pipelines.definitions import pipeline_resources
from pipelines.deployment import DEPLOYMENT_ENV
from pipelines.run import sync_partitions
from resources import Trainer

pytestmark = pytest.mark.skipif(why_no_server() is not None, reason=str(why_no_server()))

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
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
  lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
  max_steps: 2
  batch_size: 4
schedule:
  cron: "0 3 * * 1"
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""
OTHER_STEP = "other__adapter"  # the training step of another pipeline


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def instance(postgres, tmp_path_factory) -> Iterator[DagsterInstance]:
    """deploy/dagster.yaml as the cluster runs it, its connection settings from the environment."""
    root = tmp_path_factory.mktemp("dagster-home")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "DAGSTER_PG_HOST": postgres.host,
            "DAGSTER_PG_PORT": str(postgres.port),
            "DAGSTER_PG_USER": postgres.user,
            "DAGSTER_PG_PASSWORD": postgres.password,
            "DAGSTER_PG_DB": postgres.db_name,
            "LORAFLOW_IMAGE": "registry.example.com/loraflow:test",
        }.items():
            env.setenv(name, value)
        env.delenv(DEPLOYMENT_ENV, raising=False)  # the resources stay local; the instance is the cluster's
        launcher = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["run_launcher"]
        launcher["config"].update(
            load_incluster_config=False, kubeconfig_file=str(throwaway_kubeconfig(root))
        )
        ref = InstanceRef.from_dir(str(root), config_dir=str(DEPLOY), overrides={"run_launcher": launcher})
        with DagsterInstance.from_ref(ref) as cluster_instance:
            yield cluster_instance


@dataclass(frozen=True)
class PipelineRuns:
    spec: PipelineSpec
    partitions: list[str]
    ingestion_run_ids: list[str]
    dataset_run_id: str
    training_run_id: str
    materialized: dict[AssetKey, int]  # what the runs reported materializing, by asset
    adapter_dir: Path
    gpu_limit: int
    other_trainings: list[str]  # run ids of another pipeline's trainings that held the slots
    waiting_run_id: str  # the run that queued for a slot while they held them all
    started_while_blocked: bool
    slots_while_training: list[tuple[str, str]]  # (run id, step) holding a "gpu" slot
    pending_while_blocked: list[tuple[str, str, bool]]  # pending_steps rows: run id, step, assigned


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


def gpu_slot_holders(instance: DagsterInstance) -> list[tuple[str, str]]:
    info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    return sorted((slot.run_id, slot.step_key) for slot in info.claimed_slots)


def query(postgres: PostgresServer, sql: str, *params) -> list[tuple]:
    """Rows straight from the database Dagster writes to, over a connection of our own."""
    with postgres.connect() as con, con.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def pending_gpu_steps(postgres: PostgresServer) -> list[tuple[str, str, bool]]:
    """The "gpu" pool's queue as Postgres holds it: (run id, step, whether a slot was assigned)."""
    return query(
        postgres,
        "SELECT run_id, step_key, assigned_timestamp IS NOT NULL FROM pending_steps"
        " WHERE concurrency_key = %s ORDER BY run_id",
        GPU_POOL,
    )


def blocked_by_the_pool(instance: DagsterInstance, run_id: str, step: str) -> bool:
    """Whether the run's `step` logged that the "gpu" pool's limit blocks it."""
    return any(
        entry.step_key == step and f"blocked by limit for pool {GPU_POOL}" in (entry.message or "")
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT)
    )


@pytest.fixture(scope="module")
def pipeline_runs(instance, postgres, tmp_path_factory, tiny_model_dir) -> PipelineRuns:
    """The demo data's two files ingested (one run each), the training dataset built (one run) and
    the adapter trained (one run) on the Postgres instance. The training asks for a "gpu" slot while
    another pipeline's trainings hold every one, and gets one when one of them ends."""
    project = tmp_path_factory.mktemp("postgres-project")
    (project / "pipelines").mkdir()
    write_demo_data(project / "data", n=40, files=2)
    spec = load_spec(write_yaml(project / "pipelines", "triage", PIPELINE.format(model=tiny_model_dir)))
    home = project / ".loraflow"
    assets, resources = pipeline_assets(spec), pipeline_resources(home)
    materialized: dict[AssetKey, int] = {}

    def run(selection: list[str], trainer: Trainer | None = None, **kwargs) -> str:
        result = materialize(
            assets,
            selection=[AssetKey([spec.name, stage]) for stage in selection],
            instance=instance,
            resources={**resources, **({"trainer": trainer} if trainer else {})},
            **kwargs,
        )
        assert result.success
        for event in result.get_asset_materialization_events():
            materialized[event.asset_key] = materialized.get(event.asset_key, 0) + 1
        return result.run_id

    partitions = sorted(sync_partitions(spec, instance, resources).to_ingest)
    ingestion_run_ids = [run(list(PARTITIONED_STAGES), partition_key=p) for p in partitions]
    dataset_run_id = run(["base_model", "training_dataset"])

    # as many trainings of another pipeline as the file's "gpu" limit allows hold every slot
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default(GPU_POOL)  # what a pool's first claim does
    limit = storage.get_concurrency_info(GPU_POOL).limit
    others = [f"other-training-{n}" for n in range(limit)]
    for other in others:
        assert storage.claim_concurrency_slot(GPU_POOL, other, OTHER_STEP).is_claimed
    adapter_step = next(a for a in assets if a.key == AssetKey([spec.name, "adapter"])).op.name
    slots_while_training: list[tuple[str, str]] = []

    class TrainerThatLooksAtThePool(Trainer):
        """The real trainer; it notes who holds the "gpu" slots as the training starts."""

        def train(self, *args, **kwargs):
            slots_while_training.extend(gpu_slot_holders(instance))
            return super().train(*args, **kwargs)

    with ThreadPoolExecutor(max_workers=1) as runs:
        training = runs.submit(run, ["adapter"], TrainerThatLooksAtThePool())
        try:
            ((waiting_run, _, _),) = wait_until(
                lambda: [row for row in pending_gpu_steps(postgres) if row[1] == adapter_step],
                "the training queues for a gpu slot",
            )
            wait_until(
                lambda: blocked_by_the_pool(instance, waiting_run, adapter_step),
                "the training logs that the pool blocks it",
            )
            pending_while_blocked = pending_gpu_steps(postgres)
            started_while_blocked = bool(instance.all_logs(waiting_run, of_type=DagsterEventType.STEP_START))
        finally:
            # one of the other trainings ends (should a wait above fail, the training does not wait forever)
            storage.free_concurrency_slots_for_run(others[0])
        training_run_id = training.result(timeout=WAIT_SECONDS)
    for other in others[1:]:
        storage.free_concurrency_slots_for_run(other)
    return PipelineRuns(
        spec=spec,
        partitions=partitions,
        ingestion_run_ids=ingestion_run_ids,
        dataset_run_id=dataset_run_id,
        training_run_id=training_run_id,
        materialized=materialized,
        adapter_dir=Path(
            instance.get_latest_materialization_event(AssetKey([spec.name, "adapter"]))
            .asset_materialization.metadata["path"]
            .value
        ),
        gpu_limit=limit,
        other_trainings=others,
        waiting_run_id=waiting_run,
        started_while_blocked=started_while_blocked,
        slots_while_training=slots_while_training,
        pending_while_blocked=pending_while_blocked,
    )


def test_every_ingestion_and_training_run_and_its_events_are_in_postgres(instance, postgres, pipeline_runs):
    runs = pipeline_runs
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    expected = {*runs.ingestion_run_ids, runs.dataset_run_id, runs.training_run_id}
    assert len(expected) == 2 + 1 + 1  # one run per source file, the dataset's, the training's

    recorded = instance.get_runs()
    assert {run.run_id for run in recorded} == expected
    assert all(run.status == DagsterRunStatus.SUCCESS for run in recorded)
    assert [
        instance.get_run_by_id(i).tags["dagster/partition"] for i in runs.ingestion_run_ids
    ] == runs.partitions
    adapter = AssetKey([runs.spec.name, "adapter"])
    assert instance.get_latest_materialization_event(adapter).run_id == runs.training_run_id

    # the same, read from the tables themselves
    assert sorted(query(postgres, "SELECT run_id, status FROM runs")) == sorted(
        (run_id, "SUCCESS") for run_id in expected
    )
    stored = query(
        postgres,
        "SELECT asset_key, count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
        " GROUP BY asset_key",
    )
    assert {AssetKey.from_db_string(key): count for key, count in stored} == runs.materialized
    assert set(runs.materialized) == {
        AssetKey([runs.spec.name, stage])
        for stage in (*PARTITIONED_STAGES, "base_model", "training_dataset", "adapter")
    }
    per_run = dict(query(postgres, "SELECT run_id, count(*) FROM event_logs GROUP BY run_id"))
    assert expected <= set(per_run)
    assert {run_id: len(instance.all_logs(run_id)) for run_id in expected} == {
        run_id: per_run[run_id] for run_id in expected
    }
    # nothing went to SQLite files beside the instance
    assert not [path for path in Path(instance.root_directory).rglob("*.db")]


def test_postgres_answers_which_partitions_are_ingested_and_which_data_versions_the_assets_have(
    instance, postgres, pipeline_runs
):
    runs, spec = pipeline_runs, pipeline_runs.spec
    partitions_def = source_partitions(spec)
    assert instance.get_dynamic_partitions(partitions_def.name) == runs.partitions
    assert sorted(
        query(
            postgres,
            "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s",
            partitions_def.name,
        )
    ) == [(p,) for p in runs.partitions]
    for stage in PARTITIONED_STAGES:
        key = AssetKey([spec.name, stage])
        assert instance.get_materialized_partitions(key) == set(runs.partitions)
        assert instance.get_status_by_partition(key, runs.partitions, partitions_def) == {
            p: AssetPartitionStatus.MATERIALIZED for p in runs.partitions
        }

    # the adapter's version is its weights' hash, and it names the dataset version it was trained on
    adapter, dataset = (AssetKey([spec.name, stage]) for stage in ("adapter", "training_dataset"))
    adapter_entry = instance.get_latest_data_version_record(adapter).event_log_entry
    weights = folder_sha256(runs.adapter_dir, include=lambda file: file.suffix == ".safetensors")
    assert adapter_entry.tags["dagster/data_version"] == weights[:32]
    provenance = extract_data_provenance_from_entry(adapter_entry)
    dataset_version = instance.get_latest_data_version_record(dataset).event_log_entry.tags[
        "dagster/data_version"
    ]
    assert provenance.input_data_versions[dataset].value == dataset_version
    assert provenance.code_version == spec.training_version()


def test_a_sensor_switched_off_and_on_keeps_its_state_in_postgres(
    instance, postgres, pipeline_runs, tmp_path
):
    spec = pipeline_runs.spec
    defs = Definitions.merge(pipeline_definitions(spec), Definitions(resources=pipeline_resources(tmp_path)))
    repository = RemoteRepository(
        RepositorySnap.from_def(defs.get_repository_def()),
        RepositoryHandle.for_test(location_name="loraflow"),
        auto_materialize_use_sensors=True,
    )
    sensor = repository.get_sensor(f"{spec.name}__retrain")
    origin_id, selector_id = sensor.get_remote_origin_id(), sensor.selector_id

    def stored_status() -> list[tuple[str]]:
        return query(postgres, "SELECT status FROM instigators WHERE selector_id = %s", selector_id)

    # running as declared in code, nothing stored until someone switches it
    assert instance.get_instigator_state(origin_id, selector_id) is None
    assert sensor.get_current_instigator_state(None).status == InstigatorStatus.DECLARED_IN_CODE
    assert stored_status() == []

    instance.stop_sensor(origin_id, selector_id, sensor)  # what the UI's toggle does
    state = instance.get_instigator_state(origin_id, selector_id)
    assert (state.instigator_type, state.instigator_name, state.status) == (
        InstigatorType.SENSOR,
        sensor.name,
        InstigatorStatus.STOPPED,
    )
    assert stored_status() == [("STOPPED",)]

    instance.start_sensor(sensor)
    assert instance.get_instigator_state(origin_id, selector_id).status == InstigatorStatus.RUNNING
    assert stored_status() == [("RUNNING",)]


def test_the_gpu_pool_holds_a_training_back_until_a_slot_is_free(instance, postgres, pipeline_runs):
    runs, spec = pipeline_runs, pipeline_runs.spec
    adapter = next(a for a in pipeline_assets(spec) if a.key == AssetKey([spec.name, "adapter"]))
    step = adapter.op.name
    file_limit = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["concurrency"]["pools"][
        "default_limit"
    ]
    assert runs.gpu_limit == file_limit

    # while the other trainings held every slot, the training waited in Postgres' queue, not started
    assert runs.waiting_run_id == runs.training_run_id
    assert runs.pending_while_blocked == sorted(
        [*((other, OTHER_STEP, True) for other in runs.other_trainings), (runs.training_run_id, step, False)]
    )
    assert not runs.started_while_blocked
    # once one of them ended, it trained in the freed slot beside the others
    assert runs.slots_while_training == sorted(
        [*((other, OTHER_STEP) for other in runs.other_trainings[1:]), (runs.training_run_id, step)]
    )
    assert runs.materialized[adapter.key] == 1
    # and every slot is free again, no step queued
    info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    assert (info.limit, info.slot_count, info.claimed_slots, info.pending_steps) == (
        file_limit,
        file_limit,
        [],
        [],
    )
    assert query(postgres, 'SELECT "limit" FROM concurrency_limits WHERE concurrency_key = %s', GPU_POOL) == [
        (file_limit,)
    ]
    assert query(
        postgres,
        "SELECT count(*) FROM concurrency_slots WHERE concurrency_key = %s AND run_id IS NULL",
        GPU_POOL,
    ) == [(file_limit,)]
