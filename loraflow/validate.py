"""Validation: each raw row of a partition becomes a valid example or a quarantined row with a reason.

Every schema (alpaca, chat, ShareGPT, completion, preference) is normalized in one DuckDB query to
the same shape: a list of chat messages (role, content), or a plain text for completion. The first
rule a row breaks is its reason; the quarantine keeps the original record, so nothing is lost. Per
partition, raw rows = valid rows + quarantined rows, always.

Normalization rules, in one place:
- alpaca: one user turn, the instruction, then a blank line and the input when there is one;
  then one assistant turn, the output. Surrounding whitespace of each field is trimmed; a null
  field counts as empty (an empty CSV cell reads as null).
- chat: `messages` as given (roles system, user, assistant). ShareGPT: `conversations`, with
  `from` human/user -> user, gpt/assistant/chatgpt/bard/model -> assistant, system -> system.
  A conversation must have a user turn and end with an assistant turn.
- completion: `text`, trained as a whole.
- preference: a prompt and two continuations, `chosen` and `rejected`, parsed by a Python function
  the query calls (loraflow/preference.py states the accepted shapes: texts, message lists,
  hh-rlhf "\n\nHuman: ... \n\nAssistant: ..." transcripts, whole dialogues without a prompt).
  `messages` holds prompt + chosen (an ordinary conversation), `rejected` the rejected continuation's
  messages, `prompt_turns` how many leading messages of `messages` are the prompt. Each row is judged
  by the chat rules on all its turns: roles, a user turn in the prompt, each continuation ending in
  an answer, empty texts, lengths (the prompt; every answer of either continuation), control
  characters and PII (the rejected side is scanned and redacted too); max_tokens counts the prompt
  with the longer continuation. A pair whose continuations are equal is `identical_pair`.

Storage: `validated_examples` has one row per example; `rejected` and `prompt_turns` are null except
for preference rows. The example hash is sha256(messages || chr(0) || text), nulls as empty texts,
and for preference rows sha256(messages || chr(0) || chr(0) || rejected): a pair is the same example
only with the same rejected side.

Duplicates: within a file, the first copy (lowest record index) is kept and the others are
quarantined (`duplicate`). Across files, the views `<pipeline>.examples` and
`<pipeline>.duplicates_across_files` keep the copy in the file whose partition key sorts first;
views are computed when read, so the rule holds whatever order files are re-ingested in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from loraflow.ingest import RAW_TABLE, ensure_raw_table, replacing_rows
from loraflow.preference import PairProblem, parse_pair
from loraflow.spec import QualitySpec, SourceSpec

VALID_TABLE = "validated_examples"
QUARANTINE_TABLE = "quarantine"
EXAMPLES_VIEW = "examples"
CROSS_DUPLICATES_VIEW = "duplicates_across_files"
MAX_RECORD_CHARS = QualitySpec().max_record_chars
"""The default of quality.max_record_chars: records longer than this are not parsed."""

# reason code -> what it means; the codes are stable (metadata keys, check results, reports).
REASONS: dict[str, str] = {
    "undecodable_bytes": "the line is not valid UTF-8 text",
    "record_too_long": "the raw record is longer than quality.max_record_chars characters (not parsed)",
    "malformed_json": "the record is not valid JSON",
    "not_an_object": "the record is JSON but not an object",
    "missing_field": "a required field is missing (detail names it)",
    "wrong_type": "a field has the wrong type (detail names it)",
    "unparseable_dialogue": "a preference record's dialogue cannot be split into turns: a transcript without "
    "Human:/Assistant: markers, with text before the first or turns not alternating, a prompt without turns, "
    "or chosen and rejected without a shared opening user turn (detail says which)",
    "bad_conversation": "a conversation with an unknown role, no user turn, or not ending in an answer",
    "empty_prompt": "the prompt (instruction and input, or a user/system turn) is empty",
    "empty_response": "an answer is empty, or a preference continuation has no turn",
    "identical_pair": "the chosen and rejected continuations of a preference pair are the same",
    "control_characters": "the text holds control characters other than tab and newline",
    "prompt_too_long": "the prompt is longer than quality.max_prompt_chars",
    "response_too_long": "the answer is longer than quality.max_response_chars",
    "too_many_tokens": "the example is longer than quality.max_tokens base-model tokens",
    "pii": "the text matches a PII pattern (detail names which) and quality.pii.action is reject",
    "duplicate": "an identical example appears earlier in the same file (the first copy is kept)",
}

# Regular expressions valid in both Python `re` and DuckDB (RE2).
PII_PATTERNS: dict[str, str] = {
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
    "phone": r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}\b",
    "api_key": r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
}
# The same patterns for Python's `re` (the Great Expectations suite searches with it). `re`
# backtracks: an unanchored search for the email pattern retries the address's first part from every
# character of a long run of letters, quadratic in the run (64 KB of letters took 8 s, a 60 MB field
# days). Starting only where such a run starts finds the same addresses in linear time. RE2 (DuckDB)
# has no look-behind and needs none: it is linear by construction.
PII_PATTERNS_PYTHON: dict[str, str] = {
    **PII_PATTERNS,
    "email": r"(?<![A-Za-z0-9._%+-])" + PII_PATTERNS["email"],
}
# A byte search that must succeed before a pattern can match: far cheaper than the regular expression.
PII_PREFILTERS = {"email": "contains(all_text, '@')"}
PII_PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "api_key": "[API_KEY]"}
CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
SCHEMA_KEYS = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "completion": ("text",),
    "preference": ("chosen", "rejected"),
}
PAIR_FIELDS = ("prompt", "chosen", "rejected")
"""A preference record's fields, in the order the pair parser takes them."""
PAIR_FUNCTION = "loraflow_preference_pair"
"""The DuckDB name of the Python function that parses preference records during validation."""
PAIR_TYPE = pa.struct(
    [
        ("missing", pa.string()),
        ("wrong", pa.string()),
        ("unparseable", pa.string()),
        ("identical", pa.bool_()),
        ("roles", pa.list_(pa.string())),
        ("contents", pa.list_(pa.large_string())),  # 64-bit offsets: a batch of fields of MBs fits
        ("prompt_turns", pa.int32()),
        ("chosen_turns", pa.int32()),
    ]
)
"""What the pair parser returns per record: a problem (missing/wrong/unparseable detail), or the
prompt's, chosen's and rejected's turns in one list (prompt_turns + chosen_turns + the rest)."""
PAIR_PROBLEM_FIELDS = {
    "missing_field": "missing",
    "wrong_type": "wrong",
    "unparseable_dialogue": "unparseable",
}
"""The PAIR_TYPE field that carries each parse problem's detail."""
PAIR_SQL_TYPE = (
    "STRUCT(missing VARCHAR, wrong VARCHAR, unparseable VARCHAR, identical BOOLEAN, roles VARCHAR[], "
    "contents VARCHAR[], prompt_turns INTEGER, chosen_turns INTEGER)"
)
NO_SCHEMA = "none"
"""The schema of a partition that holds no JSON object at all."""


class SchemaError(ValueError):
    """The records of a file match no schema, or several; the message names the candidates."""


@dataclass(frozen=True)
class ValidationResult:
    """Counts for one partition; raw == valid + quarantined."""

    partition: str
    schema: str
    raw: int
    valid: int
    quarantined: int
    reasons: dict[str, int]
    redacted: dict[str, int] = field(default_factory=dict)

    @property
    def invalid_fraction(self) -> float:
        return self.quarantined / self.raw if self.raw else 0.0


# ---------------------------------------------------------------------------------------------
# tables


def ensure_tables(con: duckdb.DuckDBPyConnection, pipeline: str) -> None:
    """Create the validated and quarantine tables and the cross-file views if missing, and add the
    preference columns to a validated table made before them."""
    ensure_raw_table(con, pipeline)
    con.execute(
        f"""
        CREATE TABLE IF NOT EXISTS "{pipeline}".{VALID_TABLE} (
            partition VARCHAR NOT NULL,
            source_file VARCHAR NOT NULL,
            record_index BIGINT NOT NULL,
            sub_index INTEGER NOT NULL,
            schema VARCHAR NOT NULL,
            messages VARCHAR,
            text VARCHAR,
            example_hash VARCHAR NOT NULL,
            ingested_at TIMESTAMP NOT NULL,
            rejected VARCHAR,
            prompt_turns INTEGER
        )
        """
    )
    # warehouses made before preference data: the views below must be made after, to include them
    for column, kind in (("rejected", "VARCHAR"), ("prompt_turns", "INTEGER")):
        con.execute(f'ALTER TABLE "{pipeline}".{VALID_TABLE} ADD COLUMN IF NOT EXISTS {column} {kind}')
    con.execute(
        f"""
        CREATE TABLE IF NOT EXISTS "{pipeline}".{QUARANTINE_TABLE} (
            partition VARCHAR NOT NULL,
            source_file VARCHAR NOT NULL,
            record_index BIGINT NOT NULL,
            sub_index INTEGER NOT NULL,
            reason VARCHAR NOT NULL,
            detail VARCHAR,
            record VARCHAR NOT NULL,
            quarantined_at TIMESTAMP NOT NULL
        )
        """
    )
    ranked = f"""
        SELECT *, row_number() OVER (
            PARTITION BY example_hash ORDER BY partition, record_index, sub_index) AS copy_number
        FROM "{pipeline}".{VALID_TABLE}
    """
    con.execute(
        f'CREATE OR REPLACE VIEW "{pipeline}".{EXAMPLES_VIEW} AS '
        f"SELECT * EXCLUDE (copy_number) FROM ({ranked}) WHERE copy_number = 1"
    )
    con.execute(
        f'CREATE OR REPLACE VIEW "{pipeline}".{CROSS_DUPLICATES_VIEW} AS '
        f"SELECT * EXCLUDE (copy_number), 'duplicate' AS reason FROM ({ranked}) WHERE copy_number > 1"
    )


# ---------------------------------------------------------------------------------------------
# schema detection


def _lit(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _trimmed(column: str) -> str:
    """trim(column), but only where there is whitespace at either end: byte tests are far cheaper than trim()."""
    edges = " OR ".join(
        f"{test}({column}, {char})"
        for test in ("starts_with", "ends_with")
        for char in ("' '", "chr(10)", "chr(9)", "chr(13)")
    )
    return f"CASE WHEN {edges} THEN trim({column}) ELSE {column} END"


def _path(key: str, suffix: str = "") -> str:
    """A JSON path for a top-level key as a SQL string literal."""
    return _lit("$." + json.dumps(key) + suffix)


def detect_schema(
    con: duckdb.DuckDBPyConnection,
    pipeline: str,
    partition: str,
    source: SourceSpec,
    max_record_chars: int = MAX_RECORD_CHARS,
) -> str:
    """The schema of a partition: the source's `format`, or the one the records' keys point to.

    Looks at up to 500 records. A schema is a candidate when at least half of the JSON objects have
    its keys (after the column mapping). None or several candidates is a SchemaError. A partition
    without a single JSON object (an empty file, or one of undecodable or malformed lines) has no
    schema to detect: it is `none`, and every row it has is quarantined for what is wrong with it.
    """
    if source.format != "auto":
        return source.format
    checks = ", ".join(
        "count(*) FILTER (WHERE "
        + " AND ".join(f"json_exists(record, {_path(source.column(k))})" for k in keys)
        + ")"
        for keys in SCHEMA_KEYS.values()
    )
    row = con.execute(
        f"""
        WITH sample AS (
            SELECT record FROM "{pipeline}".{RAW_TABLE}
            WHERE partition = ? AND read_error IS NULL AND length(record) <= ?
              AND json_valid(record) AND json_type(record) = 'OBJECT'
            ORDER BY record_index, sub_index LIMIT 500
        )
        SELECT count(*), {checks} FROM sample
        """,
        [partition, max_record_chars],
    ).fetchone()
    objects, counts = row[0], dict(zip(SCHEMA_KEYS, row[1:], strict=True))
    if not objects:
        return NO_SCHEMA
    candidates = [name for name, count in counts.items() if objects and count * 2 >= objects]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        keys = con.execute(
            f"""
            SELECT string_agg(DISTINCT k, ', ' ORDER BY k) FROM (
                SELECT unnest(json_keys(record)) AS k FROM "{pipeline}".{RAW_TABLE}
                WHERE partition = ? AND read_error IS NULL AND length(record) <= ?
                  AND json_valid(record) AND json_type(record) = 'OBJECT'
                LIMIT 5000)
            """,
            [partition, max_record_chars],
        ).fetchone()[0]
        expected = "; ".join(f"{name}: {' + '.join(keys)}" for name, keys in SCHEMA_KEYS.items())
        raise SchemaError(
            f"partition {partition!r}: cannot detect the record schema of {objects} JSON objects; "
            f"their keys are: {keys or 'none'}. Expected keys ({expected}). Map the file's names with "
            "`columns` (e.g. columns: {output: response}) or set `format` on the source"
        )
    found = ", ".join(f"{name} ({counts[name]} of {objects} records)" for name in candidates)
    raise SchemaError(
        f"partition {partition!r}: the records match several schemas: {found}. "
        f"Set `format` on the source to one of: {', '.join(candidates)}"
    )


# ---------------------------------------------------------------------------------------------
# classification


def _fields_sql(schema: str, source: SourceSpec) -> str:
    """Schema-specific columns: missing, wrong (field names), roles and contents (lists), text."""
    if schema == "alpaca":
        i, n, o = (_path(source.column(f)) for f in ("instruction", "input", "output"))
        # one parse of the record for the three fields' types, one for their text; json_extract would
        # write each value back out as JSON, which for a field of tens of MB costs ten times its size
        return f"""
            SELECT *,
                CASE WHEN t_i IS NULL THEN {_lit(source.column("instruction"))}
                     WHEN t_o IS NULL THEN {_lit(source.column("output"))} END AS missing,
                CASE WHEN t_i NOT IN ('VARCHAR', 'NULL') THEN {_lit(source.column("instruction"))}
                     WHEN t_o NOT IN ('VARCHAR', 'NULL') THEN {_lit(source.column("output"))}
                     WHEN t_n IS NOT NULL AND t_n NOT IN ('VARCHAR', 'NULL') THEN {_lit(source.column("input"))}
                END AS wrong,
                ['user', 'assistant'] AS roles,
                [CASE WHEN coalesce(inp, '') = '' THEN ins ELSE ins || chr(10) || chr(10) || inp END, out] AS contents
            FROM (
                SELECT * EXCLUDE (ins, inp, out), {_trimmed("ins")} AS ins, {_trimmed("inp")} AS inp,
                       {_trimmed("out")} AS out
                FROM (
                    SELECT *, types[1] AS t_i, types[2] AS t_n, types[3] AS t_o,
                        coalesce(vals[1], '') AS ins,
                        CASE WHEN types[2] = 'VARCHAR' THEN vals[2] END AS inp,
                        coalesce(vals[3], '') AS out
                    FROM (SELECT *, CASE WHEN is_object THEN json_type(doc, [{i}, {n}, {o}]) END AS types,
                                 CASE WHEN is_object THEN json_extract_string(doc, [{i}, {n}, {o}]) END AS vals
                          FROM objects)))
        """
    if schema in ("chat", "sharegpt"):
        key, role, content = (
            ("messages", "role", "content") if schema == "chat" else ("conversations", "from", "value")
        )
        column = source.column(key)
        whole = _path(column)
        roles_path, contents_path = _path(column, f"[*].{role}"), _path(column, f"[*].{content}")
        role_map = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in SHAREGPT_ROLES.items())
        mapped = (
            "raw_roles"
            if schema == "chat"
            else f"list_transform(raw_roles, lambda r: CASE lower(r) {role_map} ELSE r END)"
        )
        return f"""
            SELECT *,
                CASE WHEN t_list IS NULL THEN {_lit(column)} END AS missing,
                CASE WHEN t_list <> 'ARRAY' THEN {_lit(column)}
                     WHEN len(coalesce(role_types, [])) <> n_turns
                          OR NOT list_bool_and(list_transform(role_types, lambda t: t = 'VARCHAR'))
                          THEN {_lit(column + "[]." + role)}
                     WHEN len(coalesce(content_types, [])) <> n_turns
                          OR NOT list_bool_and(list_transform(content_types, lambda t: t = 'VARCHAR'))
                          THEN {_lit(column + "[]." + content)}
                END AS wrong,
                {mapped} AS roles,
                list_transform(raw_contents, lambda c: trim(c)) AS contents
            FROM (
                SELECT *,
                    json_type(doc, {whole}) AS t_list,
                    CASE WHEN json_type(doc, {whole}) = 'ARRAY' THEN json_array_length(doc, {whole}) END AS n_turns,
                    CASE WHEN json_type(doc, {whole}) = 'ARRAY' THEN json_type(doc, {roles_path}) END AS role_types,
                    CASE WHEN json_type(doc, {whole}) = 'ARRAY' THEN json_type(doc, {contents_path}) END AS content_types,
                    CASE WHEN json_type(doc, {whole}) = 'ARRAY' THEN json_extract_string(doc, {roles_path}) END AS raw_roles,
                    CASE WHEN json_type(doc, {whole}) = 'ARRAY'
                         THEN json_extract_string(doc, {contents_path}) END AS raw_contents
                FROM objects)
        """
    if schema == "preference":
        paths = ", ".join(_path(source.column(f)) for f in PAIR_FIELDS)
        args = ", ".join([f"types[{i}]" for i in (1, 2, 3)] + [f"vals[{i}]" for i in (1, 2, 3)])
        # the fields' types and texts in one parse each, as for alpaca; a list arrives as its JSON text
        return f"""
            SELECT * EXCLUDE (types, vals, pair),
                pair.missing AS missing, pair.wrong AS wrong, pair.unparseable AS unparseable,
                pair.identical AS identical, pair.roles AS roles, pair.contents AS contents,
                pair.prompt_turns AS prompt_turns, pair.chosen_turns AS chosen_turns
            FROM (
                SELECT *, CASE WHEN is_object THEN {PAIR_FUNCTION}({args}) END AS pair
                FROM (SELECT *, CASE WHEN is_object THEN json_type(doc, [{paths}]) END AS types,
                             CASE WHEN is_object THEN json_extract_string(doc, [{paths}]) END AS vals
                      FROM objects))
        """
    if schema == NO_SCHEMA:  # no row is an object: the reasons before the fields' decide every row
        return """
            SELECT *, NULL::VARCHAR AS missing, NULL::VARCHAR AS wrong, []::VARCHAR[] AS roles,
                   []::VARCHAR[] AS contents
            FROM objects
        """
    text = _path(source.column("text"))
    return f"""
        SELECT *,
            CASE WHEN json_type(doc, {text}) IS NULL THEN {_lit(source.column("text"))} END AS missing,
            CASE WHEN json_type(doc, {text}) <> 'VARCHAR' THEN {_lit(source.column("text"))} END AS wrong,
            []::VARCHAR[] AS roles,
            [json_extract_string(doc, {text})] AS contents
        FROM objects
    """


def _redact_sql(expression: str, quality: QualitySpec) -> str:
    for kind in quality.pii.kinds:
        expression = (
            f"regexp_replace({expression}, {_lit(PII_PATTERNS[kind])}, '{PII_PLACEHOLDERS[kind]}', 'g')"
        )
    return expression


def _messages_sql(pairs: str) -> str:
    """JSON of a list of (role, content) as chat messages, [{"role": ..., "content": ...}, ...]."""
    return f"to_json(list_transform({pairs}, lambda x: {{'role': x[1], 'content': x[2]}}))::VARCHAR"


def _classified_sql(pipeline: str, schema: str, source: SourceSpec, quality: QualitySpec) -> str:
    """One partition's raw rows with the normalized example, its hash, prompt/response and a first reason.

    Duplicates are marked afterwards (`_mark_duplicates`), which is cheaper than a window over every row.
    """
    conversation = schema in ("chat", "sharegpt")
    pair = schema == "preference"
    pii_on = quality.pii.action != "off" and quality.pii.kinds
    contents = "original"
    if quality.pii.action == "redact" and pii_on:
        contents = f"list_transform(original, lambda c: {_redact_sql('c', quality)})"
    pii_kind = "NULL"
    if quality.pii.action == "reject" and pii_on:
        cases = " ".join(
            f"WHEN {PII_PREFILTERS.get(k, 'true')} AND regexp_matches(all_text, {_lit(PII_PATTERNS[k])}) THEN '{k}'"
            for k in quality.pii.kinds
        )
        pii_kind = f"CASE {cases} END"
    bad_conversation = (
        "len(roles) = 0 OR NOT list_bool_and(list_transform(roles, lambda r: r IN ('system', 'user', 'assistant')))"
        " OR roles[-1] <> 'assistant' OR NOT list_contains(roles, 'user')"
        if conversation
        else "false"
    )
    # a preference row's turns are prompt, chosen, rejected in one list; chosen ends at chosen_end
    chosen_end = "prompt_turns + chosen_turns"
    if pair:
        bad_conversation = (
            "NOT list_bool_and(list_transform(roles, lambda r: r IN ('system', 'user', 'assistant')))"
            " OR NOT list_contains(roles[1:prompt_turns], 'user')"
            f" OR (chosen_turns > 0 AND roles[{chosen_end}] <> 'assistant')"
            f" OR (len(roles) > {chosen_end} AND roles[-1] <> 'assistant')"
        )
    response_too_long = f"length(response) > {quality.max_response_chars}"
    if schema == "completion":
        prompt, response = "NULL::VARCHAR", "contents[1]"  # no prompt: the data checks skip it
        empty_prompt, empty_response = "false", "coalesce(contents[1], '') = ''"
    elif schema == "alpaca":
        prompt, response = "contents[1]", "contents[2]"
        empty_prompt, empty_response = "contents[1] = ''", "contents[2] = ''"
    elif pair:
        prompt = "array_to_string(contents[1:prompt_turns], chr(10))"
        response = f"CASE WHEN chosen_turns > 0 THEN contents[{chosen_end}] ELSE '' END"  # the chosen answer
        empty_prompt = (
            "len(list_filter(list_zip(roles, contents), lambda x: x[1] <> 'assistant' AND x[2] = '')) > 0"
            " OR array_to_string(contents[1:prompt_turns], '') = ''"
        )
        empty_response = (
            f"chosen_turns = 0 OR len(contents) = {chosen_end}"
            " OR len(list_filter(list_zip(roles, contents), lambda x: x[1] = 'assistant' AND x[2] = '')) > 0"
        )
        # every answer of either continuation, not only the chosen one the data checks see
        response_too_long = (
            "list_max(list_transform(list_filter(list_zip(roles, contents)[prompt_turns + 1:],"
            f" lambda x: x[1] = 'assistant'), lambda x: length(x[2]))) > {quality.max_response_chars}"
        )
    else:
        prompt = "array_to_string(contents[1:len(contents) - 1], chr(10))"
        response = "contents[-1]"
        empty_prompt = (
            "len(list_filter(list_zip(roles, contents), lambda x: x[1] <> 'assistant' AND x[2] = '')) > 0"
            " OR array_to_string(contents[1:len(contents) - 1], '') = ''"
        )
        empty_response = (
            "len(list_filter(list_zip(roles, contents), lambda x: x[1] = 'assistant' AND x[2] = '')) > 0"
        )
    if schema == "completion":
        messages = "NULL::VARCHAR"
    elif schema == "alpaca":
        # the same JSON the general form below writes for two turns, by concatenation: much cheaper
        messages = (
            """'[{"role":"user","content":' || to_json(contents[1]) || '},{"role":"assistant","content":' """
            """|| to_json(contents[2]) || '}]'"""
        )
    elif pair:
        messages = _messages_sql(f"list_zip(roles, contents)[1:{chosen_end}]")
    else:
        messages = "to_json(list_transform(list_zip(roles, contents), lambda x: {'role': x[1], 'content': x[2]}))::VARCHAR"
    text = "contents[1]" if schema == "completion" else "NULL::VARCHAR"
    parsed = "is_object AND missing IS NULL AND wrong IS NULL"
    shaped_pair, pair_columns = (
        "",
        "NULL::VARCHAR AS rejected, NULL::INTEGER AS prompt_turns, NULL::VARCHAR[] AS token_texts",
    )
    hashed = "coalesce(messages, '') || chr(0) || coalesce(text, '')"
    parse_reason = pair_reason = ""
    detailed = "'missing_field', 'wrong_type', 'pii'"
    reason_detail = "coalesce(missing, wrong, pii)"
    if pair:
        parsed += " AND unparseable IS NULL"
        # the token limit counts the prompt with each continuation: the longer one decides
        token_texts = (
            f"[array_to_string(contents[1:{chosen_end}], chr(10)),"
            f" array_to_string(list_concat(contents[1:prompt_turns], contents[{chosen_end} + 1:]), chr(10))]"
            if quality.max_tokens is not None
            else "NULL::VARCHAR[]"
        )
        shaped_pair = f"""
            CASE WHEN within_limits THEN {_messages_sql(f"list_zip(roles, contents)[{chosen_end} + 1:]")} END AS rejected,
            CASE WHEN within_limits THEN {token_texts} END AS token_texts,"""
        pair_columns = "rejected, prompt_turns, token_texts"
        hashed += " || chr(0) || coalesce(rejected, '')"
        parse_reason = "WHEN unparseable IS NOT NULL THEN 'unparseable_dialogue'"
        pair_reason = "WHEN identical THEN 'identical_pair'"
        detailed += ", 'unparseable_dialogue'"
        reason_detail = "coalesce(missing, wrong, unparseable, pii)"
    # One pass of a union of every pattern finds the rare rows worth a closer look.
    suspicious = [CONTROL_CHARACTERS] if quality.reject_control_characters else []
    if quality.pii.action == "reject" and pii_on:
        suspicious += [PII_PATTERNS[k] for k in quality.pii.kinds]
    flagged = (
        f"regexp_matches(all_text, {_lit('|'.join(f'(?:{p})' for p in suspicious))})"
        if suspicious
        else "false"
    )
    control = (
        f"flagged AND regexp_matches(all_text, {_lit(CONTROL_CHARACTERS)})"
        if quality.reject_control_characters
        else "false"
    )
    return f"""
    WITH raw AS (
        SELECT *, read_error IS NULL AND NOT record_too_long AND json_valid(record) AS is_json
        FROM (
            SELECT partition, source_file, record_index, sub_index, record, read_error, ingested_at,
                   length(record) > {quality.max_record_chars} AS record_too_long
            FROM "{pipeline}".{RAW_TABLE} WHERE partition = $partition
        )
    ),
    objects AS (
        -- invalid records are looked at as an empty object, so the JSON functions never see them
        SELECT * EXCLUDE (record), is_json AND json_type(doc) = 'OBJECT' AS is_object
        FROM (SELECT *, CASE WHEN is_json THEN record ELSE '{{}}' END AS doc FROM raw)
    ),
    fields AS ({_fields_sql(schema, source)}),
    usable AS (
        SELECT * EXCLUDE (contents, doc), contents AS original,
               {parsed} AS parsed
        FROM fields
    ),
    normalized AS (
        SELECT *, CASE WHEN parsed THEN {contents} END AS contents FROM usable
    ),
    sized AS (
        SELECT *,
            coalesce(length(prompt) > {quality.max_prompt_chars}, false) AS prompt_too_long,
            coalesce({response_too_long}, false) AS response_too_long
        FROM (
            SELECT *,
                CASE WHEN parsed THEN {prompt} END AS prompt,
                CASE WHEN parsed THEN {response} END AS response
            FROM normalized
        )
    ),
    shaped AS (
        -- a row over the length limits is quarantined for that: the costly rest (its JSON, hash and
        -- pattern scans, each a copy of a text that may be tens of MB) is skipped for it
        SELECT *,{shaped_pair}
            CASE WHEN within_limits THEN {messages} END AS messages,
            CASE WHEN within_limits THEN {text} END AS text,
            CASE WHEN within_limits THEN array_to_string(contents, chr(10)) END AS all_text
        FROM (SELECT *, parsed AND NOT prompt_too_long AND NOT response_too_long AS within_limits FROM sized)
    ),
    scanned AS (
        SELECT *, CASE WHEN flagged THEN {pii_kind} END AS pii
        FROM (SELECT *, coalesce(within_limits AND {flagged}, false) AS flagged FROM shaped)
    ),
    judged AS (
        SELECT *,
            CASE
                WHEN read_error IS NOT NULL THEN read_error
                WHEN record_too_long THEN 'record_too_long'
                WHEN NOT is_json THEN 'malformed_json'
                WHEN NOT is_object THEN 'not_an_object'
                WHEN missing IS NOT NULL THEN 'missing_field'
                WHEN wrong IS NOT NULL THEN 'wrong_type'
                {parse_reason}
                WHEN {bad_conversation} THEN 'bad_conversation'
                WHEN {empty_prompt} THEN 'empty_prompt'
                WHEN {empty_response} THEN 'empty_response'
                {pair_reason}
                WHEN prompt_too_long THEN 'prompt_too_long'
                WHEN response_too_long THEN 'response_too_long'
                WHEN {control} THEN 'control_characters'
                WHEN pii IS NOT NULL THEN 'pii'
            END AS reason,
            {reason_detail} AS reason_detail,
            {
        "within_limits AND all_text IS DISTINCT FROM array_to_string(original, chr(10))"
        if contents != "original"
        else "false"
    } AS redacted
        FROM scanned
    )
    SELECT partition, source_file, record_index, sub_index, ingested_at, messages, text,
        -- the data checks need an oversized text only up to one character past its limit
        left(prompt, {quality.max_prompt_chars + 1}) AS prompt,
        left(response, {quality.max_response_chars + 1}) AS response,
        CASE WHEN messages IS NOT NULL OR text IS NOT NULL
             THEN sha256({hashed}) END AS example_hash,
        redacted, reason,
        CASE WHEN reason IN ({detailed}) THEN reason_detail END AS detail,
        {pair_columns}
    FROM judged
    """


def _pair_parser(source: SourceSpec) -> Callable[..., pa.Array]:
    """The DuckDB function (Arrow, a batch at a time) that parses preference records with
    loraflow/preference.py: the three fields' JSON types, then their texts (a list as its JSON
    text) in, PAIR_TYPE out. Keys are the file's own names (the source's `columns`)."""
    keys = tuple(source.column(f) for f in PAIR_FIELDS)

    def parse(types: tuple, values: tuple) -> dict:
        record = {}
        for key, kind, value in zip(keys, types, values, strict=True):
            if kind == "ARRAY":
                try:
                    record[key] = json.loads(value)
                except (ValueError, RecursionError):  # deeper than Python's parser goes: not messages
                    return {"wrong": f"{key}[]"}
            elif kind in ("VARCHAR", "NULL"):
                record[key] = value
            elif kind is not None:  # a number, boolean or object: any stand-in of that kind is the wrong type
                record[key] = {"json_type": kind}
        pair = parse_pair(record, *keys, allow_identical=True)  # validation orders identical_pair itself
        if isinstance(pair, PairProblem):
            return {PAIR_PROBLEM_FIELDS[pair.reason]: pair.detail}
        turns = pair.prompt + pair.chosen + pair.rejected
        return {
            "identical": pair.identical,
            "roles": [t["role"] for t in turns],
            "contents": [t["content"] for t in turns],
            "prompt_turns": len(pair.prompt),
            "chosen_turns": len(pair.chosen),
        }

    # DuckDB counts the parameters: one per column, no *args
    def parse_batch(prompt_type, chosen_type, rejected_type, prompt, chosen, rejected) -> pa.Array:
        types = zip(*(c.to_pylist() for c in (prompt_type, chosen_type, rejected_type)), strict=True)
        values = zip(*(c.to_pylist() for c in (prompt, chosen, rejected)), strict=True)
        return pa.array([parse(t, v) for t, v in zip(types, values, strict=True)], type=PAIR_TYPE)

    return parse_batch


@contextlib.contextmanager
def _pair_parser_registered(con: duckdb.DuckDBPyConnection, source: SourceSpec) -> Iterator[None]:
    """The pair parser callable in `con` for one query, with texts passed to it in Arrow's 64-bit
    buffers (a batch of long records can hold more than the 2 GB of a 32-bit one)."""
    large = con.execute("SELECT current_setting('arrow_large_buffer_size')").fetchall()[0][0]
    con.create_function(
        PAIR_FUNCTION,
        _pair_parser(source),
        ["VARCHAR"] * 6,
        PAIR_SQL_TYPE,
        type="arrow",
        null_handling="special",  # an absent field's NULL type is information, not a null result
    )
    try:
        con.execute("SET arrow_large_buffer_size = true")
        yield
    finally:
        con.execute(f"SET arrow_large_buffer_size = {str(large).lower()}")
        con.remove_function(PAIR_FUNCTION)


def _mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    """Of valid rows with the same example hash, all but the first (record, sub-index) become duplicates."""
    con.execute(
        """
        UPDATE classified SET reason = 'duplicate'
        FROM (
            SELECT example_hash, min(record_index * 1048576 + sub_index) AS first
            FROM classified WHERE reason IS NULL GROUP BY example_hash HAVING count(*) > 1
        ) AS firsts
        WHERE classified.reason IS NULL AND classified.example_hash = firsts.example_hash
          AND classified.record_index * 1048576 + classified.sub_index > firsts.first
        """
    )


def validate_partition(
    con: duckdb.DuckDBPyConnection,
    pipeline: str,
    partition: str,
    source: SourceSpec,
    quality: QualitySpec,
    tokenizer=None,
) -> ValidationResult:
    """Split one partition's raw rows into validated examples and quarantined rows (replacing both).

    `tokenizer` is needed only when quality.max_tokens is set. Leaves the classified rows in the
    temp table `classified` for callers that want to look at them (data checks).
    """
    ensure_tables(con, pipeline)
    schema = detect_schema(con, pipeline, partition, source, quality.max_record_chars)
    with _pair_parser_registered(con, source) if schema == "preference" else contextlib.nullcontext():
        con.execute(
            "CREATE OR REPLACE TEMP TABLE classified AS "
            + _classified_sql(pipeline, schema, source, quality),
            {"partition": partition},
        )
    _mark_duplicates(con)
    if quality.max_tokens is not None:
        if tokenizer is None:
            raise ValueError("quality.max_tokens is set: validate_partition needs the base model's tokenizer")
        _mark_too_many_tokens(con, tokenizer, quality.max_tokens)
    with replacing_rows(con):
        for table in (VALID_TABLE, QUARANTINE_TABLE):
            con.execute(f'DELETE FROM "{pipeline}".{table} WHERE partition = ?', [partition])
        con.execute(
            f"""
            INSERT INTO "{pipeline}".{VALID_TABLE} (partition, source_file, record_index, sub_index, schema,
                messages, text, example_hash, ingested_at, rejected, prompt_turns)
            SELECT partition, source_file, record_index, sub_index, ?, messages, text, example_hash, ingested_at,
                rejected, prompt_turns
            FROM classified WHERE reason IS NULL
            """,
            [schema],
        )
        con.execute(
            f"""
            INSERT INTO "{pipeline}".{QUARANTINE_TABLE} (partition, source_file, record_index, sub_index, reason,
                detail, record, quarantined_at)
            SELECT c.partition, c.source_file, c.record_index, c.sub_index, c.reason, c.detail, r.record,
                   now()::TIMESTAMP
            FROM classified c JOIN "{pipeline}".{RAW_TABLE} r
              ON r.partition = $partition AND r.record_index = c.record_index AND r.sub_index = c.sub_index
            WHERE c.reason IS NOT NULL
            """,
            {"partition": partition},
        )
    counts = dict(
        con.execute("SELECT coalesce(reason, 'valid'), count(*) FROM classified GROUP BY 1").fetchall()
    )
    redacted = con.execute("SELECT count(*) FROM classified WHERE redacted AND reason IS NULL").fetchone()[0]
    valid = int(counts.pop("valid", 0))
    reasons = {reason: int(counts.get(reason, 0)) for reason in REASONS}
    return ValidationResult(
        partition=partition,
        schema=schema,
        raw=valid + sum(reasons.values()),
        valid=valid,
        quarantined=sum(reasons.values()),
        reasons=reasons,
        redacted={"rows": int(redacted)} if redacted else {},
    )


def _mark_too_many_tokens(con: duckdb.DuckDBPyConnection, tokenizer, max_tokens: int) -> None:
    """Count tokens of the rows still valid and mark those over the limit `too_many_tokens`.

    Only rows within the character limits are still valid, so no oversized text is tokenized; they
    are read in batches, so the partition's texts are never all in memory at once. A preference row
    has two texts (`token_texts`: the prompt with each continuation); the longer one counts.
    """
    batches = con.execute(
        "SELECT record_index, sub_index, token_texts, CASE WHEN token_texts IS NULL "
        "THEN coalesce(prompt, '') || chr(10) || coalesce(response, '') END AS text "
        "FROM classified WHERE reason IS NULL"
    ).to_arrow_reader(2048)
    over_index, over_sub = [], []
    for batch in batches:
        texts, pairs = batch.column("text").to_pylist(), batch.column("token_texts").to_pylist()
        per_row = [pair or [text] for text, pair in zip(texts, pairs, strict=True)]
        flat = [text for row in per_row for text in row]
        lengths = iter(tokenizer(flat, add_special_tokens=False, return_length=True)["length"])
        indices, subs = batch.column("record_index").to_pylist(), batch.column("sub_index").to_pylist()
        for index, sub, texts in zip(indices, subs, per_row, strict=True):
            if max(next(lengths) for _ in texts) > max_tokens:
                over_index.append(index)
                over_sub.append(sub)
    if not over_index:
        return
    con.register("over_limit", pa.table({"record_index": over_index, "sub_index": over_sub}))
    try:
        con.execute(
            "UPDATE classified SET reason = 'too_many_tokens' FROM over_limit "
            "WHERE classified.record_index = over_limit.record_index AND classified.sub_index = over_limit.sub_index"
        )
    finally:
        con.unregister("over_limit")


# ---------------------------------------------------------------------------------------------
# reading back


def partition_counts(con: duckdb.DuckDBPyConnection, pipeline: str, partition: str) -> tuple[int, int, int]:
    """(raw, valid, quarantined) rows stored for one partition, read back from the tables."""
    return con.execute(
        f"""
        SELECT (SELECT count(*) FROM "{pipeline}".{RAW_TABLE} WHERE partition = $p),
               (SELECT count(*) FROM "{pipeline}".{VALID_TABLE} WHERE partition = $p),
               (SELECT count(*) FROM "{pipeline}".{QUARANTINE_TABLE} WHERE partition = $p)
        """,
        {"p": partition},
    ).fetchone()


def quarantine_sample(
    con: duckdb.DuckDBPyConnection, pipeline: str, partition: str, limit: int = 10
) -> list[tuple]:
    """A few quarantined rows: (record index, reason, detail, record cut to 120 characters)."""
    return con.execute(
        f"""
        SELECT record_index, reason, coalesce(detail, ''), left(record, 120) FROM "{pipeline}".{QUARANTINE_TABLE}
        WHERE partition = ? ORDER BY record_index, sub_index LIMIT ?
        """,
        [partition, limit],
    ).fetchall()


def valid_sample(
    con: duckdb.DuckDBPyConnection, pipeline: str, partition: str, limit: int = 5
) -> list[tuple]:
    """A few valid examples: (record index, messages or text cut to 160 characters)."""
    return con.execute(
        f"""
        SELECT record_index, left(coalesce(messages, text), 160) FROM "{pipeline}".{VALID_TABLE}
        WHERE partition = ? ORDER BY record_index, sub_index LIMIT ?
        """,
        [partition, limit],
    ).fetchall()


def record_schema(
    con: duckdb.DuckDBPyConnection, pipeline: str, partition: str, max_record_chars: int = MAX_RECORD_CHARS
) -> dict[str, str]:
    """Top-level keys of the partition's JSON records with their JSON types (most common type wins);
    records over `max_record_chars` are not parsed."""
    rows = con.execute(
        f"""
        WITH keys AS (
            SELECT unnest(json_keys(record)) AS key, record FROM "{pipeline}".{RAW_TABLE}
            WHERE partition = ? AND read_error IS NULL AND length(record) <= ?
              AND json_valid(record) AND json_type(record) = 'OBJECT'
        )
        SELECT key, mode(json_type(record, '$."' || replace(key, '"', '\\"') || '"')) FROM keys GROUP BY key ORDER BY key
        """,
        [partition, max_record_chars],
    ).fetchall()
    return dict(rows)


def schema_drift(previous: dict[str, str] | None, current: dict[str, str]) -> dict[str, list[str]]:
    """How a partition's record schema (key -> JSON type, see record_schema) differs from the one
    validated before it: keys `added`, `removed`, and `changed_type`, each present only when not
    empty. Nothing to compare with (the first validation) is no drift."""
    if previous is None:
        return {}
    drift = {
        "added": sorted(set(current) - set(previous)),
        "removed": sorted(set(previous) - set(current)),
        "changed_type": sorted(k for k in set(current) & set(previous) if current[k] != previous[k]),
    }
    return {k: v for k, v in drift.items() if v}


def classified_frame(con: duckdb.DuckDBPyConnection):
    """The rows of the last validate_partition call as a DataFrame for data checks.

    Each prompt and response is there up to one character past its length limit: the length rules
    reach the same verdict, and an oversized field (tens of MB) costs the checks no more than one at
    the limit.
    """
    return con.execute(
        "SELECT record_index, sub_index, prompt, response, example_hash, reason FROM classified"
    ).df()


def validated_fingerprint(con: duckdb.DuckDBPyConnection, pipeline: str, partition: str) -> str:
    """sha256 over a partition's accepted example hashes in record order: its content version."""
    accepted = con.execute(
        f"""
        SELECT coalesce(string_agg(example_hash, ',' ORDER BY record_index, sub_index), '')
        FROM "{pipeline}".{VALID_TABLE} WHERE partition = ?
        """,
        [partition],
    ).fetchone()[0]
    return hashlib.sha256(accepted.encode()).hexdigest()


def source_lineage(con: duckdb.DuckDBPyConnection, pipeline: str) -> list[dict]:
    """Per source file: its sha256 at ingestion and how many rows were accepted and quarantined."""
    rows = con.execute(
        f"""
        SELECT r.source_file, any_value(r.file_sha256),
               (SELECT count(*) FROM "{pipeline}".{VALID_TABLE} v WHERE v.partition = r.partition),
               (SELECT count(*) FROM "{pipeline}".{QUARANTINE_TABLE} q WHERE q.partition = r.partition)
        FROM "{pipeline}".{RAW_TABLE} r GROUP BY r.source_file, r.partition ORDER BY r.source_file
        """
    ).fetchall()
    return [{"file": f, "sha256": h, "valid": int(v), "quarantined": int(q)} for f, h, v, q in rows]


def drop_partition(con: duckdb.DuckDBPyConnection, pipeline: str, partition: str) -> None:
    """Remove a partition's rows from the raw, validated and quarantine tables (its file is gone)."""
    ensure_tables(con, pipeline)
    for table in (RAW_TABLE, VALID_TABLE, QUARANTINE_TABLE):
        con.execute(f'DELETE FROM "{pipeline}".{table} WHERE partition = ?', [partition])


def partitions_over_limit(
    con: duckdb.DuckDBPyConnection, pipeline: str, max_invalid_fraction: float
) -> list[tuple]:
    """Partitions whose quarantined share is over the limit: (partition, quarantined, raw), worst first."""
    ensure_tables(con, pipeline)
    return con.execute(
        f"""
        WITH raw AS (SELECT partition, count(*) AS n FROM "{pipeline}".{RAW_TABLE} GROUP BY 1),
        bad AS (SELECT partition, count(*) AS n FROM "{pipeline}".{QUARANTINE_TABLE} GROUP BY 1)
        SELECT raw.partition, bad.n, raw.n FROM raw JOIN bad USING (partition)
        WHERE bad.n > ? * raw.n ORDER BY bad.n / raw.n DESC, 1
        """,
        [max_invalid_fraction],
    ).fetchall()


def partitions_not_adding_up(con: duckdb.DuckDBPyConnection, pipeline: str) -> list[tuple]:
    """Partitions whose raw rows are not exactly their validated plus quarantined rows (something was
    lost or counted twice): (partition, raw, valid, quarantined), by partition."""
    ensure_tables(con, pipeline)
    return con.execute(
        f"""
        WITH raw AS (SELECT partition, count(*) AS n FROM "{pipeline}".{RAW_TABLE} GROUP BY 1),
        valid AS (SELECT partition, count(*) AS n FROM "{pipeline}".{VALID_TABLE} GROUP BY 1),
        bad AS (SELECT partition, count(*) AS n FROM "{pipeline}".{QUARANTINE_TABLE} GROUP BY 1)
        SELECT raw.partition, raw.n, coalesce(valid.n, 0), coalesce(bad.n, 0)
        FROM raw LEFT JOIN valid USING (partition) LEFT JOIN bad USING (partition)
        WHERE raw.n <> coalesce(valid.n, 0) + coalesce(bad.n, 0) ORDER BY 1
        """
    ).fetchall()
