"""SFT then DPO as two pipelines over one file of hh-style preference transcripts: the DPO pipeline's
adapter starts from the SFT pipeline's, and the published model card names both trainings."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_yaml
from dagster import AssetKey, instance_for_test, materialize

from assets import PARTITIONED_STAGES, pipeline_assets
from loraflow.spec import load_spec
from pipelines.deployment import deployment_resources
from pipelines.run import run_pipeline, sync_partitions

COMMON = """
data:
  sources:
    - {{path: data/pairs.jsonl}}
format:
  system_prompt: Answer briefly.
  eval_size: 8
  max_seq_len: 128
base_model:
  source: {model}
evaluation:
  max_examples: 8
  max_new_tokens: 4
  forgetting: {{enabled: false}}
  gate: {gate}
tracking: none
"""

SFT = """
training:
  method: lora
  lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}
  max_steps: 2
  batch_size: 4
  learning_rate: 1.0e-2
  checkpoint_every: null
"""

DPO = """
training:
  objective: dpo
  start_from: chat_sft
  method: lora
  max_steps: 4
  batch_size: 4
  learning_rate: 1.0e-2
  checkpoint_every: null
"""


def transcript(*turns: str) -> str:
    """A dialogue in the hh-rlhf style: turns alternate, Human first."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {turn}" for i, turn in enumerate(turns))


def write_pairs(path, n: int = 40) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(n):
            right, wrong = ("even", "odd") if i % 2 == 0 else ("odd", "even")
            opening = ("Hello.", "Hello! How can I help?")
            question = f"Is {i} odd or even?"
            chosen = transcript(*opening, question, right)
            rejected = transcript(*opening, question, f"I think that {i} is {wrong}, probably, more or less.")
            out.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")


def test_dpo_starts_from_the_sft_pipelines_adapter_and_the_card_names_both(project, tiny_model_dir):
    write_pairs(project / "data" / "pairs.jsonl")
    gate = "{metric: eval_loss, min_improvement: 0.0}"
    sft = load_spec(
        write_yaml(project / "pipelines", "chat_sft", COMMON.format(model=tiny_model_dir, gate=gate) + SFT)
    )
    dpo_gate = "{metric: reward_accuracy, min_improvement: 0.5}"
    dpo = load_spec(
        write_yaml(
            project / "pipelines", "chat_dpo", COMMON.format(model=tiny_model_dir, gate=dpo_gate) + DPO
        )
    )
    home = project / ".loraflow"
    with instance_for_test() as instance:
        # the SFT pipeline up to its adapter (its evaluation and publishing are every pipeline's)
        assets, resources = pipeline_assets(sft), deployment_resources(home)
        for partition in sync_partitions(sft, instance, resources).to_ingest:
            stages = [AssetKey(["chat_sft", stage]) for stage in PARTITIONED_STAGES]
            materialize(
                assets, selection=stages, partition_key=partition, instance=instance, resources=resources
            )
        stages = [AssetKey(["chat_sft", stage]) for stage in ("base_model", "training_dataset", "adapter")]
        assert materialize(assets, selection=stages, instance=instance, resources=resources).success
        second = run_pipeline(dpo, instance, home)
        assert second["success"], second

        manifests = home / "manifests"
        sft_adapter = json.loads((manifests / "chat_sft" / "adapter.json").read_text())
        dpo_adapter = json.loads((manifests / "chat_dpo" / "adapter.json").read_text())
        record = json.loads(
            (home / "adapters" / "chat_dpo" / dpo_adapter["version"] / "training_record.json").read_text()
        )
        assert record["training"]["objective"] == "dpo"
        assert record["start_from"]["pipeline"] == "chat_sft"
        assert record["start_from"]["adapter_version"] == sft_adapter["version"]
        assert record["start_from"]["objective"] == "sft"
        summary = json.loads(
            (home / "adapters" / "chat_dpo" / dpo_adapter["version"] / "training_summary.json").read_text()
        )
        # at the first step the policy is the reference (the SFT adapter, of which DPO keeps a frozen
        # copy): the loss is ln 2 and no pair is preferred more than the reference prefers it
        assert summary["objective"] == "dpo" and summary["steps"] == 4
        assert summary["loss_curve"][0][1] == pytest.approx(math.log(2), abs=1e-5)
        assert summary["reward_curve"][0][1:] == [0.0, 0.0]
        assert [step for step, *_ in summary["reward_curve"]] == list(range(1, 5))
        assert summary["loss_curve"][-1][1] < math.log(2)
        assert 0.5 < summary["reward_accuracy"] <= 1.0 and summary["reward_margin"] > 0
        folder = home / "adapters" / "chat_dpo" / dpo_adapter["version"]
        assert not (folder / "ref").exists()  # the frozen reference is not part of the adapter

        # the DPO adapter's materialization names where it started, and its lineage reaches the SFT adapter
        event = instance.get_latest_materialization_event(AssetKey(["chat_dpo", "adapter"]))
        metadata = event.asset_materialization.metadata
        assert metadata["started_from"].value == f"chat_sft {sft_adapter['version']}"
        assert metadata["objective"].value == "dpo" and 0 <= metadata["reward_accuracy"].value <= 1

        evaluation = second["evaluation"]
        assert evaluation["tuned"]["reward_accuracy"] > 0.5 and evaluation["base"]["reward_accuracy"] == 0.0
        assert evaluation["base"]["reward_margin"] == 0.0
        assert evaluation["tuned"]["preference_margin"] > evaluation["base"]["preference_margin"]
        assert {"exact_match", "token_f1", "rouge_l"} <= set(evaluation["tuned"])  # chosen is the reference
        assert evaluation["gate"]["passed"] and evaluation["gate"]["metric"] == "reward_accuracy"
        card = (home / "models" / "chat_dpo" / second["published"]["version"] / "README.md").read_text()
        assert "### Training stages" in card
        stages = card.split("### Training stages", 1)[1]
        assert (
            f"1. `chat_sft`: SFT of a lora adapter on training dataset `{sft_adapter['dataset_version']}`"
            in stages
        )
        assert f"adapter version `{sft_adapter['version']}`" in stages
        assert (
            f"2. `chat_dpo`: DPO of a lora adapter on training dataset `{dpo_adapter['dataset_version']}`"
            in stages
        )
        assert "reward_accuracy" in card


def test_start_from_must_name_another_pipeline_and_never_come_back(project, tiny_model_dir):
    from loraflow.spec import SpecError
    from pipelines.definitions import load_pipelines

    (project / "data" / "pairs.jsonl").write_text("")
    body = COMMON.format(model=tiny_model_dir, gate="{metric: eval_loss}")
    folder = project / "pipelines"
    write_yaml(folder, "first", body + "training: {objective: dpo, start_from: second}\n")
    write_yaml(folder, "second", body + "training: {start_from: first}\n")
    with pytest.raises(SpecError, match=r"start_from goes round in a circle \(first -> second -> first\)"):
        load_pipelines(folder)
    write_yaml(folder, "second", body + "training: {start_from: sft}\n")
    with pytest.raises(SpecError, match="training.start_from 'sft' is not a pipeline in"):
        load_pipelines(folder)
    with pytest.raises(SpecError, match="must name another pipeline"):
        load_spec(write_yaml(folder, "second", body + "training: {start_from: second}\n"))
