"""The gate, the merge and the registry: a bad adapter publishes nothing, a merged model behaves like
base plus adapter, and a publish that fails midway leaves the previous version in place."""

from __future__ import annotations

import json

import pytest
from conftest import write_yaml
from dagster import AssetCheckKey, AssetKey, instance_for_test

from loraflow.demo_data import generate_examples
from loraflow.merge import LATEST, MergeError, merge_adapter, publish_version
from loraflow.spec import LoraSpec, TrainingSpec, load_spec
from loraflow.train import train_adapter
from pipelines.run import run_pipeline

PIPELINE = """
data:
  sources:
    - {{path: data/train.jsonl, format: alpaca, split: train}}
    - {{path: data/heldout.jsonl, format: alpaca, split: eval}}
format:
  system_prompt: You triage customer messages.
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
  gate:
    metric: eval_loss
    min_improvement: 0.1
publish:
  exports: [safetensors, gguf]
  gguf_types: [q8_0]
tracking: none  # tracking is tested in test_engine.py and the demo chain
"""


def write_records(path, examples, corrupt: bool = False) -> None:
    with path.open("w", encoding="utf-8") as out:
        for e in examples:
            record = dict(e, output=e["output"][::-1]) if corrupt else e
            out.write(json.dumps(record) + "\n")


def test_an_adapter_trained_on_corrupted_answers_fails_the_gate_and_publishes_nothing(
    project, tiny_model_dir, monkeypatch
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = generate_examples(100, seed=3)
    write_records(project / "data" / "train.jsonl", examples[:80])
    write_records(project / "data" / "heldout.jsonl", examples[80:])
    spec = load_spec(write_yaml(project / "pipelines", "triage", PIPELINE.format(model=tiny_model_dir)))
    home = project / ".loraflow"
    with instance_for_test() as instance:
        good = run_pipeline(spec, instance, home)
        assert good["success"], good
        published = good["published"]

        # the merged folder generates exactly what base plus adapter generates (greedy, same prompt)
        adapter_dir = home / "models" / "triage" / published["version"] / "adapter"
        tokenizer = AutoTokenizer.from_pretrained(published["path"])
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": examples[90]["instruction"] + "\n\n" + examples[90]["input"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        merged = AutoModelForCausalLM.from_pretrained(published["path"])
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
        with torch.no_grad():
            options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert torch.equal(merged.generate(**ids, **options), tuned.generate(**ids, **options))

        # the model card names every input by its full hash
        card = (home / "models" / "triage" / published["version"] / "README.md").read_text()
        record = json.loads(
            (home / "models" / "triage" / published["version"] / "publish_record.json").read_text()
        )
        manifests = home / "manifests" / "triage"
        base = json.loads((manifests / "base_model.json").read_text())
        adapter = json.loads((manifests / "adapter.json").read_text())
        from loraflow.artifacts import file_sha256

        for path in ("data/train.jsonl", "data/heldout.jsonl"):
            # named as the YAML names them, relative to the project: no path of this machine in the card
            assert f"| {path} | `{file_sha256(project / path)}` |" in card
        assert str(project) not in card
        assert base["content_hash"] in card and record["base_model_hash"] == base["content_hash"]
        assert adapter["weights_sha256"] in card and record["dataset_version"] in card

        # beside the safetensors: the GGUF and its Modelfile, listed in the card with size and sha256,
        # and the export_fidelity check passed with its figures
        folder = home / "models" / "triage" / published["version"]
        for name in ("model.safetensors", "triage-q8_0.gguf", "Modelfile"):
            assert f"| {name} |" in card and file_sha256(folder / name) in card
        assert "FROM ./triage-q8_0.gguf" in (folder / "Modelfile").read_text()
        export_key = AssetCheckKey(AssetKey(["triage", "published_model"]), "export_fidelity")
        exported = instance.event_log_storage.get_latest_asset_check_execution_by_key([export_key])[
            export_key
        ]
        figures = exported.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        assert figures.passed is True
        assert (
            0
            < figures.metadata["q8_0_max_logit_diff"].value
            <= figures.metadata["q8_0_logit_tolerance"].value
        )
        assert f"{figures.metadata['q8_0_max_logit_diff'].value:.4g} (allowed 2)" in card

        # a merge that misses its tolerance fails the merge_fidelity check, with its numbers, and
        # publishes nothing (the tolerance here is one no merge can meet)
        from dagster import materialize

        from assets import pipeline_assets
        from pipelines.definitions import pipeline_resources

        def publish_again(**publish):
            """published_model alone, with these publish settings changed."""
            changed = spec.model_copy(update={"publish": spec.publish.model_copy(update=publish)})
            return materialize(
                pipeline_assets(changed),
                selection=[AssetKey(["triage", "published_model"])],
                instance=instance,
                resources=pipeline_resources(home),
                raise_on_error=False,
            )

        refused = publish_again(merge_tolerance=1e-30)
        assert not refused.success
        key = AssetCheckKey(AssetKey(["triage", "published_model"]), "merge_fidelity")
        fidelity = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        check = fidelity.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        assert check.passed is False and check.metadata["tolerance"].value == 1e-30
        assert check.metadata["merge_max_abs_diff"].value > 1e-30 and check.metadata["changed"].value is True
        assert (
            "differ from base plus adapter by" in check.description and "(allowed 1e-30)" in check.description
        )
        assert (home / "models" / "triage" / LATEST).read_text().strip() == published["version"]

        # an export that writes a wrong tensor (one weight matrix scaled after the converter wrote it)
        # fails export_fidelity with its figures, and publishes nothing: latest stays, no new folder
        import loraflow.export

        real_write = loraflow.export.write_gguf

        def wrong_tensor(*args, **kwargs):
            from gguf import GGUFReader

            path = real_write(*args, **kwargs)
            reader = GGUFReader(path, "r+")
            tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_output.weight")
            tensor.data[...] = tensor.data * 40
            reader.data.flush()
            return path

        monkeypatch.setattr(loraflow.export, "write_gguf", wrong_tensor)
        corrupted = publish_again(gguf_types=["f16"])  # another version: another set of files
        monkeypatch.undo()
        assert not corrupted.success
        exported = instance.event_log_storage.get_latest_asset_check_execution_by_key([export_key])[
            export_key
        ]
        check = exported.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        assert check.passed is False
        assert check.metadata["f16_max_logit_diff"].value > check.metadata["f16_logit_tolerance"].value
        assert "triage-f16.gguf: its logits differ from the merged model's" in check.description
        assert (home / "models" / "triage" / LATEST).read_text().strip() == published["version"]
        assert sorted(p.name for p in (home / "models" / "triage").iterdir()) == sorted(
            [LATEST, published["version"]]
        )

        # now the training answers are corrupted (reversed); the held-out set is unchanged
        write_records(project / "data" / "train.jsonl", examples[:80], corrupt=True)
        bad = run_pipeline(spec, instance, home)
        assert not bad["success"] and bad["evaluation"] is not None and bad["published"] is None
        key = AssetCheckKey(AssetKey(["triage", "evaluation"]), "gate")
        gate = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        verdict = gate.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        assert verdict.passed is False
        # by how much, from the figures the evaluation measured: the tuned model got worse
        scores = bad["evaluation"]
        improvement = scores["base"]["eval_loss"] - scores["tuned"]["eval_loss"]
        assert improvement < 0
        assert verdict.description == (
            f"eval_loss: the tuned model improves by {improvement:+.4f} over the base, the gate needs +0.1000 "
            f"(short by {0.1 - improvement:.4f}). Not publishing."
        )
        assert verdict.metadata["improvement"].value == pytest.approx(improvement)
        assert (home / "models" / "triage" / LATEST).read_text().strip() == published["version"]
        assert sorted(p.name for p in (home / "models" / "triage").iterdir()) == sorted(
            [LATEST, published["version"]]
        )


@pytest.fixture(scope="module")
def adapters(tokenizer, tiny_model_dir, tmp_path_factory):
    """Two small adapters (different seeds) on the tiny model."""
    from test_training import dataset

    folder = tmp_path_factory.mktemp("publish")
    data = dataset(tokenizer, folder / "datasets", tokenizer.chat_template)
    spec = TrainingSpec(
        method="lora", lora=LoraSpec(r=4, alpha=8, target_modules="all-linear"), max_steps=3, batch_size=4
    )
    return [
        train_adapter(
            spec.model_copy(update={"seed": seed}), tiny_model_dir, data.path, folder / f"adapter-{seed}"
        ).adapter_dir
        for seed in (0, 1)
    ]


def test_a_publish_that_fails_midway_leaves_latest_on_the_previous_version(
    tiny_model_dir, adapters, tmp_path, monkeypatch
):
    import loraflow.merge

    models = tmp_path / "models"
    first = publish_version(adapters[0], "base", "float32")
    merge_adapter(tiny_model_dir, adapters[0], models, first, "float32", "# card\n")
    before = sorted(p.name for p in (models / first).rglob("*"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loraflow.merge.shutil, "copytree", disk_full)
    second = publish_version(adapters[1], "base", "float32")
    with pytest.raises(OSError, match="No space left"):
        merge_adapter(tiny_model_dir, adapters[1], models, second, "float32", "# card\n")
    assert (models / LATEST).read_text().strip() == first
    assert sorted(p.name for p in models.iterdir()) == sorted([LATEST, first])  # no half-written version
    assert sorted(p.name for p in (models / first).rglob("*")) == before


def test_a_merge_outside_the_tolerance_publishes_nothing(tiny_model_dir, adapters, tmp_path):
    models = tmp_path / "models"
    version = publish_version(adapters[0], "base", "float32")
    with pytest.raises(MergeError, match=r"differ from base plus adapter by .* \(allowed 1e-30\)"):
        merge_adapter(tiny_model_dir, adapters[0], models, version, "float32", "# card\n", tolerance=1e-30)
    assert not (models / LATEST).exists() and not (models / version).exists()


def test_an_adapter_that_changes_nothing_is_not_published(tiny_model_dir, adapters, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    models = tmp_path / "models"
    first = publish_version(adapters[0], "base", "float32")
    merge_adapter(tiny_model_dir, adapters[0], models, first, "float32", "# card\n")
    # a fresh LoRA adapter: its B matrices start at zero, so base plus adapter is the base
    untrained = tmp_path / "untrained"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ).save_pretrained(untrained)
    from loraflow.base_model import load_tokenizer

    load_tokenizer(tiny_model_dir).save_pretrained(untrained)
    version = publish_version(untrained, "base", "float32")
    with pytest.raises(MergeError, match="equal the base's on every probe: the adapter changed nothing"):
        merge_adapter(tiny_model_dir, untrained, models, version, "float32", "# card\n")
    assert (models / LATEST).read_text().strip() == first
    assert sorted(p.name for p in models.iterdir()) == sorted([LATEST, first])


def test_a_16_bit_publish_is_held_to_the_adapters_own_effect_against_float32(tiny_model_dir, tmp_path):
    """Merged in float32, rounded to bfloat16, compared with base plus adapter in float32: an adapter
    whose effect on the logits is below bf16's rounding is refused in bfloat16 (a 5%-of-the-largest-
    logit tolerance would have let it through), and published in float32."""
    from test_evaluate import save_adapter

    from loraflow.base_model import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    strong = save_adapter(tiny_model_dir, tmp_path / "strong", scale=0.05)
    faint = save_adapter(tiny_model_dir, tmp_path / "faint", scale=1e-4)
    for folder in (strong, faint):
        tokenizer.save_pretrained(folder)
    models = tmp_path / "models"

    published = merge_adapter(tiny_model_dir, strong, models, "strong-bf16", "bfloat16", "# card\n")
    assert published.merge_mean_abs_diff <= 0.5 * published.adapter_effect == published.merge_tolerance
    with pytest.raises(MergeError, match=r"in bfloat16 .* more than half of the adapter's own effect"):
        merge_adapter(tiny_model_dir, faint, models, "faint-bf16", "bfloat16", "# card\n")
    assert not (models / "faint-bf16").exists()
    in_float32 = merge_adapter(tiny_model_dir, faint, models, "faint-fp32", "float32", "# card\n")
    assert in_float32.merge_max_abs_diff <= 1e-3 and in_float32.adapter_effect > 0
    assert (models / LATEST).read_text().strip() == "faint-fp32"
