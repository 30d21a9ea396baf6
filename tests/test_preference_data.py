"""Preference pairs (DPO, ORPO) through ingestion and validation: every shape a dataset stores them
in becomes prompt + chosen in `messages`, the rejected continuation in `rejected`, and the prompt's
length in `prompt_turns`; bad pairs are quarantined with a reason, and raw = valid + quarantined."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pytest

from loraflow.ingest import ingest_file
from loraflow.preference import PairProblem, PreferencePair, parse_pair, parse_transcript
from loraflow.spec import PiiSpec, QualitySpec, SourceSpec
from loraflow.validate import SchemaError, classified_frame, partition_counts, validate_partition

ANY = SourceSpec(path="*")


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def hh(*turns: str) -> str:
    """An hh-rlhf transcript of alternating Human and Assistant turns."""
    speakers = ("Human", "Assistant")
    return "".join(f"\n\n{speakers[i % 2]}: {turn}" for i, turn in enumerate(turns))


def hh_pair(i: int) -> dict:
    """A record in the hh-rlhf test set's own schema: two whole dialogues sharing the question."""
    return {"chosen": hh(f"What is {i}?", f"{i} is a number."), "rejected": hh(f"What is {i}?", "No idea.")}


@pytest.fixture
def con():
    connection = duckdb.connect()
    yield connection
    connection.close()


def validate_records(con, tmp_path: Path, records: list, source: SourceSpec = ANY, quality=None, key="k"):
    path = tmp_path / f"{key}.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    ingest_file(con, "p", key, path, source)
    result = validate_partition(con, "p", key, source, quality or QualitySpec())
    assert result.raw == result.valid + result.quarantined == len(records)
    assert partition_counts(con, "p", key) == (result.raw, result.valid, result.quarantined)
    return result


def stored(con, key="k") -> dict[int, tuple[list, list, int]]:
    rows = con.execute(
        "SELECT record_index, messages, rejected, prompt_turns FROM p.validated_examples "
        "WHERE partition = ? ORDER BY 1",
        [key],
    ).fetchall()
    return {index: (json.loads(m), json.loads(r), turns) for index, m, r, turns in rows}


def quarantined(con, key="k") -> dict[int, tuple[str, str | None]]:
    rows = con.execute(
        "SELECT record_index, reason, detail FROM p.quarantine WHERE partition = ? ORDER BY 1", [key]
    ).fetchall()
    return {index: (reason, detail) for index, reason, detail in rows}


# ---------------------------------------------------------------------------------------------
# the shapes, through validation


def test_hh_rlhf_transcripts_are_detected_and_split_into_prompt_and_continuations(con, tmp_path):
    result = validate_records(con, tmp_path, [hh_pair(i) for i in range(3)])
    assert (result.schema, result.valid) == ("preference", 3)
    messages, rejected, prompt_turns = stored(con)[2]
    assert messages == [user("What is 1?"), assistant("1 is a number.")]
    assert rejected == [assistant("No idea.")]
    assert prompt_turns == 1
    schemas = con.execute("SELECT DISTINCT schema FROM p.validated_examples").fetchall()
    assert schemas == [("preference",)]


def test_multi_turn_transcripts_keep_the_shared_dialogue_in_the_prompt(con, tmp_path):
    shared = ("Hi.", "Hello! How can I help?", "Name a prime.")
    diverge_at_answer = {"chosen": hh(*shared, "7."), "rejected": hh(*shared, "8.")}
    # the rejected dialogue stops after the first answer: the shared part ends with an assistant
    # turn, so the prompt backs up to the last shared user turn and both continuations start there
    one_stops_early = {"chosen": hh(*shared, "7."), "rejected": hh(*shared[:2])}
    result = validate_records(con, tmp_path, [diverge_at_answer, one_stops_early])
    assert result.valid == 2
    rows = stored(con)
    assert rows[1] == (
        [user("Hi."), assistant("Hello! How can I help?"), user("Name a prime."), assistant("7.")],
        [assistant("8.")],
        3,
    )
    assert rows[2] == (
        [user("Hi."), assistant("Hello! How can I help?"), user("Name a prime."), assistant("7.")],
        [assistant("Hello! How can I help?")],
        1,
    )


def test_a_transcript_prompt_drops_its_open_assistant_marker(con, tmp_path):
    record = {
        "prompt": hh("Hi.", "Hello.", "Capital of France?", ""),
        "chosen": " Paris.",
        "rejected": " Lyon.\n",
    }
    assert record["prompt"].endswith("\n\nAssistant: ")
    validate_records(con, tmp_path, [record])
    assert stored(con)[1] == (
        [user("Hi."), assistant("Hello."), user("Capital of France?"), assistant("Paris.")],
        [assistant("Lyon.")],
        3,
    )


def test_prompt_chosen_rejected_texts_and_message_lists(con, tmp_path):
    texts = {"prompt": "  Say hi.  ", "chosen": "Hi!", "rejected": "No."}
    lists = {
        "prompt": [{"role": "system", "content": "Be kind."}, user("Say hi.")],
        "chosen": [assistant("Hi!")],
        "rejected": [assistant("No.")],
    }
    # some datasets repeat the prompt at the start of each continuation: it is stripped
    repeated = {
        "prompt": "Say hello.",
        "chosen": [user("Say hello."), assistant("Hello!")],
        "rejected": [user("Say hello."), assistant("Go away.")],
    }
    result = validate_records(con, tmp_path, [texts, lists, repeated])
    assert (result.schema, result.valid) == ("preference", 3)
    rows = stored(con)
    assert rows[1] == ([user("Say hi."), assistant("Hi!")], [assistant("No.")], 1)
    assert rows[2] == (
        [{"role": "system", "content": "Be kind."}, user("Say hi."), assistant("Hi!")],
        [assistant("No.")],
        2,
    )
    assert rows[3] == ([user("Say hello."), assistant("Hello!")], [assistant("Go away.")], 1)


def test_columns_map_the_files_own_key_names(con, tmp_path):
    source = SourceSpec(path="*", columns={"prompt": "question", "chosen": "better", "rejected": "worse"})
    records = [
        {"question": "2 + 2?", "better": "4", "worse": "5"},
        {"question": "3 + 3?", "better": "6"},
    ]
    result = validate_records(con, tmp_path, records, source)
    assert (result.schema, result.valid) == ("preference", 1)
    assert stored(con)[1] == ([user("2 + 2?"), assistant("4")], [assistant("5")], 1)
    assert quarantined(con) == {2: ("missing_field", "worse")}


def test_preference_rows_hash_the_rejected_side_and_other_rows_hash_as_before(con, tmp_path):
    validate_records(con, tmp_path, [{"prompt": "Q", "chosen": "A", "rejected": "B"}], key="pairs")
    messages, rejected, example_hash = con.execute(
        "SELECT messages, rejected, example_hash FROM p.validated_examples WHERE partition = 'pairs'"
    ).fetchone()
    assert example_hash == hashlib.sha256(f"{messages}\0\0{rejected}".encode()).hexdigest()

    # the content version of every other schema must not move: sha256(messages || chr(0) || text)
    validate_records(con, tmp_path, [{"instruction": "Q", "output": "A"}], key="alpaca")
    messages, rejected, example_hash = con.execute(
        "SELECT messages, rejected, example_hash FROM p.validated_examples WHERE partition = 'alpaca'"
    ).fetchone()
    assert rejected is None
    assert example_hash == hashlib.sha256(f"{messages}\0".encode()).hexdigest()


def test_the_same_pair_twice_in_a_file_is_a_duplicate_but_another_rejected_side_is_not(con, tmp_path):
    pair = {"prompt": "Q", "chosen": "A", "rejected": "B"}
    result = validate_records(con, tmp_path, [pair, {**pair, "rejected": "C"}, pair])
    assert result.valid == 2
    assert quarantined(con) == {3: ("duplicate", None)}


# ---------------------------------------------------------------------------------------------
# quarantine reasons


def test_every_preference_quarantine_reason_keeps_the_original_record(con, tmp_path):
    records = [
        hh_pair(1),
        {"prompt": "Q", "chosen": " Same. ", "rejected": "Same."},
        {"chosen": "Plain text.", "rejected": "Other text."},
        {"chosen": hh("Q", "A") + "\n\nAssistant: More.", "rejected": hh("Q", "B")},
        {"chosen": "Intro." + hh("Q", "A"), "rejected": hh("Q", "B")},
        {"chosen": hh("Q", "A"), "rejected": hh("Other Q", "B")},
        {"prompt": "Q", "chosen": "A"},
        {"prompt": "Q", "chosen": 5, "rejected": "B"},
        {"prompt": "Q", "chosen": "A", "rejected": [{"role": "assistant", "content": ["B"]}]},
        {"prompt": "Q", "chosen": "A", "rejected": "   "},
        {"chosen": hh("Q", "A"), "rejected": hh("Q", "")},
        {"prompt": "Q", "chosen": "A", "rejected": "write to jane.doe@example.com"},
        {"prompt": "Q", "chosen": "A", "rejected": "B" * 51},
        {"prompt": "Q", "chosen": "A", "rejected": "bell \u0007 here"},
        {"prompt": "", "chosen": "A", "rejected": "B"},
        {"prompt": "Q", "chosen": "A", "rejected": [{"role": "robot", "content": "B"}]},
    ]
    result = validate_records(con, tmp_path, records, quality=QualitySpec(max_response_chars=50))
    assert result.valid == 1
    assert quarantined(con) == {
        2: ("identical_pair", None),
        3: (
            "unparseable_dialogue",
            "chosen: a dialogue text without '\\n\\nHuman:' and '\\n\\nAssistant:' markers",
        ),
        4: (
            "unparseable_dialogue",
            "chosen: turn 3 is Assistant where Human was due (turns must alternate, starting with Human)",
        ),
        5: ("unparseable_dialogue", "chosen: text before the first 'Human:' marker"),
        6: ("unparseable_dialogue", "chosen and rejected share no opening user turn"),
        7: ("missing_field", "rejected"),
        8: ("wrong_type", "chosen"),
        9: ("wrong_type", "rejected[].content"),
        10: ("empty_response", None),
        11: ("empty_response", None),
        12: ("pii", "email"),
        13: ("response_too_long", None),
        14: ("control_characters", None),
        15: ("empty_prompt", None),
        16: ("bad_conversation", None),
    }
    assert {r: n for r, n in result.reasons.items() if n} == {
        "identical_pair": 1,
        "unparseable_dialogue": 4,
        "missing_field": 1,
        "wrong_type": 2,
        "empty_response": 2,
        "pii": 1,
        "response_too_long": 1,
        "control_characters": 1,
        "empty_prompt": 1,
        "bad_conversation": 1,
    }
    kept = con.execute("SELECT record FROM p.quarantine WHERE record_index = 12").fetchone()[0]
    assert json.loads(kept) == records[11]


def test_pii_on_the_rejected_side_is_redacted_when_the_yaml_says_so(con, tmp_path):
    record = {
        "prompt": "Q",
        "chosen": "Ask the desk.",
        "rejected": "Mail bob@example.org or call +1 415 555 0134",
    }
    result = validate_records(con, tmp_path, [record], quality=QualitySpec(pii=PiiSpec(action="redact")))
    assert (result.valid, result.redacted) == (1, {"rows": 1})
    messages, rejected, _ = stored(con)[1]
    assert messages == [user("Q"), assistant("Ask the desk.")]
    assert rejected == [assistant("Mail [EMAIL] or call [PHONE]")]


class WordTokenizer:
    """Counts words as tokens, with the call signature validation uses."""

    def __call__(self, texts, add_special_tokens, return_length):
        return {"length": [len(text.split()) for text in texts]}


def test_the_token_limit_counts_the_prompt_with_the_longer_continuation(con, tmp_path):
    prompt = "one two three"
    records = [
        {"prompt": prompt, "chosen": "a b", "rejected": "c"},  # 3 + 2 words
        {"prompt": prompt, "chosen": "a", "rejected": "b c d e"},  # the rejected side is over
        {"instruction": "x"},  # not a pair: quarantined before any tokens are counted
    ]
    source = SourceSpec(path="*", format="preference")
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    ingest_file(con, "p", "k", path, source)
    result = validate_partition(con, "p", "k", source, QualitySpec(max_tokens=5), WordTokenizer())
    assert result.raw == result.valid + result.quarantined == 3
    assert quarantined(con) == {2: ("too_many_tokens", None), 3: ("missing_field", "chosen")}


def test_data_checks_see_the_prompt_and_the_chosen_answer(con, tmp_path):
    records = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, user("Hi.")],
            "chosen": "Hello.",
            "rejected": "Go.",
        },
        {"chosen": hh("Hi.", "Hello.", "Why?", "Because."), "rejected": hh("Hi.", "Go.")},
    ]
    validate_records(con, tmp_path, records)
    frame = classified_frame(con).sort_values("record_index")
    assert list(zip(frame.prompt, frame.response, strict=True)) == [
        ("Be brief.\nHi.", "Hello."),
        ("Hi.", "Because."),  # a continuation of several turns: its last answer
    ]


# ---------------------------------------------------------------------------------------------
# detection and the warehouse


def test_a_file_of_no_known_schema_lists_the_preference_keys_among_those_expected(con, tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"better": "a", "worse": "b"}) + "\n")
    ingest_file(con, "p", "k", path, ANY)
    with pytest.raises(SchemaError, match=r"their keys are: better, worse.*preference: chosen \+ rejected"):
        validate_partition(con, "p", "k", ANY, QualitySpec())


def test_a_warehouse_made_before_preference_columns_is_migrated(con, tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"instruction": "Q", "output": "A"}) + "\n")
    ingest_file(con, "p", "old", path, ANY)
    con.execute(
        """
        CREATE TABLE p.validated_examples (
            partition VARCHAR NOT NULL, source_file VARCHAR NOT NULL, record_index BIGINT NOT NULL,
            sub_index INTEGER NOT NULL, schema VARCHAR NOT NULL, messages VARCHAR, text VARCHAR,
            example_hash VARCHAR NOT NULL, ingested_at TIMESTAMP NOT NULL)
        """
    )
    con.execute(
        "INSERT INTO p.validated_examples SELECT partition, source_file, record_index, sub_index, 'alpaca', "
        "'[]', NULL, 'h', ingested_at FROM p.raw_examples"
    )
    validate_records(con, tmp_path, [hh_pair(1)], key="pairs")
    columns = [c[0] for c in con.execute("DESCRIBE p.validated_examples").fetchall()]
    assert columns[-2:] == ["rejected", "prompt_turns"]
    assert stored(con, "pairs")[1][2] == 1
    # the old row is kept, with nulls in the new columns, and the views show both
    assert con.execute(
        "SELECT rejected, prompt_turns FROM p.examples WHERE partition = 'old'"
    ).fetchall() == [(None, None)]
    assert con.execute("SELECT count(rejected) FROM p.examples").fetchone()[0] == 1


# ---------------------------------------------------------------------------------------------
# loraflow.preference, directly


def test_a_transcript_splits_at_its_markers_into_trimmed_alternating_turns():
    text = "\n\nHuman:  Hi,\n\nthere.  \n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"
    assert parse_transcript(text, "chosen") == [
        user("Hi,\n\nthere."),
        assistant("Hello."),
        user("Bye"),
        assistant(""),
    ]
    assert parse_transcript("Human: Hi\n\nAssistant: Yo", "chosen") == [user("Hi"), assistant("Yo")]


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("Hi there", "chosen: a dialogue text without"),
        ("Note.\n\nHuman: Hi\n\nAssistant: Yo", "chosen: text before the first 'Human:' marker"),
        ("\n\nAssistant: Yo\n\nHuman: Hi", "chosen: turn 1 is Assistant where Human was due"),
        ("\n\nHuman: Hi\n\nHuman: Again", "chosen: turn 2 is Human where Assistant was due"),
    ],
)
def test_a_transcript_that_cannot_be_split_into_turns_says_why(text, detail):
    problem = parse_transcript(text, "chosen")
    assert isinstance(problem, PairProblem)
    assert problem.reason == "unparseable_dialogue"
    assert problem.detail.startswith(detail)


def test_equal_continuations_are_an_identical_pair_unless_the_caller_orders_that_check():
    record = {"prompt": "Q", "chosen": [user("Q"), assistant("A ")], "rejected": "A"}
    assert parse_pair(record) == PairProblem(
        "identical_pair", "chosen and rejected continue the prompt the same way"
    )
    pair = parse_pair(record, allow_identical=True)
    assert isinstance(pair, PreferencePair) and pair.identical
    assert pair.chosen == pair.rejected == [assistant("A")]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"chosen": "A"}, PairProblem("missing_field", "rejected")),
        ({"prompt": "Q", "chosen": {"text": "A"}, "rejected": "B"}, PairProblem("wrong_type", "chosen")),
        ({"prompt": ["Q"], "chosen": "A", "rejected": "B"}, PairProblem("wrong_type", "prompt[]")),
        (
            {"prompt": [{"content": "Q"}], "chosen": "A", "rejected": "B"},
            PairProblem("wrong_type", "prompt[].role"),
        ),
        (
            {"prompt": [], "chosen": "A", "rejected": "B"},
            PairProblem("unparseable_dialogue", "prompt: the prompt has no turns"),
        ),
        # a type error is reported before a dialogue that does not parse, whichever field holds it
        ({"chosen": "no markers", "rejected": 3}, PairProblem("wrong_type", "rejected")),
    ],
)
def test_a_record_that_is_not_a_pair_names_the_problem_and_the_key(record, problem):
    assert parse_pair(record) == problem


def test_a_null_field_counts_as_an_empty_text():
    pair = parse_pair({"prompt": None, "chosen": "A", "rejected": None})
    assert pair == PreferencePair([user("")], [assistant("A")], [assistant("")])
