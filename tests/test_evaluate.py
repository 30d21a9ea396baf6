"""Evaluation: the metrics on hand-computed cases, the forgetting probe, the gate's verdict, and
generation that stops at the template's end-of-turn token."""

from __future__ import annotations

import json
import math

import pytest

from loraflow.evaluate import (
    EvalReport,
    Forgetting,
    ModelScores,
    answer_metrics,
    evaluate_adapter,
    format_checker,
    generate_answers,
    rouge_l,
    token_f1,
)
from loraflow.gate import gate_verdict
from loraflow.spec import EvaluationSpec, ForgettingSpec, GateSpec

TRIAGE = r"sentiment: (positive|negative) \| topic: (billing|delivery) \| summary: [^|\n]+"


# ---------------------------------------------------------------------------------------------
# metrics


def test_token_f1_is_the_harmonic_mean_of_word_precision_and_recall():
    # 3 common words; precision 3/3, recall 3/4
    assert token_f1("The cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    # case and punctuation do not count; repeated words count as often as both sides have them
    assert token_f1("Billing!", "billing") == 1.0
    assert token_f1("late late late", "late parcel") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("", "") == 1.0 and token_f1("words", "") == 0.0 and token_f1("a b", "c d") == 0.0


def test_rouge_l_is_the_mean_f_measure_of_the_longest_common_word_subsequence():
    # "a c d" is the longest common subsequence of 4 words each: F = 0.75; the second pair is exact
    assert rouge_l(["a b c d", "same words"], ["a x c d", "same words"]) == pytest.approx((0.75 + 1.0) / 2)
    assert rouge_l(["entirely different"], ["nothing shared"]) == 0.0
    assert rouge_l([], []) == 0.0


def test_format_match_by_regex_needs_the_whole_answer_to_match():
    matches = format_checker(EvaluationSpec(format_regex=TRIAGE))
    assert matches("sentiment: positive | topic: billing | summary: refund arrived")
    assert not matches("sentiment: positive | topic: billing | summary: ok | extra: field")
    assert not matches("Sentiment: Positive - the refund arrived")
    assert not matches("Here you go: sentiment: positive | topic: billing | summary: ok")
    assert format_checker(EvaluationSpec()) is None


def test_format_match_by_json_schema_parses_the_answer_and_validates_it(tmp_path):
    schema = {
        "type": "object",
        "required": ["label"],
        "properties": {"label": {"enum": ["spam", "ham"]}, "score": {"type": "number"}},
        "additionalProperties": False,
    }
    (tmp_path / "answer.json").write_text(json.dumps(schema))
    inline = format_checker(EvaluationSpec(format_json_schema=schema))
    from_file = format_checker(EvaluationSpec(format_json_schema="answer.json"), root=tmp_path)
    for matches in (inline, from_file):
        assert matches('{"label": "spam", "score": 0.9}')
        assert not matches('{"label": "eggs"}')  # not an allowed value
        assert not matches('{"score": 1}')  # missing the required key
        assert not matches('{"label": "ham", "why": "x"}')  # a key the schema forbids
        assert not matches("label: spam")  # not JSON at all
    from loraflow.evaluate import EvaluationError

    with pytest.raises(EvaluationError, match="cannot read .*missing.json"):
        format_checker(EvaluationSpec(format_json_schema="missing.json"), root=tmp_path)


def test_answer_metrics_average_each_metric_over_the_answers():
    answers = ["sentiment: positive | topic: billing | summary: refund", "the parcel is late ", "no"]
    references = [
        "sentiment: positive | topic: billing | summary: refund",
        "the parcel is late",
        "sentiment: negative | topic: delivery | summary: late parcel",
    ]
    metrics = answer_metrics(answers, references, format_checker(EvaluationSpec(format_regex=TRIAGE)))
    assert metrics["exact_match"] == pytest.approx(2 / 3)  # surrounding whitespace does not count
    assert metrics["token_f1"] == pytest.approx((1 + 1 + 0) / 3)
    assert metrics["rouge_l"] == pytest.approx((1 + 1 + 0) / 3)
    assert metrics["format_match"] == pytest.approx(1 / 3)
    assert "format_match" not in answer_metrics(answers, references)
    assert answer_metrics([], []) == {}


# ---------------------------------------------------------------------------------------------
# the gate


def report(base: dict, tuned: dict, published: dict | None = None, forgetting: float | None = None):
    probe = None
    if forgetting is not None:
        probe = Forgetting(["p"], ["a"], ["b"], base_loss=1.0, tuned_loss=forgetting)
    return EvalReport(
        examples=8,
        base=ModelScores(metrics=base),
        tuned=ModelScores(metrics=tuned),
        references=[],
        prompts=[],
        published=ModelScores(metrics=published) if published is not None else None,
        published_version="v1" if published is not None else None,
        forgetting=probe,
    )


def test_the_gate_needs_a_higher_is_better_metric_to_rise_by_min_improvement():
    scored = report({"token_f1": 0.2}, {"token_f1": 0.5})
    passed = gate_verdict(scored, GateSpec(metric="token_f1", min_improvement=0.25))
    assert passed.passed and passed.failures == []
    assert passed.figures["improvement"] == pytest.approx(0.3) and passed.figures["required"] == 0.25
    failed = gate_verdict(scored, GateSpec(metric="token_f1", min_improvement=0.4))
    assert not failed.passed
    assert failed.failures == [
        "token_f1: the tuned model improves by +0.3000 over the base, the gate needs +0.4000 (short by 0.1000)"
    ]


def test_the_gate_needs_eval_loss_to_fall_and_fails_a_tuned_model_that_got_worse():
    better = report({"eval_loss": 3.0}, {"eval_loss": 2.0})
    assert gate_verdict(better, GateSpec(metric="eval_loss", min_improvement=0.5)).passed
    worse = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 3.5}), GateSpec(metric="eval_loss"))
    assert not worse.passed and worse.figures["improvement"] == pytest.approx(-0.5)
    assert worse.failures == [
        "eval_loss: the tuned model improves by -0.5000 over the base, the gate needs +0.0000 (short by 0.5000)"
    ]


def test_the_gate_fails_on_a_metric_that_was_not_measured():
    verdict = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}), GateSpec(metric="format_match"))
    assert not verdict.passed and verdict.figures["improvement"] == -math.inf
    assert verdict.failures == [
        "format_match: not measured for this dataset (no conversations to answer), so it cannot pass"
    ]


def test_the_gate_bounds_forgetting_and_fails_when_it_was_not_measured():
    gate = GateSpec(metric="eval_loss", max_forgetting_ratio=1.5)
    drifted = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}, forgetting=1.6), gate)
    assert not drifted.passed and drifted.figures["forgetting_ratio"] == pytest.approx(1.6)
    assert drifted.failures == [
        "forgetting: the tuned model's loss on the base's own answers to general prompts is 1.60x the base's, "
        "the gate allows 1.50x (over by 0.10)"
    ]
    assert gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}, forgetting=1.2), gate).passed
    unmeasured = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}), gate)
    assert not unmeasured.passed and "forgetting" in unmeasured.failures[0]
    # reported, not gated, without a bound
    free = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}, forgetting=9.0), GateSpec())
    assert free.passed and free.figures["forgetting_ratio"] == 9.0


def test_the_gate_can_require_beating_the_published_version():
    gate = GateSpec(metric="eval_loss", must_beat_published=True)
    behind = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}, published={"eval_loss": 1.8}), gate)
    assert not behind.passed
    assert behind.figures["improvement_over_published"] == pytest.approx(-0.2)
    assert behind.failures == [
        "eval_loss: the tuned model is 0.2000 worse than the published version v1 on the same examples"
    ]
    ahead = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}, published={"eval_loss": 2.5}), gate)
    assert ahead.passed and ahead.figures["published_version"] == "v1"
    # nothing published yet: nothing to beat
    first = gate_verdict(report({"eval_loss": 3.0}, {"eval_loss": 2.0}), gate)
    assert first.passed and "improvement_over_published" not in first.figures
    # without the rule a worse retrain still passes
    relaxed = gate_verdict(
        report({"eval_loss": 3.0}, {"eval_loss": 2.0}, published={"eval_loss": 1.8}), GateSpec()
    )
    assert relaxed.passed


# ---------------------------------------------------------------------------------------------
# the forgetting probe, on a real model


@pytest.fixture(scope="module")
def eval_dataset(tokenizer, tmp_path_factory):
    from test_training import dataset

    return dataset(tokenizer, tmp_path_factory.mktemp("eval-data"), tokenizer.chat_template, eval_size=6).path


@pytest.fixture(scope="module")
def untied_model_dir(tokenizer, tmp_path_factory):
    """A tiny Llama with its own output head: with tied embeddings a random model only ever repeats the
    prompt's last token (a newline here), an answer of nothing once stripped."""
    import torch
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("untied-llama")
    config = tiny_llama_config(
        vocab_size=len(tokenizer), tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_adapter(base_dir, folder, scale: float):
    """A LoRA adapter on the tiny model; its B matrices are zero (no change at all) or random * scale."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * scale)
    model.save_pretrained(folder)
    return folder


PROBE = EvaluationSpec(
    max_examples=4,
    max_new_tokens=4,
    forgetting=ForgettingSpec(
        prompts=["What is the capital of Australia?", "Name three colours."], max_new_tokens=8
    ),
)


def test_a_model_compared_with_itself_has_a_forgetting_ratio_of_one(untied_model_dir, eval_dataset, tmp_path):
    unchanged = save_adapter(untied_model_dir, tmp_path / "zero", scale=0.0)
    scored = evaluate_adapter(untied_model_dir, unchanged, eval_dataset, PROBE)
    assert scored.forgetting is not None and len(scored.forgetting.prompts) == 2
    assert scored.forgetting.ratio == pytest.approx(1.0, abs=1e-6)
    assert scored.forgetting.tuned_answers == scored.forgetting.base_answers
    assert scored.tuned.metrics == pytest.approx(scored.base.metrics)


def test_a_perturbed_adapter_raises_the_forgetting_ratio(untied_model_dir, eval_dataset, tmp_path):
    perturbed = save_adapter(untied_model_dir, tmp_path / "noise", scale=0.5)
    scored = evaluate_adapter(untied_model_dir, perturbed, eval_dataset, PROBE)
    assert scored.forgetting.ratio > 1.02  # near-uniform random model: every loss is about ln(vocab)
    assert scored.forgetting.tuned_loss > scored.forgetting.base_loss
    assert "ratio" in scored.forgetting_markdown() and "| forgetting" in scored.table()


# ---------------------------------------------------------------------------------------------
# generation stops at the end of a turn

# Turns end with <|endoftext|>, which is not this tokenizer's eos (<|im_end|>): a stop on eos alone
# would run past the answer.
ENDOFTEXT_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|endoftext|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def talker(tokenizer, tmp_path_factory):
    """A tiny Llama that learned one conversation by heart, and after its end-of-turn token goes on
    with more words: (model folder, tokenizer with the template, the rendered prompt)."""
    import torch
    from conftest import tiny_llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("talker")
    tokenizer.save_pretrained(folder)
    chat = AutoTokenizer.from_pretrained(folder)
    chat.chat_template = ENDOFTEXT_TEMPLATE
    messages = [{"role": "user", "content": "Is the shop open on Sunday?"}]
    prompt = chat.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = prompt + "Yes, until noon.<|endoftext|>\nAnd then some words that follow the turn"
    ids = torch.tensor([chat(text, add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        tiny_llama_config(vocab_size=len(chat), tie_word_embeddings=True, pad_token_id=chat.pad_token_id)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss) < 0.05
    model.generation_config.eos_token_id = chat.eos_token_id
    model.save_pretrained(folder)
    chat.save_pretrained(folder)
    return folder, chat, prompt


def test_generated_answers_stop_at_the_templates_end_of_turn_token(talker):
    import torch
    from transformers import AutoModelForCausalLM

    folder, chat, prompt = talker
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert generate_answers(model, chat, [prompt], max_new_tokens=16, batch_size=1) == ["Yes, until noon."]
    # the model itself goes on past the turn: only the stop token ends the answer there
    ids = chat(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        longer = model.generate(**ids, max_new_tokens=16, do_sample=False, eos_token_id=chat.eos_token_id)
    assert "And then some words" in chat.decode(longer[0, ids["input_ids"].shape[1] :])


def test_a_published_model_stops_at_the_end_of_turn_on_its_own(talker, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.merge import merge_adapter

    folder, chat, prompt = talker
    adapter = save_adapter(folder, tmp_path / "adapter", scale=1e-3)
    chat.save_pretrained(adapter)  # the adapter carries the template it was trained with
    result = merge_adapter(folder, adapter, tmp_path / "models", "v1", "float32", "# card\n", probes=[prompt])
    published = AutoModelForCausalLM.from_pretrained(result.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.path)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext in published.generation_config.eos_token_id
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():  # no stop tokens given: the folder's generation config decides
        output = published.generate(**ids, max_new_tokens=16, do_sample=False)
    assert (
        tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        == "Yes, until noon."
    )
