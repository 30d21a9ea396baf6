"""The whole chain through Dagster on a tiny Llama: from raw files to a published model."""

from __future__ import annotations

import pytest
from conftest import write_yaml
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
  learning_rate: 1.0e-3
  log_every: 1
evaluation:
  max_examples: 6
  max_new_tokens: 6
  gate:
    metric: eval_loss
    min_improvement: {min_improvement}
"""


def make_pipeline(project, tiny_model_dir, max_invalid=0.5, min_improvement=-1000.0):
    write_demo_data(project / "data", n=60)
    path = write_yaml(
        project / "pipelines",
        "triage",
        PIPELINE.format(model=tiny_model_dir, max_invalid=max_invalid, min_improvement=min_improvement),
    )
    return load_spec(path)


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


def test_demo_chain_publishes_a_model_that_loads_and_generates(project, tiny_model_dir, instance, store_root):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = make_pipeline(project, tiny_model_dir)
    home = project / ".loraflow"
    outcome = run_pipeline(spec, instance, home)
    assert outcome["success"], outcome

    # nothing lost: per partition, raw rows = valid + quarantined, and the broken records were caught
    quarantined = 0
    for partition in spec.partitions():
        meta = latest_metadata(instance, AssetKey(["triage", "validated_examples"]), partition)
        assert meta["raw_rows"] == meta["valid_rows"] + meta["quarantined_rows"]
        quarantined += meta["quarantined_rows"]
    assert quarantined >= 5

    dataset = latest_metadata(instance, AssetKey(["triage", "training_dataset"]))
    assert dataset["train_examples"] > 0 and dataset["eval_examples"] > 0
    assert dataset["duplicates_dropped"] == 1  # the planted copy of a record from the other file
    assert dataset["chat_template"] == "chatml"
    assert 0 < dataset["tokens_p50"] <= dataset["tokens_p99"] <= dataset["tokens_p100"] <= 512
    for check in ("every_example_trains", "end_of_turn_trained", "template_round_trip", "token_lengths"):
        assert check_passed(instance, AssetKey(["triage", "training_dataset"]), check), check
    view = show("triage", home, n=2, split="train", plain=True)
    assert view.count("<|im_end|>]]") == 2 and "You triage customer messages." in view

    adapter = latest_metadata(instance, AssetKey(["triage", "adapter"]))
    assert adapter["steps"] == 3 and adapter["trainable_params"] > 0
    assert adapter["packing"] is True and 0.5 < adapter["packing_efficiency"] <= 1
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, adapter["path"])
    assert any("lora_A" in name for name, _ in tuned.named_parameters())

    published = outcome["published"]["path"]
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

    # a second run ingests nothing unless files or rules changed
    resources = pipeline_resources(home)
    assert sync_partitions(spec, instance, resources).to_ingest == []
    stricter = spec.model_copy(update={"quality": spec.quality.model_copy(update={"max_prompt_chars": 500})})
    assert sync_partitions(stricter, instance, resources).to_ingest == sorted(spec.partitions())

    card = (home / "models" / "triage" / outcome["published"]["version"] / "README.md").read_text()
    assert "base_model:" in card and "| eval_loss |" in card
    assert all(str(path) in card for path, _ in spec.partitions().values())
    assert (home / "models" / "triage" / "latest").read_text().strip() == outcome["published"]["version"]


def test_gate_failure_stops_publishing_and_says_by_how_much(project, tiny_model_dir, instance):
    spec = make_pipeline(project, tiny_model_dir, min_improvement=1000.0)
    outcome = run_pipeline(spec, instance, project / ".loraflow")
    assert not outcome["success"]
    assert outcome["evaluation"] is not None and outcome["published"] is None
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(AssetKey(["triage", "evaluation"]), "gate")]
    )[AssetCheckKey(AssetKey(["triage", "evaluation"]), "gate")]
    evaluation = check.event.dagster_event.event_specific_data  # type: ignore[union-attr]
    assert evaluation.passed is False
    assert "short by" in evaluation.description


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
