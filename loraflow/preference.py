"""Preference records: one prompt and two continuations of it, the chosen and the rejected.

A preference record (DPO, ORPO) becomes a prompt, a list of chat messages {role, content}, and two
continuations, `chosen` and `rejected`, each a list of messages that should end with an assistant
turn. The functions get the file's own key names for prompt, chosen and rejected (after the source's
`columns` mapping), and return problems as a `PairProblem` (a reason code and a detail naming the key)
instead of raising, so validation can quarantine the record with that reason.

Normalization rules, in one place:
- Every turn's content is trimmed of surrounding spaces, tabs and newlines. A null field counts as
  an empty text.
- With a prompt (`{prompt, chosen, rejected}`): a prompt text is one user turn; a message list
  ({role, content}, roles system/user/assistant) is taken as given. `chosen` and `rejected` texts
  are one assistant turn each; message lists are taken as given. A continuation that repeats the
  whole prompt at its start (some datasets store whole conversations) has that repeated prefix
  stripped.
- Transcripts: a text that starts with `Human:` (after leading whitespace) is an Anthropic
  hh-rlhf-style dialogue, "\\n\\nHuman: ...\\n\\nAssistant: ...", split at its markers into turns
  (Human -> user, Assistant -> assistant). Its turns must alternate, starting with Human, and
  nothing but whitespace may come before the first marker. A prompt transcript usually ends with an
  empty "\\n\\nAssistant:", the turn the continuations fill in: that empty last turn is dropped.
- Without a prompt (`{chosen, rejected}`, e.g. hh-rlhf's own schema): both are whole dialogues,
  transcripts or message lists. The longest shared beginning (same roles and contents) up to and
  including its last user turn is the prompt; the rest of each dialogue is its continuation, so
  shared assistant turns after that user turn belong to both continuations.

Problems, by reason code:
- `missing_field`: `chosen` or `rejected` is absent (detail: the file's key).
- `wrong_type`: a field is neither a text nor a message list, or a message is not an object with a
  string role and content (detail: the key, as `key`, `key[]`, `key[].role` or `key[].content`).
- `unparseable_dialogue`: a dialogue that cannot be split into turns: a transcript without markers,
  with text before the first marker, or whose turns do not alternate starting with Human; a prompt
  without turns; chosen and rejected dialogues without a shared opening user turn (detail says which).
- `identical_pair`: the chosen and rejected continuations are equal after trimming.

Roles, empty texts, lengths and PII are judged by validation (loraflow/validate.py), as for chat rows.
Everything here is linear in the record's size: transcripts are split with `re.split` on the markers
(no backtracking pattern), so a record of megabytes costs no more than reading it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
"""A chat message: {"role": "system" | "user" | "assistant", "content": text}."""

WHITESPACE = " \t\n\r"
"""What trimming removes from either end of a turn's content."""

SPEAKERS = {"Human": "user", "Assistant": "assistant"}
TRANSCRIPT_START = re.compile(r"\s*Human:")
# A marker after a blank line, the speaker captured: re.split returns [text before, speaker, content,
# speaker, content, ...]. Its literal start lets `re` skip ahead to each blank line (3x faster than
# also matching the text's start in one pattern); the first marker may instead open the text.
MARKER = re.compile(r"\n\n(Human|Assistant):")
OPENING_MARKER = re.compile(r"\s*(Human|Assistant):")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and its two continuations; `prompt + chosen` is an ordinary chat conversation."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]

    @property
    def identical(self) -> bool:
        """Whether the two continuations are the same messages (a pair that teaches nothing)."""
        return self.chosen == self.rejected


@dataclass(frozen=True)
class PairProblem:
    """Why a record is not a preference pair: a validation reason code and what exactly is wrong."""

    reason: str
    detail: str


def is_transcript(text: str) -> bool:
    """Whether a text is an hh-rlhf-style dialogue: it starts with `Human:` after leading whitespace."""
    return TRANSCRIPT_START.match(text) is not None


def parse_transcript(text: str, key: str) -> list[Message] | PairProblem:
    """The turns of a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript, contents trimmed.

    `key` names the field in a problem's detail. An empty last Assistant turn is kept: whether it is
    a prompt's open slot or an empty answer depends on where the transcript is (see parse_pair).
    """
    opening = OPENING_MARKER.match(text)
    parts = ["", opening.group(1), *MARKER.split(text[opening.end() :])] if opening else MARKER.split(text)
    if len(parts) == 1:
        return _unparseable(f"{key}: a dialogue text without '\\n\\nHuman:' and '\\n\\nAssistant:' markers")
    if parts[0].strip(WHITESPACE):
        return _unparseable(f"{key}: text before the first 'Human:' marker")
    turns = []
    for number, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2], strict=True), 1):
        expected = "Human" if number % 2 else "Assistant"
        if speaker != expected:
            return _unparseable(
                f"{key}: turn {number} is {speaker} where {expected} was due "
                "(turns must alternate, starting with Human)"
            )
        turns.append({"role": SPEAKERS[speaker], "content": content.strip(WHITESPACE)})
    return turns


def parse_pair(
    record: Mapping[str, Any],
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    *,
    allow_identical: bool = False,
) -> PreferencePair | PairProblem:
    """One record (a decoded JSON object) as a preference pair, or the first problem it has.

    The keys are the file's own names for the three fields. A record without `prompt_key` holds two
    whole dialogues whose shared beginning is the prompt. `allow_identical` returns a pair whose
    continuations are equal instead of the `identical_pair` problem, for a caller that orders its
    own checks (validation reports an empty answer before an identical pair).
    """
    for key in (chosen_key, rejected_key):
        if key not in record:
            return PairProblem("missing_field", key)
    if prompt_key in record:
        pair = _pair_with_prompt(record, prompt_key, chosen_key, rejected_key)
    else:
        pair = _pair_of_dialogues(record, chosen_key, rejected_key)
    if isinstance(pair, PreferencePair) and pair.identical and not allow_identical:
        return PairProblem(
            "identical_pair", f"{chosen_key} and {rejected_key} continue the prompt the same way"
        )
    return pair


def _pair_with_prompt(
    record: Mapping[str, Any], prompt_key: str, chosen_key: str, rejected_key: str
) -> PreferencePair | PairProblem:
    fields = _fields(record, (prompt_key, chosen_key, rejected_key))
    if isinstance(fields, PairProblem):
        return fields
    prompt = _prompt(fields[prompt_key], prompt_key)
    if isinstance(prompt, PairProblem):
        return prompt
    continuations = []
    for key in (chosen_key, rejected_key):
        continuation = _continuation(fields[key], key, prompt)
        if isinstance(continuation, PairProblem):
            return continuation
        continuations.append(continuation)
    return PreferencePair(prompt, *continuations)


def _prompt(value: str | list[Message], key: str) -> list[Message] | PairProblem:
    if isinstance(value, list):
        turns = value
    elif is_transcript(value):
        turns = parse_transcript(value, key)
        if isinstance(turns, list) and turns[-1] == {"role": "assistant", "content": ""}:
            turns = turns[:-1]  # the open "\n\nAssistant:" the continuations answer
    else:
        turns = [{"role": "user", "content": value.strip(WHITESPACE)}]
    if isinstance(turns, list) and not turns:
        return _unparseable(f"{key}: the prompt has no turns")
    return turns


def _continuation(value: str | list[Message], key: str, prompt: list[Message]) -> list[Message] | PairProblem:
    if isinstance(value, str) and not is_transcript(value):
        return [{"role": "assistant", "content": value.strip(WHITESPACE)}]
    turns = value if isinstance(value, list) else parse_transcript(value, key)
    if isinstance(turns, list) and turns[: len(prompt)] == prompt:
        return turns[len(prompt) :]
    return turns


def _pair_of_dialogues(
    record: Mapping[str, Any], chosen_key: str, rejected_key: str
) -> PreferencePair | PairProblem:
    fields = _fields(record, (chosen_key, rejected_key))
    if isinstance(fields, PairProblem):
        return fields
    dialogues = []
    for key, value in fields.items():
        turns = value if isinstance(value, list) else parse_transcript(value, key)
        if isinstance(turns, PairProblem):
            return turns
        dialogues.append(turns)
    chosen, rejected = dialogues
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    users = [i for i in range(shared) if chosen[i]["role"] == "user"]
    if not users:
        return _unparseable(f"{chosen_key} and {rejected_key} share no opening user turn")
    cut = users[-1] + 1
    return PreferencePair(chosen[:cut], chosen[cut:], rejected[cut:])


def _fields(record: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, str | list[Message]] | PairProblem:
    """Each key's value as a text (null: empty) or a list of trimmed messages; the first of the
    wrong type is the problem, so type errors come before any parsing error."""
    fields: dict[str, str | list[Message]] = {}
    for key in keys:
        value = record[key]
        if value is None:
            fields[key] = ""
        elif isinstance(value, str):
            fields[key] = value
        elif isinstance(value, list):
            messages = _messages(value, key)
            if isinstance(messages, PairProblem):
                return messages
            fields[key] = messages
        else:
            return PairProblem("wrong_type", key)
    return fields


def _messages(value: list, key: str) -> list[Message] | PairProblem:
    turns = []
    for message in value:
        if not isinstance(message, dict):
            return PairProblem("wrong_type", f"{key}[]")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            return PairProblem("wrong_type", f"{key}[].role")
        if not isinstance(content, str):
            return PairProblem("wrong_type", f"{key}[].content")
        turns.append({"role": role, "content": content.strip(WHITESPACE)})
    return turns


def _unparseable(detail: str) -> PairProblem:
    return PairProblem("unparseable_dialogue", detail)
