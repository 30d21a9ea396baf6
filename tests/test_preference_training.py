"""Preference pairs from the dataset to ORPO on the tiny model, and their metrics. DPO is trained,
evaluated and gated through Dagster in test_preference_pipeline.py.

The pairs are generated here: a question about a number, the right one-word answer chosen, a wrong
and rambling one rejected. Both sequences of a pair render the same prompt with the chat template.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from loraflow.dataset import build_dataset, load_split
from loraflow.evaluate import EvalReport, ModelScores, pair_metrics
from loraflow.formatting import IGNORE_INDEX
from loraflow.gate import gate_verdict
from loraflow.spec import FormatSpec, GateSpec, LoraSpec, TrainingSpec
from loraflow.train import TrainingError, train_adapter


def pair_row(i: int, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    """A validated preference row as the warehouse stores it (messages = prompt + chosen)."""
    return {
        "partition": "pairs.jsonl",
        "source_file": "pairs.jsonl",
        "record_index": i,
        "sub_index": 0,
        "messages": json.dumps(prompt + chosen),
        "text": None,
        "example_hash": hashlib.sha256(f"pair {i}".encode()).hexdigest(),
        "rejected": json.dumps(rejected),
        "prompt_turns": len(prompt),
    }


def parity_pairs(n: int = 32) -> list[dict]:
    rows = []
    for i in range(n):
        right, wrong = ("even", "odd") if i % 2 == 0 else ("odd", "even")
        rows.append(
            pair_row(
                i,
                [{"role": "user", "content": f"Is {i} odd or even?"}],
                [{"role": "assistant", "content": right}],
                [{"role": "assistant", "content": f"I think that {i} is {wrong}, probably, more or less."}],
            )
        )
    return rows


@pytest.fixture(scope="module")
def pairs(tokenizer, tmp_path_factory):
    fmt = FormatSpec(eval_size=8, max_seq_len=128)
    return build_dataset(
        parity_pairs(), tokenizer, fmt, tokenizer.chat_template, "tok", tmp_path_factory.mktemp("d")
    )


def preference_spec(objective: str, **overrides) -> TrainingSpec:
    settings = dict(
        objective=objective,
        method="lora",
        lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        max_steps=6,
        batch_size=8,
        learning_rate=1e-2,
        log_every=1,
        checkpoint_every=None,
    )
    return TrainingSpec(**{**settings, **overrides})


def test_a_pair_trains_only_its_answers_and_shares_the_prompt_tokens(pairs, tokenizer):
    assert pairs.preference_pairs == 32 and pairs.train_examples == 24 and pairs.eval_examples == 8
    row = load_split(pairs.path, "train")[0]
    shared = row["prompt_tokens"]
    assert row["input_ids"][:shared] == row["rejected_input_ids"][:shared]
    assert set(row["labels"][:shared]) == set(row["rejected_labels"][:shared]) == {IGNORE_INDEX}

    def trained(ids, labels):
        return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])

    chosen, rejected = row["messages"][-1]["content"], row["rejected"][-1]["content"]
    assert trained(row["input_ids"], row["labels"]) == chosen + "<|im_end|>"
    assert trained(row["rejected_input_ids"], row["rejected_labels"]) == rejected + "<|im_end|>"
    assert row["prompt_turns"] == len(row["messages"]) - 1  # SmolLM2's default system turn included


def test_an_overlong_pair_is_truncated_on_both_sides_or_dropped(tokenizer, tmp_path):
    long = [{"role": "assistant", "content": "word " * 200}]
    rows = [
        pair_row(
            1, [{"role": "user", "content": "Say something."}], [{"role": "assistant", "content": "ok"}], long
        ),
        pair_row(
            2, [{"role": "user", "content": "prompt " * 200}], [{"role": "assistant", "content": "ok"}], long
        ),
    ]
    fmt = FormatSpec(eval_size=0.01, max_seq_len=64, overlong="truncate")
    summary = build_dataset(rows, tokenizer, fmt, tokenizer.chat_template, "tok", tmp_path)
    # the first keeps its prompt and both answers' first tokens; the second's prompt fills the row alone
    assert summary.truncated == 1 and summary.dropped_untrainable_after_truncation == 1
    (kept,) = load_split(summary.path, "train")
    assert len(kept["rejected_input_ids"]) == 64 and kept["truncated"]
    dropped = build_dataset(
        rows, tokenizer, fmt.model_copy(update={"overlong": "drop"}), tokenizer.chat_template, "t2", tmp_path
    )
    assert dropped.dropped_too_long == 2 and dropped.train_examples == 0


def test_orpo_trains_without_a_reference_and_reports_reward_accuracy(pairs, tiny_model_dir, tmp_path):
    result = train_adapter(
        preference_spec("orpo", max_steps=4, eval_every=2), tiny_model_dir, pairs.path, tmp_path / "orpo"
    )
    assert result.objective == "orpo"
    assert result.loss_curve[-1][1] < result.loss_curve[0][1]
    assert result.reward_accuracy is not None and len(result.reward_curve) == 4
    assert [step for step, _ in result.eval_curve] == [2, 4]  # the held-out pairs' ORPO loss


def test_preference_metrics_compare_each_pair_with_the_base():
    base = [1.0, -1.0, 0.5, -2.0]
    tuned = [2.0, -0.5, 0.0, -2.0]  # more on two pairs, less on one, the same on the last
    assert pair_metrics(tuned, base) == {
        "preference_accuracy": 0.25,
        "preference_margin": pytest.approx(-0.125),
        "reward_accuracy": 0.5,
        "reward_margin": pytest.approx(0.25),
    }
    assert pair_metrics(base, base)["reward_accuracy"] == 0.0


def test_a_preference_objective_needs_pairs(tokenizer, tiny_model_dir, tmp_path):
    rows = [
        {
            **pair_row(
                i, [{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "a"}], []
            ),
            "rejected": None,
        }
        for i in range(8)
    ]
    chats = build_dataset(
        rows, tokenizer, FormatSpec(eval_size=0.01), tokenizer.chat_template, "tok", tmp_path
    )
    with pytest.raises(TrainingError, match="holds none: give the pipeline sources with format: preference"):
        train_adapter(preference_spec("dpo"), tiny_model_dir, chats.path, tmp_path / "a")


def test_the_gate_reads_reward_accuracy_against_the_base_and_fails_without_pairs():
    base_margins, tuned_margins = [1.0, -1.0, 0.5, -2.0], [2.0, -0.5, 0.0, -1.0]
    base = ModelScores(metrics={"eval_loss": 1.0, **pair_metrics(base_margins, base_margins)})
    tuned = ModelScores(metrics={"eval_loss": 1.1, **pair_metrics(tuned_margins, base_margins)})
    report = EvalReport(examples=4, base=base, tuned=tuned, references=[], prompts=[])
    assert gate_verdict(report, GateSpec(metric="reward_accuracy", min_improvement=0.75)).passed
    failed = gate_verdict(report, GateSpec(metric="reward_accuracy", min_improvement=0.8))
    assert failed.failures == [
        "reward_accuracy: the tuned model improves by +0.7500 over the base, the gate needs +0.8000 "
        "(short by 0.0500)"
    ]
    chats = EvalReport(
        examples=4,
        base=ModelScores({"eval_loss": 1.0}),
        tuned=ModelScores({"eval_loss": 0.9}),
        references=[],
        prompts=[],
    )
    (reason,) = gate_verdict(chats, GateSpec(metric="preference_margin")).failures
    assert "no preference pairs in the eval split" in reason


def test_dpo_trains_a_prefix_whose_reference_is_the_base(pairs, tiny_model_dir, tmp_path):
    from loraflow.adapters import adapter_method

    spec = preference_spec("dpo", adapter="prefix", lora=LoraSpec(), max_steps=2, batch_size=4)
    result = train_adapter(spec, tiny_model_dir, pairs.path, tmp_path / "prefix")
    assert adapter_method(tmp_path / "prefix") == "prefix" and result.trainable_params > 0
    # a new prefix is random, so unlike a new LoRA it already moves the policy off the base at step 1
    assert result.loss_curve[0][1] != pytest.approx(math.log(2), abs=1e-5)
    assert len(result.reward_curve) == 2
