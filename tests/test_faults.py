"""Real faults: the run worker killed mid-training on a real instance with its daemon, and a publish
that dies while the merged model is being written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import duckdb
import psutil
import pytest
import torch
from conftest import write_yaml
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRunStatus,
    RunsFilter,
    instance_for_test,
    materialize,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from ui_browser import ARTIFACTS, REPO, DagsterDev, poll

from assets import PARTITIONED_STAGES, pipeline_assets
from loraflow.artifacts import file_sha256
from loraflow.demo_data import generate_examples, write_demo_data
from loraflow.merge import LATEST
from loraflow.request import read_result
from loraflow.spec import load_spec
from loraflow.train import train_adapter
from pipelines.definitions import pipeline_resources
from pipelines.deployment import deployment_resources
from pipelines.run import run_pipeline, sync_partitions
from resources.trainer import RUN_WATCH_SECONDS

GPU_POOL = "gpu"
STEPS = 100  # long enough that an orphaned training would still be going when it is stopped
KILL_PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
quality:
  max_invalid_fraction: 0.9
format:
  max_seq_len: 128
base_model:
  source: models/tiny-llama
training:
  method: lora
  lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}}
  max_steps: {steps}
  batch_size: 2
  learning_rate: 0.005
  checkpoint_every: 10
  keep_checkpoints: 2
  log_every: 1
schedule:
  watch_files: false   # only the test starts runs here
tracking: none
"""


def run_worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    """The pid the code server logged when it started the run's worker process."""
    for record in instance.all_logs(run_id):
        found = re.search(r"Started process for run \(pid: (\d+)\)", record.message or "")
        if found:
            return int(found.group(1))
    return None


def complete_checkpoints(folder: Path) -> list[int]:
    """Steps of the checkpoints the trainer finished writing (loraflow's marker is written last)."""
    return sorted(
        int(path.name.split("-")[1])
        for path in folder.glob("checkpoint-*")
        if (path / "loraflow_checkpoint.json").exists()
    )


def dataset_dir(home: Path) -> Path:
    """The one training dataset the pipeline built."""
    (folder,) = (path.parent for path in home.glob("datasets/faults/*/train*"))
    return folder


def test_a_killed_run_worker_is_failed_retried_and_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    project, dagster_home = tmp_path / "project", tmp_path / "dagster-home"
    (project / "pipelines").mkdir(parents=True)
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")  # the repository's instance
    shutil.copytree(tiny_model_dir, project / "models" / "tiny-llama")
    write_demo_data(project / "data", n=60, files=1)
    yaml_path = write_yaml(project / "pipelines", "faults", KILL_PIPELINE.format(steps=STEPS))
    home = project / ".loraflow"
    spec = load_spec(yaml_path)
    key = AssetKey(["faults", "adapter"])

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        for partition in sync_partitions(spec, instance, pipeline_resources(home)).to_ingest:
            materialize(
                pipeline_assets(spec),
                selection=[AssetKey(["faults", s]) for s in PARTITIONED_STAGES],
                partition_key=partition,
                instance=instance,
                resources=pipeline_resources(home),
            )
        materialize(
            pipeline_assets(spec),
            selection=[AssetKey(["faults", s]) for s in ("base_model", "training_dataset")],
            instance=instance,
            resources=pipeline_resources(home),
        )

    env = {"LORAFLOW_PIPELINES": str(project / "pipelines"), "LORAFLOW_HOME": str(home)}
    with DagsterDev(dagster_home, ARTIFACTS.parent / "faults" / "dagster-dev.log", env) as dev:
        dev.wait_until_loaded(timeout=180)
        run_id = dev.api.launch_assets([key.path])  # through the run queue, as the UI launches it
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            pid = poll("the run worker", lambda: run_worker_pid(instance, run_id), timeout=120)
            poll(
                "a checkpoint",
                lambda: (
                    next(iter(home.glob("**/*.checkpoints")), None)
                    and complete_checkpoints(next(home.glob("**/*.checkpoints")))
                ),
                timeout=240,
                interval=0.05,
            )
            folder = next(home.glob("**/*.checkpoints"))
            # kill -9 the run worker alone, as the OOM killer or an operator would
            steps = psutil.Process(pid).children(recursive=True)  # its step processes, training
            os.kill(pid, signal.SIGKILL)
            # its orphaned training notices the run is over and ends before the slot is given away
            gone, alive = psutil.wait_procs(steps, timeout=3 * RUN_WATCH_SECONDS + 10)
            assert alive == [], f"step processes still running after their run worker died: {alive}"
            kept = complete_checkpoints(folder)
            adapter_dir = folder.with_name(folder.name.removesuffix(".checkpoints"))
            assert not (adapter_dir / "adapter_model.safetensors").exists(), "the orphan finished training"
            assert kept and max(kept) < STEPS, f"training reached its end despite the kill: {kept}"

            # the code server that started the worker sees it gone and fails the run
            assert dev.api.wait_for_run(run_id, timeout=120) == "FAILURE", dev.log_tail()
            crash = "\n".join(record.message or "" for record in instance.all_logs(run_id))
            assert f"Run execution process for {run_id} was terminated by signal 9 (SIGKILL)" in crash

            # the daemon retries it (a dead worker is not an asset's failure), the retry waits for
            # the "gpu" slot the dead step held until run monitoring frees it, and resumes
            def retry():
                runs = instance.get_runs(RunsFilter(tags={"dagster/parent_run_id": run_id}))
                return runs[0] if runs else None

            again = poll("the retry run", retry, timeout=120)
            status = dev.api.wait_for_run(again.run_id, timeout=300)
            assert status == "SUCCESS", "\n".join(dev.api.run_errors(again.run_id)) + dev.log_tail()
            logs = "\n".join(record.message or "" for record in instance.all_logs(again.run_id))
            assert f"resuming from the checkpoint at step {max(kept)}" in logs
            record = instance.get_latest_materialization_event(key).asset_materialization
            assert record.metadata["resumed_from_step"].value == max(kept)
            adapter_dir = Path(record.metadata["path"].value)

            info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
            assert info.claimed_slots == [] and info.pending_steps == []  # the slot is free again
            assert instance.get_run_by_id(again.run_id).status == DagsterRunStatus.SUCCESS

    # the same adapter as a training that was never interrupted
    straight = train_adapter(
        spec.training, project / "models" / "tiny-llama", dataset_dir(home), tmp_path / "straight"
    )
    resumed, reference = (
        load_file(adapter_dir / "adapter_model.safetensors"),
        load_file(Path(straight.adapter_dir) / "adapter_model.safetensors"),
    )
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6)
    steps, losses = zip(*read_result(adapter_dir).loss_curve, strict=True)
    assert list(steps) == list(range(1, STEPS + 1))
    assert list(losses) == pytest.approx([loss for _, loss in straight.loss_curve], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# a disk that fills while the merged model is being written

PUBLISH_PIPELINE = """
data:
  sources:
    - {{path: data/train.jsonl, format: alpaca, split: train}}
    - {{path: data/heldout.jsonl, format: alpaca, split: eval}}
base_model:
  source: {model}
training:
  method: lora
  lora: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
  max_steps: 20
  batch_size: 8
  learning_rate: 1.0e-2
evaluation:
  max_examples: 16
  max_new_tokens: 4
  forgetting: {{enabled: false}}
  gate:
    metric: eval_loss
    min_improvement: 0.1
publish:
  dtype: {dtype}
tracking: none
"""


def mount_tmpfs(folder: Path, megabytes: int, remount: bool = False) -> None:
    """A real small disk: a tmpfs of `megabytes` at `folder` (root only)."""
    options = f"{'remount,' if remount else ''}size={megabytes}m"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)


def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(tempfile.mkdtemp(prefix="loraflow-mount-probe-"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True
        )
        if done.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], check=True)
        return True
    finally:
        probe.rmdir()


def warehouse_snapshot(path: Path) -> dict[str, list]:
    """Every row of every warehouse table, sorted: what must not change."""
    with duckdb.connect(str(path), read_only=True) as con:
        tables = con.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
        return {
            f"{schema}.{name}": sorted(
                map(repr, con.execute(f'SELECT * FROM "{schema}"."{name}"').fetchall())
            )
            for schema, name in tables
        }


def tree(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def used_megabytes(folder: Path) -> int:
    usage = shutil.disk_usage(folder)
    return -(-usage.used // 2**20)


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs as the full disk")
def test_a_disk_that_fills_while_the_model_is_written_publishes_nothing_and_a_later_publish_succeeds(
    project, tiny_model_dir
):
    examples = generate_examples(100, seed=3)
    for name, rows in (("train", examples[:80]), ("heldout", examples[80:])):
        (project / "data" / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in rows))
    home = project / ".loraflow"
    models = home / "models" / "triage"
    models.mkdir(parents=True)
    mount_tmpfs(models, 64)  # the published models on a disk of their own
    try:
        with instance_for_test() as instance:
            yaml_path = write_yaml(
                project / "pipelines",
                "triage",
                PUBLISH_PIPELINE.format(model=tiny_model_dir, dtype="float32"),
            )
            first = run_pipeline(load_spec(yaml_path), instance, home)
            assert first["success"], first
            version = first["published"]["version"]
            published, stored = tree(models / version), warehouse_snapshot(home / "warehouse.duckdb")

            # the disk now has 2 MB left; the same adapter published in float16 (another version,
            # its weights alone 6 MB) fills it while the merged model is written
            mount_tmpfs(models, used_megabytes(models) + 2, remount=True)
            spec = load_spec(
                write_yaml(
                    project / "pipelines",
                    "triage",
                    PUBLISH_PIPELINE.format(model=tiny_model_dir, dtype="float16"),
                )
            )
            publish = [AssetKey(["triage", "published_model"])]
            failed = materialize(
                pipeline_assets(spec),
                selection=publish,
                instance=instance,
                resources=deployment_resources(home),
                raise_on_error=False,
            )
            assert not failed.success
            (step_failure,) = [e for e in failed.all_events if e.is_step_failure]
            assert step_failure.step_key == "triage__published_model"
            assert "No space left on device" in str(step_failure.step_failure_data.error)
            assert (models / LATEST).read_text().strip() == version  # readers still get the first
            assert sorted(p.name for p in models.iterdir()) == sorted([LATEST, version])  # nothing partial
            assert tree(models / version) == published
            assert warehouse_snapshot(home / "warehouse.duckdb") == stored
            assert instance.get_latest_materialization_event(publish[0]).run_id == first["run_id"]

            # room again, and the same publish succeeds
            mount_tmpfs(models, 64, remount=True)
            again = materialize(
                pipeline_assets(spec),
                selection=publish,
                instance=instance,
                resources=deployment_resources(home),
            )
            assert again.success
            latest = (models / LATEST).read_text().strip()
            assert latest != version
            assert sorted(p.name for p in models.iterdir()) == sorted([LATEST, version, latest])
            assert tree(models / version) == published
            model = AutoModelForCausalLM.from_pretrained(models / latest)  # a whole model, in float16
            assert model.dtype == torch.float16
    finally:
        # lazily: the test's process may still map a published model's weights
        subprocess.run(["umount", "--lazy", str(models)], check=False)
