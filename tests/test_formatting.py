"""Chat formatting, loss masks and the train/eval split."""

from __future__ import annotations

from loraflow.dataset import build_dataset, is_eval, load_split
from loraflow.formatting import IGNORE_INDEX, alpaca_messages, tokenize_with_mask
from loraflow.spec import FormatSpec


def test_only_the_answer_and_its_end_of_turn_token_are_trained(tokenizer):
    messages = alpaca_messages("Triage this.", "My kettle broke.", "sentiment: negative", "Be brief.")
    example = tokenize_with_mask(tokenizer, messages)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "sentiment: negative<|im_end|>"
    assert trained[-1] == tokenizer.eos_token_id
    # labels equal the input ids where trained: the model's own shift makes them next-token targets
    assert all(
        label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True)
    )


def test_alpaca_fields_join_into_one_user_turn(tokenizer):
    with_input = alpaca_messages("Summarize.", "Long text.", "Short.", None)
    assert with_input == [
        {"role": "user", "content": "Summarize.\n\nLong text."},
        {"role": "assistant", "content": "Short."},
    ]
    assert alpaca_messages("Say hi.", "  ", "Hi.", None)[0]["content"] == "Say hi."


def test_split_is_decided_by_content_hash_alone():
    import hashlib

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]
    held_out = {h for h in hashes if is_eval(h, 0.25)}
    assert 60 < len(held_out) < 140  # about a quarter
    assert held_out == {h for h in hashes if is_eval(h, 0.25)}  # deterministic


def _rows(n: int, start: int = 0) -> list[dict]:
    import hashlib

    return [
        {
            "instruction": "Classify.",
            "input": f"message {i}",
            "output": f"label {i % 3}",
            "example_hash": hashlib.sha256(f"ex{i}".encode()).hexdigest(),
            "source_file": "f.jsonl",
            "line_number": i + 1,
        }
        for i in range(start, start + n)
    ]


def test_adding_data_never_moves_an_example_between_splits(tokenizer, tmp_path):
    fmt = FormatSpec(eval_fraction=0.2)
    small = build_dataset(_rows(50), tokenizer, fmt, "base", tmp_path)
    grown = build_dataset(_rows(50) + _rows(50, start=50), tokenizer, fmt, "base", tmp_path)
    assert small.version != grown.version

    def held_out(summary):
        return {r["example_hash"] for r in load_split(summary.path, "eval")}

    old = {r["example_hash"] for r in _rows(50)}
    assert held_out(grown) & old == held_out(small)


def test_unchanged_inputs_reuse_the_stored_dataset(tokenizer, tmp_path):
    fmt = FormatSpec()
    first = build_dataset(_rows(20), tokenizer, fmt, "base", tmp_path)
    second = build_dataset(list(reversed(_rows(20))), tokenizer, fmt, "base", tmp_path)
    assert (first.reused, second.reused) == (False, True)
    assert second.version == first.version
    assert (
        build_dataset(_rows(20), tokenizer, FormatSpec(system_prompt="Hi."), "base", tmp_path).version
        != first.version
    )


def test_overlong_examples_are_dropped_and_counted(tokenizer, tmp_path):
    rows = _rows(5)
    rows[0]["input"] = "word " * 400
    summary = build_dataset(rows, tokenizer, FormatSpec(max_seq_len=64), "base", tmp_path)
    assert summary.dropped_too_long == 1
    assert summary.train_examples + summary.eval_examples == 4
