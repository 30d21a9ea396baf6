"""The pipeline spec: good YAML loads, and each kind of bad YAML fails with the file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_yaml

from loraflow.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
data:
  sources:
    - path: data/*.jsonl
"""


def test_minimal_yaml_fills_documented_defaults(project):
    spec = load_spec(write_yaml(project / "pipelines", "triage", MINIMAL))
    assert spec.name == "triage"
    assert spec.root == project
    assert spec.training.method == "qlora"
    assert spec.training.quantization.quant_type == "nf4"
    assert spec.base_model.source == "smollm2-135m-instruct"
    assert spec.base_model.trust_remote_code is False


def test_the_demo_pipeline_loads():
    spec = load_spec(REPO / "pipelines" / "defs" / "demo" / "defs.yaml")
    assert spec.name == "demo"
    assert spec.training.method == "qlora"
    assert spec.evaluation.gate.metric == "format_match"


def test_every_spec_field_is_documented():
    from pydantic import BaseModel

    from loraflow import spec as spec_module

    undocumented = []
    for model in vars(spec_module).values():
        if (
            isinstance(model, type)
            and issubclass(model, BaseModel)
            and model.__module__ == spec_module.__name__
        ):
            undocumented += [
                f"{model.__name__}.{n}" for n, f in model.model_fields.items() if not f.description
            ]
    assert undocumented == []


def test_misspelt_key_names_file_key_line_and_allowed_keys(project):
    path = write_yaml(
        project / "pipelines",
        "triage",
        MINIMAL
        + """
training:
  learning_rat: 0.001
""",
    )
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert str(path) in message
    assert "training.learning_rat (line 6): unknown key" in message
    assert "learning_rate" in message  # the allowed keys are listed


def test_wrong_type_names_key_and_value(project):
    path = write_yaml(project / "pipelines", "triage", MINIMAL + "training:\n  batch_size: eight\n")
    with pytest.raises(SpecError, match=r"training\.batch_size \(line 5\): .*integer.*'eight'"):
        load_spec(path)


def test_unknown_choice_lists_allowed_values(project):
    path = write_yaml(project / "pipelines", "triage", MINIMAL + "training:\n  method: qlor\n")
    with pytest.raises(SpecError, match=r"training\.method.*'qlora' or 'lora'"):
        load_spec(path)


def test_qlora_with_quantization_off_is_a_contradiction(project):
    text = MINIMAL + "training:\n  method: qlora\n  quantization:\n    enabled: false\n"
    with pytest.raises(SpecError, match=r"training.*qlora.*quantization\.enabled is false"):
        load_spec(write_yaml(project / "pipelines", "triage", text))


def test_lora_with_quantization_on_is_a_contradiction(project):
    text = MINIMAL + "training:\n  method: lora\n  quantization:\n    quant_type: nf4\n"
    with pytest.raises(SpecError, match=r"use method: qlora"):
        load_spec(write_yaml(project / "pipelines", "triage", text))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "training:\n  adapter: prefix\npublish:\n  exports: [safetensors, gguf]\n",
            "a prefix adapter cannot be merged",
        ),
        ("training:\n  adapter: prefix\nformat:\n  packing: true\n", "which a prefix shared by the whole"),
        ("training:\n  objective: dpo\nformat:\n  packing: true\n", "format.packing is for SFT rows"),
        ("training:\n  adapter: ia3\n  lora: {use_dora: true}\n", "lora.use_dora is a LoRA variant"),
        ("training:\n  adapter: adalora\n  adalora: {init_r: 4, target_r: 8}\n", "must not exceed init_r"),
    ],
)
def test_adapter_methods_and_objectives_refuse_what_they_cannot_do(project, text, message):
    with pytest.raises(SpecError, match=message):
        load_spec(write_yaml(project / "pipelines", "triage", MINIMAL + text))


def test_a_preference_objective_refuses_a_source_of_another_format(project):
    text = "data:\n  sources:\n    - {path: data/*.jsonl, format: alpaca}\ntraining:\n  objective: orpo\n"
    with pytest.raises(SpecError, match="trains on chosen/rejected pairs, but a source has format 'alpaca'"):
        load_spec(write_yaml(project / "pipelines", "triage", text))


def test_a_record_limit_below_the_field_limits_is_a_contradiction(project):
    text = MINIMAL + "quality:\n  max_prompt_chars: 8000\n  max_record_chars: 10000\n"
    with pytest.raises(
        SpecError, match=r"quality \(line 4\): max_record_chars \(10,000\) is less than .*12,000"
    ):
        load_spec(write_yaml(project / "pipelines", "triage", text))


def test_format_gate_without_regex_is_rejected(project):
    text = MINIMAL + "evaluation:\n  gate:\n    metric: format_match\n"
    with pytest.raises(SpecError, match=r"format_match.*needs evaluation\.format_regex"):
        load_spec(write_yaml(project / "pipelines", "triage", text))


def test_key_given_twice_is_rejected(project):
    text = MINIMAL + "training:\n  batch_size: 4\n  batch_size: 8\n"
    with pytest.raises(SpecError, match=r"'batch_size' appears twice"):
        load_spec(write_yaml(project / "pipelines", "triage", text))


def test_broken_yaml_syntax_names_the_file(project):
    path = write_yaml(project / "pipelines", "triage", "data:\n  sources: [\n")
    with pytest.raises(SpecError, match=rf"{path}: not valid YAML"):
        load_spec(path)


def test_missing_sources_and_empty_file(project):
    with pytest.raises(SpecError, match=r"data \(line 1\): required key is missing|data: required key"):
        load_spec(write_yaml(project / "pipelines", "triage", "training:\n  seed: 1\n"))
    with pytest.raises(SpecError, match="the file is empty"):
        load_spec(write_yaml(project / "pipelines", "empty", ""))


def test_name_comes_from_the_file_and_must_be_an_identifier(project):
    with pytest.raises(SpecError, match="pipeline name 'my-model' must be letters, digits and underscores"):
        load_spec(write_yaml(project / "pipelines", "my-model", MINIMAL))
    with pytest.raises(SpecError, match="the pipeline is named after the file"):
        load_spec(write_yaml(project / "pipelines", "triage", "name: other\n" + MINIMAL))


def test_sources_resolve_against_the_project_root(project):
    (project / "data" / "b.jsonl").write_text("{}\n")
    (project / "data" / "a.jsonl").write_text("{}\n")
    spec = load_spec(write_yaml(project / "pipelines", "triage", MINIMAL))
    assert list(spec.partitions()) == ["data/a.jsonl", "data/b.jsonl"]


def test_section_versions_change_only_with_their_section(project):
    base = load_spec(write_yaml(project / "pipelines", "a", MINIMAL))
    changed = load_spec(write_yaml(project / "pipelines", "b", MINIMAL + "training:\n  seed: 7\n"))
    assert base.section_version("training") != changed.section_version("training")
    assert base.section_version("data", "quality") == changed.section_version("data", "quality")


def test_a_pipeline_cannot_take_the_warehouse_catalogs_name(project):
    with pytest.raises(SpecError, match="pipeline name 'warehouse' is taken by the warehouse"):
        load_spec(write_yaml(project / "pipelines", "warehouse", MINIMAL))


def test_last_turn_mode_with_train_on_inputs_is_a_contradiction(project):
    text = MINIMAL + "format:\n  train_turns: last\n  train_on_inputs: true\n"
    with pytest.raises(
        SpecError, match=r"format \(line 4\): train_turns: last has no effect with train_on_inputs"
    ):
        load_spec(write_yaml(project / "pipelines", "triage", text))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.5", r"format\.eval_size \(line 5\): .*fraction between 0 and 1 .* or a whole number"),
        ("0", r"format\.eval_size \(line 5\)"),
        ("ten", r"format\.eval_size \(line 5\)"),
    ],
)
def test_eval_size_is_a_fraction_or_a_count(project, value, message):
    text = MINIMAL + f"format:\n  eval_size: {value}\n"
    with pytest.raises(SpecError, match=message):
        load_spec(write_yaml(project / "pipelines", "triage", text))


def test_eval_size_keeps_counts_and_fractions_apart(project):
    count = load_spec(write_yaml(project / "pipelines", "a", MINIMAL + "format:\n  eval_size: 200\n"))
    share = load_spec(write_yaml(project / "pipelines", "b", MINIMAL + "format:\n  eval_size: 0.1\n"))
    assert (count.format.eval_size, type(count.format.eval_size)) == (200, int)
    assert (share.format.eval_size, type(share.format.eval_size)) == (0.1, float)


def test_a_chat_template_must_be_a_name_a_file_or_valid_jinja(project):
    unknown = MINIMAL + "format:\n  chat_template: chatlm\n"
    with pytest.raises(
        SpecError, match=r"format\.chat_template \(line 5\): .*'chatlm' is not a template name \(chatml"
    ):
        load_spec(write_yaml(project / "pipelines", "triage", unknown))
    broken = MINIMAL + 'format:\n  chat_template: "{% for m in messages %}{{ m.content }}"\n'
    with pytest.raises(SpecError, match=r"format\.chat_template \(line 5\): .*not a valid Jinja template"):
        load_spec(write_yaml(project / "pipelines", "triage", broken))
    for good in ("chatml", "templates/mine.jinja", "\"{{ messages[0]['content'] }}\""):
        load_spec(
            write_yaml(project / "pipelines", "triage", MINIMAL + f"format:\n  chat_template: {good}\n")
        )


def test_a_component_file_holds_the_spec_under_attributes_and_its_errors_name_file_key_and_line(tmp_path):
    folder = tmp_path / "pipelines" / "defs" / "triage"
    folder.mkdir(parents=True)
    path = folder / "defs.yaml"
    path.write_text(
        "type: pipelines.component.FineTune\n"
        "attributes:\n"
        "  data:\n"
        "    sources:\n"
        "      - path: data/*.jsonl\n"
        "  training:\n"
        "    max_stpes: 3\n"
    )
    with pytest.raises(SpecError) as error:
        load_spec(path)
    message = str(error.value)
    assert message.startswith(f"{path}: 1 problem(s)")
    assert "attributes.training.max_stpes (line 7): unknown key (allowed here: method," in message

    path.write_text(path.read_text().replace("max_stpes", "max_steps"))
    spec = load_spec(path)
    assert (spec.name, spec.root, spec.training.max_steps) == (
        "triage",
        tmp_path,
        3,
    )  # named after the folder

    path.write_text("type: pipelines.component.FineTune\nattrbutes:\n  data: {}\n")
    with pytest.raises(SpecError, match=r"found attrbutes beside them"):
        load_spec(path)
    path.write_text("type: pipelines.component.FineTune\nattributes:\n  name: other\n  data: {}\n")
    with pytest.raises(
        SpecError, match=r"key 'attributes.name' is not allowed; the pipeline is named after its folder"
    ):
        load_spec(path)
