"""The scale-out path, checked without a cluster: deploy/dagster.yaml builds the instance Dagster
would run, deploy/resources.yaml the resources, and the warehouse on object storage holds each
pipeline's tables as one Parquet object per partition, with the real assets running on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_yaml
from dagster import AssetKey, DagsterInstance, EnvVar, instance_for_test, materialize
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_k8s import K8sRunLauncher
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.utils import pg_url_from_config
from sqlalchemy.engine import make_url

from assets import PARTITIONED_STAGES, pipeline_assets, source_partitions
from loraflow.demo_data import write_demo_data
from loraflow.ingest import ingest_file
from loraflow.spec import PipelineSpec, SourceSpec, TrainingSpec, load_spec
from loraflow.validate import partition_counts
from pipelines.deployment import DEPLOYMENT_ENV, DeploymentError, default_resources, deployment_resources
from pipelines.run import sync_partitions
from resources import TrainRequest, Warehouse
from resources.trainer import worker_pod_spec

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CLUSTER_ENV = {
    "DAGSTER_PG_HOST": "db.example",
    "DAGSTER_PG_PORT": "6432",
    "DAGSTER_PG_USER": "loraflow",
    "DAGSTER_PG_PASSWORD": "p@ss",
    "DAGSTER_PG_DB": "dagster",
    "LORAFLOW_IMAGE": "registry.example.com/loraflow:1.0",
    "LORAFLOW_WAREHOUSE_URL": "s3://ml-data/loraflow/warehouse",
}
PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
quality:
  max_invalid_fraction: 0.5
  max_response_chars: {max_response_chars}
format:
  chat_template: chatml
  eval_size: 0.2
base_model:
  source: {model}
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""
TABLES = ("raw_examples", "validated_examples", "quarantine")


@pytest.fixture
def cluster_env(monkeypatch):
    for name, value in CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # read by uploading runs only, never at load


def throwaway_kubeconfig(folder: Path) -> Path:
    """A kubeconfig for a cluster that does not exist: the launcher loads it and never calls it."""
    path = folder / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "none", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "nobody", "user": {"token": "unused"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "nobody"}}],
        "current-context": "none",
    }
    path.write_text(yaml.safe_dump(config))
    return path


# ---------------------------------------------------------------------------------------------
# deploy/dagster.yaml


def test_the_cluster_instance_config_builds_the_k8s_launcher_the_queue_limits_and_the_gpu_pool(
    cluster_env, tmp_path
):
    config, _ = dagster_instance_config(str(DEPLOY))  # what Dagster runs on every dagster.yaml it loads
    launcher = config["run_launcher"]
    # no cluster here: the launcher reads a throwaway kubeconfig instead of its pod's service account,
    # and SQLite stands in for Postgres (its config is resolved in the next test)
    overrides = {
        "storage": {"sqlite": {"base_dir": str(tmp_path / "history")}},
        "run_launcher": {
            **launcher,
            "config": {
                **launcher["config"],
                "load_incluster_config": False,
                "kubeconfig_file": str(throwaway_kubeconfig(tmp_path)),
            },
        },
    }
    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(DEPLOY), overrides=overrides)
    with DagsterInstance.from_ref(ref) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, K8sRunLauncher)
        assert launcher.job_image == CLUSTER_ENV["LORAFLOW_IMAGE"]
        assert launcher.job_namespace == "loraflow"
        assert launcher.instance_config_map and launcher.service_account_name
        assert launcher.postgres_password_secret  # run pods get DAGSTER_PG_PASSWORD from it
        # run pods mount the artifact store where the resources file says it is
        resources_file = yaml.safe_load((DEPLOY / "resources.yaml").read_text())
        (mount,) = launcher.volume_mounts
        assert mount["mount_path"] == resources_file["store"]["root"]
        assert resources_file["trainer"]["kubernetes"]["store_mount_path"] == mount["mount_path"]
        (volume,) = launcher.volumes
        assert volume["name"] == mount["name"]
        assert (
            volume["persistent_volume_claim"]["claim_name"]
            == resources_file["trainer"]["kubernetes"]["store_claim"]
        )

        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        concurrency = instance.get_concurrency_config()
        queue = concurrency.run_queue_config
        (backfills,) = [limit for limit in queue.tag_concurrency_limits if limit["key"] == "dagster/backfill"]
        assert "value" not in backfills  # every backfill run counts, whatever its backfill id
        assert 0 < backfills["limit"] < queue.max_concurrent_runs  # slots stay free for training
        assert concurrency.pool_config.default_pool_limit >= 1  # the "gpu" pool of the training step

        monitoring = instance.run_monitoring_settings
        assert monitoring["enabled"] and monitoring["free_slots_after_run_end_seconds"] > 0
        assert monitoring["max_runtime_seconds"] >= 6 * 3600
        assert monitoring.get("max_resume_run_attempts", 0) == 0
        assert not instance.telemetry_enabled
        assert instance.managed_python_loggers == ["loraflow"]


def test_the_cluster_instance_keeps_its_history_in_postgres_named_by_the_environment(cluster_env, tmp_path):
    storage = InstanceRef.from_dir(str(tmp_path), config_dir=str(DEPLOY)).storage_data
    assert (storage.module_name, storage.class_name) == ("dagster_postgres", "DagsterPostgresStorage")
    # resolved as the storage resolves it when the instance starts; nothing connects
    resolved = process_config(DagsterPostgresStorage.config_type(), yaml.safe_load(storage.config_yaml))
    assert resolved.success, resolved.errors
    url = pg_url_from_config(resolved.value)
    assert url == "postgresql+psycopg2://loraflow:p%40ss@db.example:6432/dagster"
    # the driver it names is installed: SQLAlchemy 2.1 would take a bare postgresql:// for psycopg 3
    make_url(url).get_dialect().import_dbapi()


# ---------------------------------------------------------------------------------------------
# deploy/resources.yaml


def test_the_cluster_resources_train_in_a_gpu_pod_and_keep_tables_on_object_storage(
    cluster_env, monkeypatch, tmp_path
):
    monkeypatch.setenv(DEPLOYMENT_ENV, str(DEPLOY / "resources.yaml"))
    resources = deployment_resources(tmp_path)
    assert set(resources) == {"warehouse", "store", "trainer", "io_manager", "hub"}
    assert resources["warehouse"].url == CLUSTER_ENV["LORAFLOW_WAREHOUSE_URL"]
    assert resources["store"].root == resources["io_manager"].root == "/mnt/loraflow"
    token = resources["hub"].token
    assert isinstance(token, EnvVar) and token.env_var_name == "HF_TOKEN"

    trainer = resources["trainer"]
    assert trainer.mode == "kubernetes"
    store = resources["store"].root
    request = TrainRequest(
        training=TrainingSpec(),
        base_model_dir=f"{store}/base_models/llama",
        dataset_dir=f"{store}/datasets/triage/v1",
        adapter_dir=f"{store}/adapters/triage/v1",
    )
    pod = worker_pod_spec(trainer.kubernetes, request, trainer.env)
    (container,) = pod["containers"]
    assert container["image"] == CLUSTER_ENV["LORAFLOW_IMAGE"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "artifact-store", "persistentVolumeClaim": {"claimName": "loraflow-store"}} in pod[
        "volumes"
    ]
    assert {"name": "artifact-store", "mountPath": store} in container["volumeMounts"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]


def test_without_a_deployment_file_everything_stays_under_the_home(monkeypatch, tmp_path):
    monkeypatch.delenv(DEPLOYMENT_ENV, raising=False)
    resources = deployment_resources(tmp_path)
    assert resources["warehouse"].url is None
    assert resources["warehouse"].path == str(tmp_path / "warehouse.duckdb")
    assert resources["store"].root == resources["io_manager"].root == str(tmp_path)
    assert resources["trainer"].mode == "in_process"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "trainer:\n  kubernetes:\n    gpuz: 2\n",
            "unknown key trainer.kubernetes.gpuz; KubernetesSettings takes:",
        ),
        ("warehuose:\n  url: memory://x\n", "unknown resource 'warehuose'"),
        ("trainer:\n  mode: slurm\n", "trainer.mode: Input should be 'in_process'"),
        (
            "trainer:\n  kubernetes: {gpus: many}\n",
            "trainer.kubernetes.gpus: Input should be a valid integer",
        ),
        (
            "warehouse:\n  url: {env: LORAFLOW_TEST_UNSET}\n",
            "warehouse.url reads the environment variable LORAFLOW_TEST_UNSET, which is not set",
        ),
        ("hub:\n  token: hf_abcdef\n", "hub.token is a secret: write {env: NAME}"),
        (
            "store: {root: /data/loraflow}\ntrainer:\n  mode: kubernetes\n  kubernetes: {store_mount_path: /mnt/loraflow}\n",
            "store.root /data/loraflow is not on trainer.kubernetes.store_mount_path /mnt/loraflow",
        ),
    ],
)
def test_a_mistake_in_the_resources_file_fails_at_load_naming_the_file_and_the_key(
    monkeypatch, tmp_path, text, message
):
    path = tmp_path / "resources.yaml"
    path.write_text(text)
    monkeypatch.setenv(DEPLOYMENT_ENV, str(path))
    monkeypatch.delenv("LORAFLOW_TEST_UNSET", raising=False)
    with pytest.raises(DeploymentError) as error:
        deployment_resources(tmp_path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------
# the warehouse on object storage


def source_file(folder: Path, name: str, outputs: list[str]) -> Path:
    path = folder / name
    path.write_text("".join(json.dumps({"instruction": "Classify.", "output": o}) + "\n" for o in outputs))
    return path


def stored_rows(warehouse: Warehouse) -> dict[str, list[str]]:
    with warehouse.connect() as con:
        rows = con.execute("SELECT partition, record FROM p.raw_examples ORDER BY ALL").fetchall()
    stored: dict[str, list[str]] = {}
    for partition, record in rows:
        stored.setdefault(partition, []).append(json.loads(record)["output"])
    return stored


@pytest.fixture
def memory_warehouse(tmp_path):
    """A warehouse in fsspec's in-process memory filesystem, emptied after the test."""
    yield Warehouse(url=f"memory://{tmp_path.name}/warehouse")
    memory = fsspec.filesystem("memory")
    if memory.exists(f"/{tmp_path.name}"):
        memory.rm(f"/{tmp_path.name}", recursive=True)


def test_concurrent_runs_on_different_partitions_keep_both_and_on_one_partition_the_last_wins(
    memory_warehouse, tmp_path
):
    warehouse = memory_warehouse
    any_source = SourceSpec(path="*")
    a1 = source_file(tmp_path, "a1.jsonl", ["a, first version"])
    a2 = source_file(tmp_path, "a2.jsonl", ["a, second version", "with two lines"])
    a3 = source_file(tmp_path, "a3.jsonl", ["a, third version"])
    b = source_file(tmp_path, "b.jsonl", ["b"])

    with warehouse.connect() as first, warehouse.connect() as second:  # both load before either writes
        ingest_file(first, "p", "a", a1, any_source)
        ingest_file(second, "p", "b", b, any_source)
    assert stored_rows(warehouse) == {"a": ["a, first version"], "b": ["b"]}

    with warehouse.connect() as first:
        with warehouse.connect() as second:
            ingest_file(second, "p", "a", a2, any_source)
            ingest_file(first, "p", "a", a3, any_source)
        assert stored_rows(warehouse) == {"a": ["a, second version", "with two lines"], "b": ["b"]}
    # the first run finished last: partition "a" is its version, whole; "b" was never touched
    assert stored_rows(warehouse) == {"a": ["a, third version"], "b": ["b"]}


def test_a_block_that_fails_writes_nothing_back(memory_warehouse, tmp_path):
    warehouse = memory_warehouse
    path = source_file(tmp_path, "a.jsonl", ["a"])
    with pytest.raises(RuntimeError, match="step failed"), warehouse.connect() as con:
        ingest_file(con, "p", "a", path, SourceSpec(path="*"))
        raise RuntimeError("step failed")
    with warehouse.connect() as con:
        assert con.execute("SELECT count(*) FROM duckdb_tables()").fetchone() == (0,)
    assert not fsspec.filesystem("memory").find(f"/{tmp_path.name}")


def make_pipeline(
    project: Path, model: str | Path = "smollm2-135m-instruct", max_response_chars: int = 4000
) -> PipelineSpec:
    """The pipeline `triage` over data/*.jsonl; the base model is only loaded by training_dataset."""
    path = write_yaml(
        project / "pipelines", "triage", PIPELINE.format(model=model, max_response_chars=max_response_chars)
    )
    return load_spec(path)


def lake_objects(lake: Path) -> dict[str, tuple[int, int]]:
    """Each Parquet object's path under the lake -> (inode, mtime): a rewrite changes them."""
    return {
        path.relative_to(lake).as_posix(): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in lake.rglob("*.parquet")
    }


def object_path(table: str, partition: str) -> str:
    return f"triage/{table}/partition={quote(partition, safe='')}.parquet"


@pytest.fixture(scope="module")
def demo_warehouses(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """The demo data's two files ingested and validated through the real assets twice: into a lake
    in a file:// folder, and into a DuckDB file; (project, resources by warehouse kind)."""
    project = tmp_path_factory.mktemp("lake-project")
    (project / "pipelines").mkdir()
    write_demo_data(project / "data", n=40, files=2)
    spec = make_pipeline(project)
    resources = {
        "lake": {
            **default_resources(project / "lake-home"),
            "warehouse": Warehouse(url=(project / "lake").as_uri()),
        },
        "file": default_resources(project / "file-home"),
    }
    for kind in resources.values():
        with instance_for_test() as instance:
            for partition in sync_partitions(spec, instance, kind).to_ingest:
                materialize(
                    pipeline_assets(spec),
                    selection=[AssetKey([spec.name, stage]) for stage in PARTITIONED_STAGES],
                    partition_key=partition,
                    instance=instance,
                    resources=kind,
                )
    return project, resources


def copy_of(project: Path, folder: Path) -> tuple[PipelineSpec, dict]:
    """The project's data and lake copied into `folder`, for a test that changes them; (spec, resources)."""
    for part in ("data", "lake"):
        shutil.copytree(project / part, folder / part)
    (folder / "pipelines").mkdir()
    resources = {**default_resources(folder / "home"), "warehouse": Warehouse(url=(folder / "lake").as_uri())}
    return make_pipeline(folder), resources


def test_the_lake_holds_one_object_per_partition_and_revalidating_rewrites_only_that_partitions(
    demo_warehouses, tmp_path
):
    project, resources = demo_warehouses
    spec = make_pipeline(project)
    first, second = sorted(spec.partitions())
    with resources["lake"]["warehouse"].connect() as con:
        counts = {
            p: dict(zip(TABLES, partition_counts(con, spec.name, p), strict=True)) for p in (first, second)
        }
    assert counts[first]["quarantine"] == 0 < counts[second]["quarantine"]  # broken lines: last file only
    expected = {object_path(t, p): (t, p) for p in (first, second) for t in TABLES if counts[p][t]}
    assert set(lake_objects(project / "lake")) == set(expected)
    for path, (table, partition) in expected.items():  # each object holds its partition, all of it
        stored = pq.read_table(project / "lake" / path)
        assert stored.column("partition").unique().to_pylist() == [partition]
        assert stored.num_rows == counts[partition][table]

    # stricter rules, the first file re-validated: its valid rows shrink and its quarantine appears
    spec, resources = copy_of(project, tmp_path)
    before = lake_objects(tmp_path / "lake")
    stricter = make_pipeline(tmp_path, max_response_chars=95)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(source_partitions(spec).name, [first])
        materialize(
            pipeline_assets(stricter),
            selection=[AssetKey([spec.name, "validated_examples"])],
            partition_key=first,
            instance=instance,
            resources=resources,
        )
    after = lake_objects(tmp_path / "lake")
    changed = {path for path in after if before.get(path) != after[path]}
    assert changed == {object_path("validated_examples", first), object_path("quarantine", first)}
    assert set(after) == set(before) | {object_path("quarantine", first)}


def test_a_deleted_source_file_takes_its_partitions_objects_with_it(demo_warehouses, tmp_path):
    spec, resources = copy_of(demo_warehouses[0], tmp_path)
    first, second = sorted(spec.partitions())
    before = lake_objects(tmp_path / "lake")
    (tmp_path / second).unlink()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(source_partitions(spec).name, [first, second])
        changes = sync_partitions(spec, instance, resources)  # what `python -m pipelines.run` does first
    assert list(changes.removed) == [second]
    after = lake_objects(tmp_path / "lake")
    assert after == {path: stat for path, stat in before.items() if quote(second, safe="") not in path}
    assert len(after) < len(before)
    with resources["warehouse"].connect() as con:
        assert partition_counts(con, spec.name, second) == (0, 0, 0)
        assert partition_counts(con, spec.name, first)[0] > 0


def test_the_training_dataset_from_the_lake_equals_the_one_from_the_duckdb_file(
    demo_warehouses, tiny_model_dir
):
    project, resources = demo_warehouses
    spec = make_pipeline(project, tiny_model_dir)
    lake_before = lake_objects(project / "lake")
    versions = {}
    for kind in ("lake", "file"):
        with instance_for_test() as instance:
            result = materialize(
                pipeline_assets(spec),
                selection=[AssetKey([spec.name, stage]) for stage in ("base_model", "training_dataset")],
                instance=instance,
                resources=resources[kind],
            )
        (dataset,) = [
            e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "training_dataset"
        ]
        versions[kind] = dataset.materialization.tags["dagster/data_version"]
    assert versions["lake"] == versions["file"]
    assert lake_objects(project / "lake") == lake_before  # reading the lake writes nothing back
