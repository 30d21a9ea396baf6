"""Chat templates, end-of-turn training, over-long examples, splits and the stored template.

Masks are checked from raw files in each schema through ingestion and validation, so what is
pinned is what a pipeline really trains.
"""

from __future__ import annotations

import json

import duckdb
import pytest

from loraflow.dataset import (
    DatasetError,
    assign_splits,
    build_dataset,
    load_split,
    sample_view,
    select_examples,
    stored_template,
    template_round_trip,
)
from loraflow.formatting import IGNORE_INDEX, tokenize_with_mask
from loraflow.ingest import ingest_file
from loraflow.spec import FormatSpec, QualitySpec, SourceSpec
from loraflow.templates import NAMED_TEMPLATES, TemplateError, end_of_turn, resolve_template, using_template
from loraflow.validate import validate_partition

END = "<|im_end|>"  # SmolLM2's end of turn (ChatML)

MULTI_TURN = [
    {"role": "user", "content": "Hi, is the shop open?"},
    {"role": "assistant", "content": "Yes, until six."},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": "Closed on Sundays."},
]
RECORDS = {
    "alpaca.jsonl": {
        "instruction": "Classify the message.",
        "input": "The kettle broke.",
        "output": "negative",
    },
    "chat.jsonl": {"messages": MULTI_TURN},
    "sharegpt.jsonl": {
        "conversations": [
            {"from": "system", "value": "Answer in one word."},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
            {"from": "human", "value": "Of Italy?"},
            {"from": "gpt", "value": "Rome."},
        ]
    },
}


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    )


def dataset_from_files(tokenizer, tmp_path, fmt: FormatSpec) -> dict[str, dict]:
    """Each schema's file ingested and validated in a DuckDB file, then built into a dataset."""
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    for name, record in RECORDS.items():
        path = tmp_path / name
        path.write_text(json.dumps(record) + "\n")
        ingest_file(con, "p", name, path, SourceSpec(path=name))
        validate_partition(con, "p", name, SourceSpec(path=name), QualitySpec())
    rows, _ = select_examples(con, "p")
    con.close()
    assert len(rows) == 3
    summary = build_dataset(
        rows, tokenizer, fmt, tokenizer.chat_template, "tok", tmp_path / "datasets", roles={}
    )
    stored = load_split(summary.path, "train") + load_split(summary.path, "eval")
    return {row["source_file"].rsplit("/", 1)[-1]: row for row in stored}


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        (
            "all",
            {
                "alpaca.jsonl": f"negative{END}",
                "chat.jsonl": f"Yes, until six.{END}Closed on Sundays.{END}",
                "sharegpt.jsonl": f"Paris.{END}Rome.{END}",
            },
        ),
        (
            "last",
            {
                "alpaca.jsonl": f"negative{END}",
                "chat.jsonl": f"Closed on Sundays.{END}",
                "sharegpt.jsonl": f"Rome.{END}",
            },
        ),
    ],
)
def test_masks_train_the_answers_of_every_schema(tokenizer, tmp_path, turns, expected):
    rows = dataset_from_files(tokenizer, tmp_path, FormatSpec(train_turns=turns, eval_size=0.01))
    assert {name: trained_text(tokenizer, row) for name, row in rows.items()} == expected
    # alpaca's instruction and input make one user turn, separated by a blank line
    assert "Classify the message.\n\nThe kettle broke." in tokenizer.decode(rows["alpaca.jsonl"]["input_ids"])
    # ShareGPT's own system turn replaces the template's default one
    assert "Answer in one word." in tokenizer.decode(rows["sharegpt.jsonl"]["input_ids"])
    assert all(row["end_trained"] for row in rows.values())


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_named_templates_train_the_answer_and_an_end_of_turn_token(tokenizer, name):
    with using_template(tokenizer, NAMED_TEMPLATES[name]):
        marker, eot_id = end_of_turn(tokenizer)
        example = tokenize_with_mask(tokenizer, MULTI_TURN)
    trained = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    )
    assert trained == f"Yes, until six.{marker}Closed on Sundays.{marker}"
    assert eot_id is not None and example.labels.count(eot_id) == 2
    assert tokenizer.chat_template != NAMED_TEMPLATES[name]  # restored after the block


def test_a_template_that_ends_turns_with_nothing_fails_the_end_of_turn_check(tokenizer, tmp_path):
    bare = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    rows = [
        {
            "partition": "f.jsonl",
            "source_file": "f.jsonl",
            "record_index": 1,
            "sub_index": 0,
            "messages": json.dumps(MULTI_TURN[:2]),
            "text": None,
            "example_hash": "ab" * 32,
        }
    ]
    summary = build_dataset(rows, tokenizer, FormatSpec(eval_size=0.01), bare, "tok", tmp_path)
    assert summary.end_of_turn.strip() == ""
    assert summary.examples_without_trained_end == 1


def test_template_choice_resolves_names_files_and_jinja(tokenizer, tmp_path):
    assert resolve_template(None, tokenizer) == (tokenizer.chat_template, "tokenizer")
    assert resolve_template("chatml", tokenizer)[0] == NAMED_TEMPLATES["chatml"]
    (tmp_path / "mine.jinja").write_text(NAMED_TEMPLATES["alpaca"])
    assert resolve_template("mine.jinja", tokenizer, tmp_path) == (
        NAMED_TEMPLATES["alpaca"],
        str(tmp_path / "mine.jinja"),
    )
    with pytest.raises(TemplateError, match="no template file"):
        resolve_template("missing.jinja", tokenizer, tmp_path)
    with using_template(tokenizer, None):
        text, source = resolve_template(None, tokenizer)
        assert text == NAMED_TEMPLATES["zephyr"] and "no template" in source


def rows_of(n: int, start: int = 0, partition: str = "f.jsonl", answer: str = "label") -> list[dict]:
    import hashlib

    return [
        {
            "partition": partition,
            "source_file": partition,
            "record_index": i + 1,
            "sub_index": 0,
            "messages": json.dumps(
                [
                    {"role": "user", "content": f"Classify message {i}."},
                    {"role": "assistant", "content": f"{answer} {i}"},
                ]
            ),
            "text": None,
            "example_hash": hashlib.sha256(f"{partition}{i}".encode()).hexdigest(),
        }
        for i in range(start, start + n)
    ]


def test_truncation_keeps_trainable_tokens_or_drops_the_example(tokenizer, tmp_path):
    long_prompt, long_answer = rows_of(1), rows_of(1, start=1)
    long_prompt[0]["messages"] = long_prompt[0]["messages"].replace("Classify", "word " * 300)
    long_answer[0]["messages"] = long_answer[0]["messages"].replace("label", "word " * 300)
    fmt = FormatSpec(max_seq_len=64, overlong="truncate", eval_size=0.01)
    summary = build_dataset(
        long_prompt + long_answer + rows_of(3, start=2),
        tokenizer,
        fmt,
        tokenizer.chat_template,
        "tok",
        tmp_path,
    )
    # the long prompt leaves no room for its answer: dropped, never kept with empty labels
    assert summary.dropped_untrainable_after_truncation == 1
    assert summary.truncated == 1 and summary.dropped_too_long == 0
    stored = load_split(summary.path, "train") + load_split(summary.path, "eval")
    assert len(stored) == 4 and all(row["trainable_tokens"] > 0 for row in stored)
    cut = next(row for row in stored if row["truncated"])
    assert cut["num_tokens"] == 64 and not cut["end_trained"]
    # a truncated example is not counted as missing its end: the check is about the template
    assert summary.examples_without_trained_end == 0


def test_overlong_error_names_the_examples(tokenizer, tmp_path):
    rows = rows_of(3)
    rows[1]["messages"] = rows[1]["messages"].replace("Classify", "word " * 300)
    with pytest.raises(DatasetError, match=r"1 example\(s\) are longer .* f.jsonl record 2 \(\d+ tokens\)"):
        build_dataset(
            rows,
            tokenizer,
            FormatSpec(max_seq_len=64, overlong="error"),
            tokenizer.chat_template,
            "tok",
            tmp_path,
        )
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_eval_count_holds_out_that_many_and_never_moves_training_examples_into_eval():
    small, grown = rows_of(100), rows_of(300)
    first, second = assign_splits(small, 10), assign_splits(grown, 10)
    assert sum(s == "eval" for s in first.values()) == 10 == sum(s == "eval" for s in second.values())
    assert all(second[h] == "train" for h, split in first.items() if split == "train")


def test_eval_sources_are_the_whole_eval_set(tokenizer, tmp_path):
    rows = rows_of(20) + rows_of(5, partition="heldout.jsonl")
    splits = assign_splits(rows, 0.5, roles={"heldout.jsonl": "eval"})
    assert {h for h, s in splits.items() if s == "eval"} == {r["example_hash"] for r in rows[20:]}
    summary = build_dataset(
        rows,
        tokenizer,
        FormatSpec(),
        tokenizer.chat_template,
        "tok",
        tmp_path,
        roles={"heldout.jsonl": "eval"},
    )
    assert (summary.train_examples, summary.eval_examples) == (20, 5)
    # marking a source train keeps it out of the hash split
    assert all(s == "train" for s in assign_splits(rows_of(50), 0.5, roles={"f.jsonl": "train"}).values())


def test_version_follows_template_tokenizer_and_format_but_not_packing(tokenizer, tmp_path):
    rows, template = rows_of(10), tokenizer.chat_template

    def version(fmt=None, chat_template=template, tokenizer_hash="tok"):
        return build_dataset(
            rows, tokenizer, fmt or FormatSpec(), chat_template, tokenizer_hash, tmp_path
        ).version

    first = version()
    again = build_dataset(rows, tokenizer, FormatSpec(), template, "tok", tmp_path)
    assert again.version == first and again.reused
    assert version(chat_template=NAMED_TEMPLATES["chatml"]) != first
    assert version(tokenizer_hash="other") != first
    assert version(FormatSpec(max_seq_len=128)) != first
    assert version(FormatSpec(packing=True)) == first


def test_stored_template_reproduces_training_and_a_changed_one_is_caught(tokenizer, tmp_path):
    fmt = FormatSpec(eval_size=0.2)
    summary = build_dataset(rows_of(10), tokenizer, fmt, NAMED_TEMPLATES["zephyr"], "tok", tmp_path)
    assert stored_template(summary.path) == NAMED_TEMPLATES["zephyr"]
    assert template_round_trip(tokenizer, summary.path, fmt) == []
    (tmp_path / summary.version / "chat_template.jinja").write_text(NAMED_TEMPLATES["chatml"])
    assert len(template_round_trip(tokenizer, summary.path, fmt)) == 10


def test_sample_view_marks_exactly_the_trained_spans(tokenizer, tmp_path):
    summary = build_dataset(
        rows_of(4), tokenizer, FormatSpec(eval_size=0.01), tokenizer.chat_template, "tok", tmp_path
    )
    row = load_split(summary.path, "train")[0]
    view = sample_view(tokenizer, row)
    assert view.count("[[") == 1 and view.endswith(f"label {row['record_index'] - 1}{END}]]\n")
    assert view.replace("[[", "").replace("]]", "") == tokenizer.decode(row["input_ids"])
    assert all(label == IGNORE_INDEX for label in row["labels"][:5])
