"""The whole chain through Dagster on a tiny Llama: from raw files to a published model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import secret_leaks, write_yaml
from dagster import AssetCheckKey, AssetKey, AssetRecordsFilter, instance_for_test

from loraflow.dataset import stored_template
from loraflow.demo_data import write_demo_data
from loraflow.spec import load_spec
from loraflow.templates import NAMED_TEMPLATES
from pipelines.definitions import pipeline_resources
from pipelines.run import run_pipeline, sync_partitions
from pipelines.samples import show

PIPELINE = """
data:
  sources:
    - path: data/*.jsonl
quality:
  max_invalid_fraction: {max_invalid}
format:
  system_prompt: You triage customer messages.
  chat_template: chatml
  packing: true
  eval_size: 0.2
base_model:
  source: {model}
training:
  method: qlora
  lora: {{r: 4, alpha: 8, target_modules: all-linear}}
  max_steps: 3
  batch_size: 4
  learning_rate: 5.0e-3
  log_every: 1
evaluation:
  max_examples: 6
  max_new_tokens: 6
  gate:
    metric: eval_loss
    min_improvement: {min_improvement}
publish:
  hub_repo: {hub_repo}
"""


def make_pipeline(project, tiny_model_dir, max_invalid=0.5, min_improvement=0.05, hub_repo=None):
    write_demo_data(project / "data", n=60)
    path = write_yaml(
        project / "pipelines",
        "triage",
        PIPELINE.format(
            model=tiny_model_dir,
            max_invalid=max_invalid,
            min_improvement=min_improvement,
            hub_repo=hub_repo or "null",
        ),
    )
    return load_spec(path)


def check_result(instance, asset: AssetKey, name: str):
    """The latest evaluation of an asset check: passed, metadata, description."""
    key = AssetCheckKey(asset, name)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return record.event.dagster_event.event_specific_data  # type: ignore[union-attr]


def check_passed(instance, asset: AssetKey, name: str) -> bool:
    key = AssetCheckKey(asset, name)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return record.event.dagster_event.event_specific_data.passed  # type: ignore[union-attr]


def latest_metadata(instance, key: AssetKey, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.fixture
def instance():
    with instance_for_test() as dagster_instance:
        yield dagster_instance


# The planted lines of the demo's second file (loraflow.demo_data.broken_records, in order) and what
# becomes of each: a quarantine reason, kept (the quality rules see nothing wrong with a blank optional
# input or an answer in the wrong format; the gate's format_match does), or dropped as a copy of a
# record in the first file.
# the Hub token of the chain that uploads: it must appear in nothing the run leaves behind
TOKEN = "hf_test_token_5f0c1a9e7d3b2468"

PLANTED = [
    "empty_response",
    "kept",
    "prompt_too_long",
    "missing_field",
    "wrong_type",
    "malformed_json",
    "kept",
    "duplicate_across_files",
]


def test_demo_chain_publishes_a_model_that_loads_and_generates(
    project, tiny_model_dir, instance, store_root, monkeypatch
):
    import duckdb
    import huggingface_hub.constants
    import torch
    from fake_hub import FakeHub
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.demo_data import broken_records

    spec = make_pipeline(project, tiny_model_dir, hub_repo="alice/triage")
    home = project / ".loraflow"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # see fake_hub.py
    with FakeHub() as hub:
        deployment = project / "resources.yaml"
        deployment.write_text(f"hub:\n  token: {{env: HF_TOKEN}}\n  endpoint: {hub.url}\n")
        monkeypatch.setenv("LORAFLOW_DEPLOYMENT", str(deployment))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        outcome = run_pipeline(spec, instance, home)
    assert outcome["success"], outcome

    # nothing lost: every non-blank line of each file is a raw row, and raw = valid + quarantined
    for partition, (path, _) in spec.partitions().items():
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        meta = latest_metadata(instance, AssetKey(["triage", "validated_examples"]), partition)
        assert meta["raw_rows"] == len(lines)
        assert meta["raw_rows"] == meta["valid_rows"] + meta["quarantined_rows"]
        counts = check_result(instance, AssetKey(["triage", "validated_examples"]), "counts_add_up")
        assert counts.passed
    # each planted line got exactly its reason, and nothing else was quarantined
    second = spec.partitions()["data/feedback-2026-11.jsonl"][0]
    line_of = {line: n for n, line in enumerate(second.read_text(encoding="utf-8").splitlines(), start=1)}
    planted = {line_of[line]: fate for line, fate in zip(broken_records(0), PLANTED, strict=True)}
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as con:
        quarantined = dict(con.execute("SELECT record_index, reason FROM triage.quarantine").fetchall())
        valid = {
            r
            for (r,) in con.execute(
                "SELECT record_index FROM triage.validated_examples WHERE partition = 'data/feedback-2026-11.jsonl'"
            ).fetchall()
        }
        across = con.execute(
            "SELECT source_file, record_index FROM triage.duplicates_across_files"
        ).fetchall()
    assert quarantined == {
        n: fate for n, fate in planted.items() if fate not in ("kept", "duplicate_across_files")
    }
    assert {n for n, fate in planted.items() if fate in ("kept", "duplicate_across_files")} <= valid
    assert [(Path(f).name, n) for f, n in across] == [
        ("feedback-2026-11.jsonl", n) for n, fate in planted.items() if fate == "duplicate_across_files"
    ]

    dataset = latest_metadata(instance, AssetKey(["triage", "training_dataset"]))
    assert dataset["train_examples"] > 0 and dataset["eval_examples"] > 0
    assert (
        dataset["train_examples"] + dataset["eval_examples"]
        == sum(
            latest_metadata(instance, AssetKey(["triage", "validated_examples"]), p)["valid_rows"]
            for p in spec.partitions()
        )
        - 1
    )  # the planted copy of a record from the other file
    assert dataset["duplicates_dropped"] == 1
    assert dataset["chat_template"] == "chatml"
    assert 0 < dataset["tokens_p50"] <= dataset["tokens_p99"] <= dataset["tokens_p100"] <= 512
    for check in ("every_example_trains", "end_of_turn_trained", "template_round_trip", "token_lengths"):
        assert check_passed(instance, AssetKey(["triage", "training_dataset"]), check), check
    view = show("triage", home, n=2, split="train", plain=True)
    assert view.count("<|im_end|>]]") == 2 and "You triage customer messages." in view

    adapter = latest_metadata(instance, AssetKey(["triage", "adapter"]))
    assert adapter["steps"] == 3 and adapter["trainable_params"] > 0
    assert adapter["packing"] is True and 0.5 < adapter["packing_efficiency"] <= 1
    # the training is one run in the embedded MLflow store, linked from the adapter's metadata
    from mlflow.tracking import MlflowClient

    assert adapter["tracking"] == "mlflow" and adapter["tracking_run"].endswith(adapter["tracking_run_id"])
    client = MlflowClient(tracking_uri=adapter["tracking_store"])
    run = client.get_run(adapter["tracking_run_id"])
    assert run.info.run_name == Path(adapter["path"]).name and run.data.tags["pipeline"] == "triage"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert str(home / "mlflow") in adapter["tracking_store"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, adapter["path"])
    assert any("lora_A" in name for name, _ in tuned.named_parameters())

    # the gate can fail: the tuned model must lower the held-out loss by 0.05, and it did
    evaluation = outcome["evaluation"]
    gate = check_result(instance, AssetKey(["triage", "evaluation"]), "gate")
    improvement = evaluation["base"]["eval_loss"] - evaluation["tuned"]["eval_loss"]
    assert gate.passed and improvement >= 0.05
    assert gate.metadata["improvement"].value == pytest.approx(improvement)

    published = outcome["published"]["path"]
    fidelity = check_result(instance, AssetKey(["triage", "published_model"]), "merge_fidelity")
    assert fidelity.passed and fidelity.metadata["tolerance"].value == 1e-3  # float32's default
    assert 0 <= fidelity.metadata["merge_max_abs_diff"].value <= 1e-3
    assert fidelity.metadata["reload_max_abs_diff"].value == 0.0  # float32 safetensors reload exactly
    assert fidelity.metadata["probe_prompts"].value == 3
    tokenizer = AutoTokenizer.from_pretrained(published)
    merged = AutoModelForCausalLM.from_pretrained(published, use_safetensors=True)
    # serving renders exactly what training saw: one template from dataset to adapter to published model
    template = stored_template(dataset["path"])
    assert (
        template == NAMED_TEMPLATES["chatml"] != AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    )
    assert AutoTokenizer.from_pretrained(adapter["path"]).chat_template == template == tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "My parcel is late."}], tokenize=False, add_generation_prompt=True
    )
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = merged.generate(**encoded, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > encoded["input_ids"].shape[1]

    # the published folder went to the hub in one commit, its weights through LFS
    uploaded = latest_metadata(instance, AssetKey(["triage", "hub_model"]))
    assert uploaded["version"] == outcome["published"]["version"]
    assert uploaded["repo_url"] == f"{hub.url}/alice/triage" and len(hub.commits) == 1
    on_disk = {
        p.relative_to(published).as_posix(): p.read_bytes() for p in Path(published).rglob("*") if p.is_file()
    }
    assert hub.repos["alice/triage"] == on_disk
    assert len(hub.lfs_uploads) == 2  # the merged weights and the adapter's

    # a second run ingests nothing unless files or rules changed
    resources = pipeline_resources(home)
    assert sync_partitions(spec, instance, resources).to_ingest == []
    stricter = spec.model_copy(update={"quality": spec.quality.model_copy(update={"max_prompt_chars": 500})})
    assert sync_partitions(stricter, instance, resources).to_ingest == sorted(spec.partitions())

    card = (home / "models" / "triage" / outcome["published"]["version"] / "README.md").read_text()
    assert "base_model:" in card and "| eval_loss |" in card
    # source files named as the YAML names them, relative to the project root, never this machine's paths
    assert all(f"| {partition} |" in card for partition in spec.partitions())
    assert str(project) not in card
    assert (home / "models" / "triage" / "latest").read_text().strip() == outcome["published"]["version"]

    # the token the upload used is nowhere in what the run left: logs, metadata, manifests, model
    # card, training record, MLflow store, warehouse, the instance's own storage
    assert secret_leaks(TOKEN, [home, Path(instance.root_directory)], instance) == []


def test_too_many_invalid_rows_stop_the_run_before_training(project, tiny_model_dir, instance):
    spec = make_pipeline(project, tiny_model_dir, max_invalid=0.05)
    outcome = run_pipeline(spec, instance, project / ".loraflow")
    assert not outcome["success"]
    assert outcome["failed_at"] == "partition data/feedback-2026-11.jsonl"
    check_key = AssetCheckKey(AssetKey(["triage", "validated_examples"]), "quality_suite")
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key([check_key])[check_key]
    evaluation = check.event.dagster_event.event_specific_data  # type: ignore[union-attr]
    assert evaluation.passed is False
    assert "quarantined, over the limit of 5%" in evaluation.description
    assert evaluation.metadata["gx_success"].value is False
    assert instance.get_latest_materialization_event(AssetKey(["triage", "adapter"])) is None
    # a later run does not train on the rejected file either
    again = run_pipeline(spec, instance, project / ".loraflow")
    assert not again["success"] and again["evaluation"] is None
    failure = next(
        e for e in instance.all_logs(again["run_id"]) if e.dagster_event and e.dagster_event.is_step_failure
    )
    message = failure.dagster_event.step_failure_data.error.message
    assert "over quality.max_invalid_fraction (5%): data/feedback-2026-11.jsonl (" in message


def test_a_malformed_file_fails_its_partition_with_the_file_and_where_it_breaks(
    project, tiny_model_dir, instance
):
    (project / "data" / "drop.json").write_text(
        '[{"instruction": "a", "output": "b"},\n {"instruction": "c",'
    )
    path = write_yaml(
        project / "pipelines",
        "triage",
        f"data:\n  sources:\n    - path: data/*.json\nbase_model:\n  source: {tiny_model_dir}\n",
    )
    outcome = run_pipeline(load_spec(path), instance, project / ".loraflow")
    assert outcome == {"success": False, "failed_at": "partition data/drop.json"}
    failure = next(
        e
        for run in instance.get_runs()
        for e in instance.all_logs(run.run_id)
        if e.dagster_event and e.dagster_event.is_step_failure
    )
    error = failure.dagster_event.step_failure_data.error
    assert error.cls_name == "Failure"  # a message for people, not a stack trace from inside a library
    assert "data/drop.json: is not valid JSON at line 2, column" in error.message
    assert "write one JSON object per line as .jsonl" in error.message
