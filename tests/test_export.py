"""GGUF exports and the Ollama Modelfile: a file read back is the merged model it came from (logits,
greedy answers, chat template, tokens), a wrong one is caught, and the Modelfile's Go template
renders conversations exactly as the tokenizer's chat template does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.export import (
    LOGIT_TOLERANCE,
    ExportError,
    export_gguf,
    write_gguf,
)
from loraflow.merge import merge_in_memory
from loraflow.ollama import ModelfileError, go_template, modelfile, role_pieces
from loraflow.spec import LoraSpec, TrainingSpec
from loraflow.templates import NAMED_TEMPLATES, using_template

SYSTEM = "You triage customer messages."
CONVERSATIONS = [
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "The parcel came two weeks late and the box was crushed."},
        {"role": "assistant", "content": "sentiment: negative | topic: delivery | summary: late, damaged"},
    ],
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Billing charged me twice this month, please refund one."},
        {"role": "assistant", "content": "sentiment: negative | topic: billing | summary: double charge"},
    ],
]


@pytest.fixture(scope="module")
def merged(tokenizer, tiny_model_dir, tmp_path_factory):
    """A LoRA adapter trained a few steps on the tiny model, merged in memory (float32), with its
    safetensors folder saved as publishing saves it."""
    from test_training import dataset

    from loraflow.formatting import render
    from loraflow.merge import _stop_at_end_of_turn
    from loraflow.train import train_adapter

    folder = tmp_path_factory.mktemp("export")
    data = dataset(tokenizer, folder / "datasets", tokenizer.chat_template)
    spec = TrainingSpec(
        method="lora", lora=LoraSpec(r=4, alpha=8, target_modules="all-linear"), max_steps=3, batch_size=4
    )
    adapter = train_adapter(spec, tiny_model_dir, data.path, folder / "adapter").adapter_dir
    probes = [render(tokenizer, c) for c in CONVERSATIONS]
    result = merge_in_memory(tiny_model_dir, adapter, "float32", probes=probes)
    _stop_at_end_of_turn(result.model, result.tokenizer)
    result.model.save_pretrained(folder / "published", safe_serialization=True)
    result.tokenizer.save_pretrained(folder / "published")
    return result, folder / "published"


def fresh_copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def exported(merged, tmp_path_factory):
    """The published folder with an f16 and a q8_0 export, and the report comparing each with the merge."""
    model, published = merged
    folder = fresh_copy(published, tmp_path_factory.mktemp("exported") / "published")
    return export_gguf(folder, "triage", ["f16", "q8_0"], model, CONVERSATIONS, 12, SYSTEM), folder


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_a_gguf_read_back_is_the_merged_model_within_its_types_tolerance(merged, exported, gguf_type):
    from gguf import GGUFReader

    model, _ = merged
    report, folder = exported
    assert report.passed, report.describe()
    fidelity = next(f for f in report.fidelity if f.gguf_type == gguf_type)
    assert fidelity.max_logit_diff <= LOGIT_TOLERANCE[gguf_type]
    assert fidelity.max_logit_diff > 0  # it was rounded: this is the file, not the merged model again
    assert fidelity.answers == len(CONVERSATIONS) and fidelity.answer_agreement >= fidelity.agreement_required
    assert fidelity.template_renders_equal and fidelity.vocabulary_equal

    # the file's metadata: the architecture, the tokenizer and the chat template training used
    gguf = folder / f"triage-{gguf_type}.gguf"
    fields = GGUFReader(gguf).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == len(model.tokenizer)
    assert fields["tokenizer.chat_template"].contents() == model.tokenizer.chat_template


def test_the_report_lists_every_file_with_its_size_and_sha256(exported):
    from loraflow.artifacts import file_sha256

    report, folder = exported
    names = [f.name for f in report.files]
    assert names == [
        "model.safetensors",
        "triage-f16.gguf",
        "triage-q8_0.gguf",
        "Modelfile",
        "Modelfile.q8_0",
    ]
    for f in report.files:
        assert f.bytes == (folder / f.name).stat().st_size and f.sha256 == file_sha256(folder / f.name)
    # q8_0 stores about 8.5 bits a weight, f16 16
    sizes = {f.name: f.bytes for f in report.files}
    assert sizes["triage-q8_0.gguf"] < sizes["triage-f16.gguf"]
    assert "FROM ./triage-f16.gguf" in (folder / "Modelfile").read_text()
    assert "FROM ./triage-q8_0.gguf" in (folder / "Modelfile.q8_0").read_text()


def test_a_vocabulary_other_than_the_tokenizers_is_named_by_its_first_wrong_token(merged, exported):
    """What the vocabulary comparison sees in a file whose tokens, merges or eos differ. (A wrong
    tensor is caught through the published_model asset: tests/test_publish.py.)"""
    from dataclasses import replace

    from loraflow.export import read_gguf_tokenizer, vocabulary_differences

    model, _ = merged
    _, folder = exported
    stored = read_gguf_tokenizer(folder / "triage-q8_0.gguf")
    assert stored.model == "gpt2" and vocabulary_differences(stored, model.tokenizer) == []
    swapped = [*stored.tokens]
    swapped[100], swapped[101] = swapped[101], swapped[100]
    assert vocabulary_differences(replace(stored, tokens=swapped), model.tokenizer) == [
        f"token 100 is {stored.tokens[101]!r}, the tokenizer's is {stored.tokens[100]!r}"
    ]
    assert vocabulary_differences(replace(stored, merges=stored.merges[1:]), model.tokenizer) == [
        f"{len(stored.merges) - 1} merges against the tokenizer's {len(stored.merges)}, or in another order"
    ]
    eos = model.tokenizer.eos_token_id
    assert vocabulary_differences(
        replace(stored, special={**stored.special, "eos": eos + 1}), model.tokenizer
    ) == [f"its eos token is id {eos + 1}, the tokenizer's is {eos}"]


def test_the_model_card_lists_the_exports_and_their_fidelity(exported):
    from loraflow.model_card import human_size, render_model_card

    report, _ = exported
    card = render_model_card(
        pipeline="triage",
        description="d",
        base_model="b",
        base_model_hash="h",
        license="apache-2.0",
        sources=[{"file": "/somewhere/project/data/a.jsonl", "sha256": "s", "valid": 1, "quarantined": 0}],
        dataset_version="v",
        training_config={},
        code_version="c",
        eval_table="",
        project_root=Path("/somewhere/project"),
        exports=report,
    )
    for f in report.files:
        assert f"| {f.name} | {f.format} | {human_size(f.bytes)} | `{f.sha256}` |" in card
    for f in report.fidelity:
        assert f"| {f.file} | {f.max_logit_diff:.4g} (allowed {f.logit_tolerance:g}) |" in card
    assert "| data/a.jsonl | `s` |" in card and "/somewhere" not in card


def test_a_stored_template_other_than_trainings_renders_differently(tokenizer):
    """What the template comparison sees when a file carries another template than training's."""
    from loraflow.export import renders

    assert renders(tokenizer, tokenizer.chat_template, CONVERSATIONS) == renders(
        tokenizer, None, CONVERSATIONS
    )
    assert renders(tokenizer, NAMED_TEMPLATES["zephyr"], CONVERSATIONS) != renders(
        tokenizer, None, CONVERSATIONS
    )


def test_an_architecture_the_converter_cannot_write_is_named(tmp_path, tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    with pytest.raises(ExportError, match=r"does not handle the architecture OPTForCausalLM; remove gguf"):
        write_gguf(tmp_path / "opt", tmp_path / "opt.gguf", "q8_0", "opt")
    assert not (tmp_path / "opt.gguf").exists()


# The Modelfile: rendered with Go's text/template, as Ollama renders it


def ollama_render(template: str, messages: list[dict], default_system: str | None, tmp_path: Path) -> str:
    """What Ollama's chat endpoint hands the model: the Modelfile's SYSTEM goes first when the
    conversation has no system message, `.System` joins the system messages, `.Messages` holds all
    of them (Ollama's template.Execute and collate), and the template runs in Go's text/template."""
    go_template_lib = pytest.importorskip("go_template")
    if default_system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": default_system}, *messages]
    values = {
        "System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }
    (tmp_path / "template.tmpl").write_text(template, encoding="utf-8")
    (tmp_path / "values.yml").write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    out = tmp_path / "rendered.txt"
    out.unlink(missing_ok=True)
    go_template_lib.render_template(str(tmp_path / "template.tmpl"), str(tmp_path / "values.yml"), str(out))
    assert out.is_file(), "Go's text/template did not render the template"
    return out.read_text(encoding="utf-8")


def modelfile_fields(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and PARAMETER lines of the Modelfile loraflow writes."""
    fields, params = {}, []
    rest = text
    while rest:
        line, _, rest = rest.partition("\n")
        if not line.strip() or line.startswith("#"):
            continue
        command, _, value = line.partition(" ")
        if value.startswith('"""'):
            body = value[3:] + "\n" + rest
            value, _, rest = body.partition('"""')
            rest = rest.removeprefix("\n")
        if command == "PARAMETER":
            name, _, raw = value.partition(" ")
            params.append((name, json.loads(raw)))
        else:
            fields[command] = value
    fields["PARAMETER"] = params
    return fields


TWO_TURNS = [
    {"role": "user", "content": "My order #1234 never arrived."},
    {"role": "assistant", "content": "sentiment: negative | topic: delivery | summary: missing order"},
    {"role": "user", "content": 'And the "refund" page shows {{ nothing }}.'},
]


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "zephyr", "alpaca"])
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_the_modelfiles_template_renders_a_two_turn_conversation_as_the_tokenizer(
    tokenizer, tmp_path, template, system
):
    source = tokenizer.chat_template if template == "tokenizer" else NAMED_TEMPLATES[template]
    with using_template(tokenizer, source):
        fields = modelfile_fields(modelfile("triage-q8_0.gguf", tokenizer, system))
        expected = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, *TWO_TURNS] if system else TWO_TURNS,
            tokenize=False,
            add_generation_prompt=True,
        )
    assert fields["FROM"] == "./triage-q8_0.gguf"
    assert fields.get("SYSTEM") == system
    assert ollama_render(fields["TEMPLATE"], TWO_TURNS, fields.get("SYSTEM"), tmp_path) == expected
    stops = [value for name, value in fields["PARAMETER"] if name == "stop"]
    assert stops[0] == {"tokenizer": "<|im_end|>", "chatml": "<|im_end|>"}.get(template, tokenizer.eos_token)


def test_a_conversation_with_its_own_system_message_renders_it_instead_of_the_modelfiles(tokenizer, tmp_path):
    fields = modelfile_fields(modelfile("m.gguf", tokenizer, SYSTEM))
    own = [{"role": "system", "content": "Answer in French."}, *TWO_TURNS]
    rendered = ollama_render(fields["TEMPLATE"], own, fields["SYSTEM"], tmp_path)
    assert rendered == tokenizer.apply_chat_template(own, tokenize=False, add_generation_prompt=True)


def test_a_template_whose_text_depends_on_the_position_is_refused(tokenizer):
    numbered = (
        "{%- for message in messages -%}{{ loop.index ~ '. ' ~ message['role'] ~ ': ' ~ message['content'] ~ '\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}assistant: {%- endif -%}"
    )
    with (
        using_template(tokenizer, numbered),
        pytest.raises(ModelfileError, match="cannot be written as an Ollama template"),
    ):
        role_pieces(tokenizer)


def test_template_text_holding_go_action_delimiters_is_written_as_a_go_string(tokenizer, tmp_path):
    braces = (
        "{%- for message in messages -%}{{ '{{' ~ message['role'] ~ '}} ' ~ message['content'] ~ eos_token }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '{{assistant}} ' }}{%- endif -%}"
    )
    with using_template(tokenizer, braces):
        template = go_template(role_pieces(tokenizer))
        expected = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, add_generation_prompt=True)
    assert ollama_render(template, TWO_TURNS, None, tmp_path) == expected


def test_the_merged_models_own_answers_are_what_the_file_is_held_to(merged):
    """The reference answers come from the merged model itself: greedy, stopped at end of turn."""
    from loraflow.export import reference

    model, _ = merged
    ref = reference(model, CONVERSATIONS, 12)
    assert len(ref.answers) == len(CONVERSATIONS) and all(0 < len(a) <= 12 for a in ref.answers)
    # each answer is what the merged model generates greedily, its last token a stop or the 12th
    assert all(a[-1] in ref.stops or len(a) == 12 for a in ref.answers)
