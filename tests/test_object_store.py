"""The warehouse and the artifact store on a real S3 API: moto's S3 server, started on a free local
port, stands in for MinIO or S3 and speaks the same REST API over HTTP. The pipeline reaches it only
through s3fs and DuckDB, configured as a deployment is (a resources YAML with `endpoint_url` in
`storage_options`, credentials in AWS_* variables), and a published model is read back from the
bucket with nothing but fsspec and transformers."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from conftest import secret_leaks, write_yaml
from dagster import AssetKey, instance_for_test, materialize
from moto.server import ThreadedMotoServer

from assets import pipeline_assets
from loraflow.artifacts import file_sha256, folder_sha256
from loraflow.demo_data import write_demo_data
from loraflow.mirror import MARKER
from loraflow.spec import load_spec
from loraflow.validate import partition_counts
from pipelines.deployment import DEPLOYMENT_ENV, DeploymentError, deployment_resources
from pipelines.run import run_pipeline
from resources import ArtifactStore, Warehouse

BUCKET = "loraflow-test"
# the storage secret the runs sign their requests with: it must appear in nothing they leave behind
SECRET_KEY = "loraflow-test-secret-7c1e9b42d5"
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
  max_steps: 3
  batch_size: 4
  learning_rate: 1.0e-2
evaluation:
  max_examples: 4
  max_new_tokens: 4
  forgetting: {{enabled: false}}
  gate: {{must_beat_published: {must_beat_published}}}
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""
TABLES = ("raw_examples", "validated_examples", "quarantine")


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free port of 127.0.0.1, with dummy credentials in the environment."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "loraflow-test")
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        requests_log = logging.getLogger("werkzeug")
        level = requests_log.level
        requests_log.setLevel(logging.WARNING)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            requests_log.setLevel(level)


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> s3fs.S3FileSystem:
    """The test's bucket, and a client of its own (no listing cache shared with the pipeline's)."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(BUCKET)
    return fs


def write_deployment(folder: Path, endpoint: str, root: Path) -> Path:
    """A resources YAML as a cluster has it: warehouse and store on the bucket, `root` the working copy."""
    on_s3 = {"storage_options": {"endpoint_url": endpoint}}
    path = folder / "resources.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "warehouse": {"url": f"s3://{BUCKET}/warehouse", **on_s3},
                "store": {"root": str(root), "url": f"s3://{BUCKET}/store", **on_s3},
            }
        )
    )
    return path


def make_pipeline(project: Path, model: Path, must_beat_published: bool = False):
    return load_spec(
        write_yaml(
            project / "pipelines",
            "triage",
            PIPELINE.format(model=model, must_beat_published=str(must_beat_published).lower()),
        )
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory, s3_endpoint, bucket, tiny_model_dir):
    """The demo data's two files through ingest, validate, dataset, train, evaluate and publish, with
    the warehouse and the store on the bucket; (project, working copy, the run's result)."""
    project = tmp_path_factory.mktemp("s3-project")
    (project / "pipelines").mkdir()
    write_demo_data(project / "data", n=40, files=2)
    spec = make_pipeline(project, tiny_model_dir)
    home = project / "working-copy"
    with pytest.MonkeyPatch.context() as env:
        env.setenv(DEPLOYMENT_ENV, str(write_deployment(project, s3_endpoint, home)))
        with instance_for_test() as instance:
            result = run_pipeline(spec, instance, home)
            leaks = secret_leaks(SECRET_KEY, [home, Path(instance.root_directory)], instance)
    assert result["success"], result
    assert leaks == []  # run logs, metadata, manifests, model card, training record, instance storage
    return project, home, result


def test_the_storage_secret_is_in_nothing_the_runs_wrote_to_the_bucket(published, bucket, tmp_path):
    bucket.get(f"{BUCKET}/", str(tmp_path / "bucket"), recursive=True)
    assert any((tmp_path / "bucket").rglob("*.parquet")) and any((tmp_path / "bucket").rglob("README.md"))
    assert secret_leaks(SECRET_KEY, [tmp_path / "bucket"]) == []


def test_the_bucket_holds_the_warehouse_partitions_and_a_published_model_that_loads_back(
    published, bucket, s3_endpoint, tmp_path
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    project, home, result = published
    version = result["published"]["version"]
    spec = load_spec(project / "pipelines" / "triage.yaml")

    # the warehouse: one Parquet object per table and source file, holding that file's rows
    warehouse = Warehouse(url=f"s3://{BUCKET}/warehouse", storage_options={"endpoint_url": s3_endpoint})
    first, second = sorted(spec.partitions())
    with warehouse.connect() as con:
        counts = {
            p: dict(zip(TABLES, partition_counts(con, "triage", p), strict=True)) for p in (first, second)
        }
    assert counts[first]["quarantine"] == 0 < counts[second]["quarantine"]  # broken lines: last file only
    expected = {
        f"{BUCKET}/warehouse/triage/{table}/partition={quote(p, safe='')}.parquet": (p, counts[p][table])
        for p in (first, second)
        for table in TABLES
        if counts[p][table]
    }
    stored = {p for p in bucket.find(f"{BUCKET}/warehouse") if p.endswith(".parquet")}
    assert stored == set(expected)
    for key, (partition, rows) in expected.items():
        with bucket.open(key, "rb") as handle:
            table = pq.read_table(handle)
        assert table.column("partition").unique().to_pylist() == [partition]
        assert table.num_rows == rows

    # the store: the dataset, the adapter and the published version, each whole, and `latest` naming it
    local = home / "models" / "triage" / version
    remote = f"{BUCKET}/store/models/triage/{version}"
    listing = json.loads(bucket.cat_file(f"{remote}/{MARKER}"))["files"]
    files = {
        p.relative_to(local).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in local.rglob("*")
        if p.is_file()
    }
    assert listing == files and "model.safetensors" in files and "adapter/adapter_model.safetensors" in files
    assert bucket.cat_file(f"{BUCKET}/store/models/triage/latest").decode().strip() == version
    manifests = {
        name: json.loads((home / "manifests" / "triage" / f"{name}.json").read_text())
        for name in ("training_dataset", "adapter")
    }
    for manifest in manifests.values():
        folder = Path(manifest["path"]).relative_to(home).as_posix()
        assert bucket.exists(f"{BUCKET}/store/{folder}/{MARKER}")
    assert (
        json.loads(bucket.cat_file(f"{BUCKET}/store/manifests/triage/published_model.json"))
        == result["published"]
    )

    # read back from the bucket alone: the same weights as the working copy's, and it generates
    download = tmp_path / "from-bucket"
    bucket.get(f"{remote}/", str(download), recursive=True)
    from_bucket = AutoModelForCausalLM.from_pretrained(download)
    published_here = AutoModelForCausalLM.from_pretrained(local)
    theirs, ours = from_bucket.state_dict(), published_here.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[name], ours[name]) for name in ours)
    tokenizer = AutoTokenizer.from_pretrained(download)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "My invoice is wrong."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        generated = from_bucket.generate(**ids, **options)
        assert torch.equal(generated, published_here.generate(**ids, **options))
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4


def test_a_machine_without_the_working_copy_evaluates_from_the_bucket_against_the_published_model(
    published, s3_endpoint, tiny_model_dir, tmp_path
):
    project, home, result = published
    version = result["published"]["version"]
    (tmp_path / "pipelines").mkdir()
    spec = make_pipeline(tmp_path, tiny_model_dir, must_beat_published=True)
    # another machine: the same root (every machine's resources name the same), nothing in it yet
    first_machine = home.with_name("first-machine")
    home.rename(first_machine)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv(DEPLOYMENT_ENV, str(write_deployment(tmp_path, s3_endpoint, home)))
            resources = deployment_resources(home)
        with instance_for_test() as instance:
            run = materialize(
                pipeline_assets(spec),
                selection=[AssetKey(["triage", "evaluation"])],
                instance=instance,
                resources=resources,
            )
        assert run.success
        evaluation = json.loads((home / "manifests" / "triage" / "evaluation.json").read_text())
        assert evaluation["published"] is not None  # the gate compared with the version the bucket names
        assert (home / "models" / "triage" / "latest").read_text().strip() == version
        # what the evaluation read came down whole: the same files as on the machine that wrote them
        for name in ("training_dataset", "adapter"):
            manifest = json.loads((first_machine / "manifests" / "triage" / f"{name}.json").read_text())
            relative = Path(manifest["path"]).relative_to(home)
            assert (home / relative).is_dir()
            assert folder_sha256(home / relative) == folder_sha256(first_machine / relative)
        published_folder = Path("models") / "triage" / version
        assert folder_sha256(home / published_folder) == folder_sha256(first_machine / published_folder)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        first_machine.rename(home)


def test_a_folder_whose_upload_did_not_finish_is_never_downloaded(bucket, s3_endpoint, tmp_path):
    store = ArtifactStore(
        root=str(tmp_path / "working-copy"),
        url=f"s3://{BUCKET}/unfinished",
        storage_options={"endpoint_url": s3_endpoint},
    )
    # what an upload that died halfway leaves: files of the version, no completion marker
    bucket.pipe_file(f"{BUCKET}/unfinished/adapters/triage/v1/adapter_config.json", b"{}")
    target = store.path("adapters", "triage", "v1")
    with pytest.raises(FileNotFoundError, match="holds no complete copy"):
        store.fetch(target)
    assert not target.exists()

    # a finished upload comes down; an upload of the same folder again replaces it, whole
    finished = store.folder("adapters", "triage", "v2")
    (finished / "adapter_config.json").write_text('{"r": 4}')
    store.upload(finished)
    (finished / "adapter_config.json").write_text('{"r": 16}')
    (finished / "README.md").write_text("retrained")
    store.upload(finished)
    other = ArtifactStore(root=str(tmp_path / "other"), url=store.url, storage_options=store.storage_options)
    fetched = other.fetch(other.path("adapters", "triage", "v2"))
    assert sorted(p.name for p in fetched.iterdir()) == ["README.md", "adapter_config.json"]
    assert (fetched / "adapter_config.json").read_text() == '{"r": 16}'  # the marker stays on the bucket


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "store: {url: 'nosuch://bucket/store'}\n",
            "store.url: Value error, nosuch://bucket/store: fsspec knows no protocol 'nosuch'",
        ),
        (
            "store: {url: 's3://bucket/store'}\nio_manager: {root: /tmp/elsewhere}\n",
            "io_manager.url None is not store.url s3://bucket/store",
        ),
    ],
)
def test_a_store_url_that_cannot_work_fails_at_load_naming_the_key(monkeypatch, tmp_path, text, message):
    path = tmp_path / "resources.yaml"
    path.write_text(text)
    monkeypatch.setenv(DEPLOYMENT_ENV, str(path))
    with pytest.raises(DeploymentError) as error:
        deployment_resources(tmp_path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
