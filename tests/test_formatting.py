"""Chat formatting, loss masks and the train/eval split."""

from __future__ import annotations

from loraflow.dataset import build_dataset, is_eval, load_split
from loraflow.formatting import IGNORE_INDEX, tokenize_completion, tokenize_with_mask, with_system_prompt
from loraflow.spec import FormatSpec


def build(rows: list[dict], tokenizer, fmt: FormatSpec, folder, **options):
    """build_dataset with the tokenizer's own template and a fixed tokenizer hash."""
    return build_dataset(rows, tokenizer, fmt, tokenizer.chat_template, "tok", folder, **options)


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_only_the_answer_and_its_end_of_turn_token_are_trained(tokenizer):
    messages = with_system_prompt(
        conversation("Triage: my kettle broke.", "sentiment: negative"), "Be brief."
    )
    example = tokenize_with_mask(tokenizer, messages)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "sentiment: negative<|im_end|>"
    assert trained[-1] == tokenizer.eos_token_id
    # labels equal the input ids where trained: the model's own shift makes them next-token targets
    assert all(
        label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True)
    )


def test_every_assistant_turn_of_a_conversation_is_trained(tokenizer):
    messages = conversation("Hi", "Hello.") + conversation("Bye", "Goodbye.")
    example = tokenize_with_mask(tokenizer, messages)
    trained = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    )
    assert trained == "Hello.<|im_end|>Goodbye.<|im_end|>"


def test_system_prompt_does_not_replace_the_conversations_own():
    own = [{"role": "system", "content": "Mine."}, *conversation("a", "b")]
    assert with_system_prompt(own, "Pipeline's.") == own
    assert with_system_prompt(conversation("a", "b"), "Pipeline's.")[0] == {
        "role": "system",
        "content": "Pipeline's.",
    }


def test_completion_text_is_trained_whole_and_ends_in_eos(tokenizer):
    example = tokenize_completion(tokenizer, "Once upon a time.")
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_split_is_decided_by_content_hash_alone():
    import hashlib

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    held_out = {h for h in hashes if is_eval(h, 0.25)}
    assert 60 < len(held_out) < 140  # about a quarter
    # a larger fraction only adds examples to the held-out set: none moves back into training
    assert held_out <= {h for h in hashes if is_eval(h, 0.4)}


def _rows(n: int, start: int = 0) -> list[dict]:
    import hashlib
    import json

    return [
        {
            "messages": json.dumps(conversation(f"Classify message {i}.", f"label {i % 3}")),
            "text": None,
            "example_hash": hashlib.sha256(f"ex{i}".encode()).hexdigest(),
            "partition": "f.jsonl",
            "source_file": "f.jsonl",
            "record_index": i + 1,
            "sub_index": 0,
        }
        for i in range(start, start + n)
    ]


def test_adding_data_never_moves_an_example_between_splits(tokenizer, tmp_path):
    fmt = FormatSpec(eval_size=0.2)
    small = build(_rows(50), tokenizer, fmt, tmp_path)
    grown = build(_rows(50) + _rows(50, start=50), tokenizer, fmt, tmp_path)
    assert small.version != grown.version

    def held_out(summary):
        return {r["example_hash"] for r in load_split(summary.path, "eval")}

    old = {r["example_hash"] for r in _rows(50)}
    assert held_out(grown) & old == held_out(small)


def test_unchanged_inputs_reuse_the_stored_dataset(tokenizer, tmp_path):
    fmt = FormatSpec()
    first = build(_rows(20), tokenizer, fmt, tmp_path)
    second = build(list(reversed(_rows(20))), tokenizer, fmt, tmp_path)
    assert (first.reused, second.reused) == (False, True)
    assert second.version == first.version
    assert build(_rows(20), tokenizer, FormatSpec(system_prompt="Hi."), tmp_path).version != first.version


def test_overlong_examples_are_dropped_and_counted(tokenizer, tmp_path):
    rows = _rows(5)
    rows[0]["messages"] = rows[0]["messages"].replace("Classify", "word " * 400)
    summary = build(rows, tokenizer, FormatSpec(max_seq_len=64), tmp_path)
    assert summary.dropped_too_long == 1
    assert summary.train_examples + summary.eval_examples == 4


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    )


def test_last_turn_mode_trains_only_the_final_answer(tokenizer):
    messages = conversation("Hi", "Hello.") + conversation("Bye", "Goodbye.")
    example = tokenize_with_mask(tokenizer, messages, train_turns="last")
    assert trained_text(tokenizer, example) == "Goodbye.<|im_end|>"


def test_train_on_inputs_trains_every_token(tokenizer):
    example = tokenize_with_mask(tokenizer, conversation("Hi", "Hello."), train_on_inputs=True)
    assert example.labels == example.input_ids


def test_turn_modes_change_the_dataset_version(tokenizer, tmp_path):
    plain = build(_rows(10), tokenizer, FormatSpec(), tmp_path)
    last = build(_rows(10), tokenizer, FormatSpec(train_turns="last"), tmp_path)
    assert plain.version != last.version


def test_conversations_and_plain_texts_share_one_dataset(tokenizer, tmp_path):
    import hashlib

    texts = [
        {
            "messages": None,
            "text": f"Story number {i}.",
            "example_hash": hashlib.sha256(f"t{i}".encode()).hexdigest(),
            "partition": "t.jsonl",
            "source_file": "t.jsonl",
            "record_index": i + 1,
            "sub_index": 0,
        }
        for i in range(5)
    ]
    summary = build(_rows(5) + texts, tokenizer, FormatSpec(eval_size=0.01), tmp_path)
    rows = load_split(summary.path, "train") + load_split(summary.path, "eval")
    plain = [r for r in rows if r["messages"] is None]
    assert len(rows) == 10 and len(plain) == 5
    assert all(r["labels"] == r["input_ids"] and r["input_ids"][-1] == tokenizer.eos_token_id for r in plain)
    assert all(0 < r["trainable_tokens"] < r["num_tokens"] for r in rows if r["messages"] is not None)


def test_a_dataset_of_plain_texts_only_builds(tokenizer, tmp_path):
    import hashlib

    texts = [
        {
            "partition": "t.jsonl",
            "source_file": "t.jsonl",
            "record_index": i + 1,
            "sub_index": 0,
            "messages": None,
            "text": f"Plain story number {i}.",
            "example_hash": hashlib.sha256(f"plain{i}".encode()).hexdigest(),
        }
        for i in range(6)
    ]
    summary = build(texts, tokenizer, FormatSpec(eval_size=1), tmp_path)
    assert (summary.train_examples, summary.eval_examples) == (5, 1)
    assert summary.examples_without_trained_end == 0
