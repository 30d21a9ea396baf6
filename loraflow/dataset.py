"""The training dataset: validated examples formatted, tokenized with loss masks and split.

The dataset is content-addressed: its version hashes the example hashes (and the split each
source asks for), the tokenizer files, the chat template and the formatting settings. A version
that already exists in the store is reused as is, with no retokenizing.

A dataset folder holds `train.parquet`, `eval.parquet`, `chat_template.jinja` (the template every
later stage renders with) and `summary.json` (counts and token statistics).

A preference pair is stored as one row: `messages`, `input_ids` and `labels` are the prompt with
the chosen continuation (so SFT and the generation metrics read it like any conversation), and
`rejected`, `rejected_input_ids` and `rejected_labels` the prompt with the rejected one. Both
sequences must fit `format.max_seq_len`: `overlong` drops the pair, truncates both (the prompt
kept, a pair left without a trained token on either side dropped), or stops the run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from loraflow.artifacts import atomic_dir, write_json_atomic
from loraflow.base_model import load_tokenizer
from loraflow.formatting import (
    IGNORE_INDEX,
    TokenizedExample,
    tokenize_completion,
    tokenize_conversations,
    tokenize_pairs,
    with_system_prompt,
)
from loraflow.hashing import content_hash
from loraflow.packing import planned_efficiency
from loraflow.spec import FormatSpec
from loraflow.templates import end_of_turn, using_template
from loraflow.validate import CROSS_DUPLICATES_VIEW, EXAMPLES_VIEW, ensure_tables

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
TOKENIZE_BATCH = 1000
TEMPLATE_FILE = "chat_template.jinja"
SUMMARY_FILE = "summary.json"
LAYOUT = "3"
"""Bumped whenever the stored layout changes, so a dataset written by older code is never reused."""
# settings that shape training batches but not the stored tokens: changing them reuses the dataset
_BATCHING_ONLY = {"packing"}


class DatasetError(ValueError):
    """Examples that cannot become a training set under the pipeline's format settings."""


def is_eval(example_hash: str, eval_fraction: float) -> bool:
    """Whether an example is held out at a fraction: decided by its content hash alone, so it never moves."""
    return int(example_hash[:16], 16) / 2**64 < eval_fraction


def assign_splits(
    rows: list[dict], eval_size: float | int, roles: dict[str, str] | None = None
) -> dict[str, str]:
    """example_hash -> "train" or "eval".

    `roles` maps a row's partition to its source's `split` (auto, train or eval; auto when absent).
    With any eval source, the eval set is exactly those sources' examples. Otherwise auto rows are
    held out by hash: below the fraction, or the `eval_size` lowest hashes for a count.
    """
    roles = roles or {}
    role = {row["example_hash"]: roles.get(row["partition"], "auto") for row in rows}
    if "eval" in role.values():
        return {h: "eval" if r == "eval" else "train" for h, r in role.items()}
    if isinstance(eval_size, float):
        return {h: "eval" if r == "auto" and is_eval(h, eval_size) else "train" for h, r in role.items()}
    held_out = set(sorted(h for h, r in role.items() if r == "auto")[:eval_size])
    return {h: "eval" if h in held_out else "train" for h in role}


def select_examples(con: duckdb.DuckDBPyConnection, pipeline: str) -> tuple[list[dict], int]:
    """All validated examples of a pipeline, each content once, and how many repeats were dropped.

    Of identical examples in several files, the copy in the partition that sorts first (then the
    lowest record index) is kept, whatever order the partitions were ingested in.
    """
    ensure_tables(con, pipeline)
    columns = (
        "partition",
        "source_file",
        "record_index",
        "sub_index",
        "messages",
        "text",
        "example_hash",
        "rejected",
        "prompt_turns",
    )
    rows = con.execute(
        f'SELECT {", ".join(columns)} FROM "{pipeline}".{EXAMPLES_VIEW} ORDER BY example_hash'
    ).fetchall()
    dropped = con.execute(f'SELECT count(*) FROM "{pipeline}".{CROSS_DUPLICATES_VIEW}').fetchone()[0]
    return [dict(zip(columns, row, strict=True)) for row in rows], int(dropped)


def dataset_version(splits: dict[str, str], tokenizer_hash: str, chat_template: str, fmt: FormatSpec) -> str:
    """Content hash of everything that decides the stored dataset: each example hash with its split,
    the tokenizer files, the template and the formatting settings (those that shape tokens)."""
    return content_hash(
        {
            "layout": LAYOUT,
            "tokenizer": tokenizer_hash,
            "chat_template": chat_template,
            "settings": fmt.model_dump(mode="json", exclude=_BATCHING_ONLY),
            "splits": sorted(splits.items()),
        },
        length=20,
    )


def percentile(sorted_values: list[int], q: float) -> int:
    """The nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats going astray
    return sorted_values[int(rank) - 1]


@dataclass(frozen=True)
class DatasetSummary:
    version: str
    path: str
    chat_template_source: str
    end_of_turn: str
    train_examples: int
    eval_examples: int
    truncated: int
    dropped_too_long: int
    dropped_untrainable_after_truncation: int
    duplicates_dropped: int
    train_tokens: int
    trainable_tokens: int
    examples_without_trained_tokens: int
    examples_without_trained_end: int
    token_percentiles: dict[str, int] = field(default_factory=dict)
    mean_tokens: float = 0.0
    packing_efficiency: float = 0.0
    """Real tokens over row tokens if the train split were packed into rows of max_seq_len."""
    preference_pairs: int = 0
    """Examples that are chosen/rejected pairs (each one row of two sequences)."""
    reused: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def build_dataset(
    rows: list[dict],
    tokenizer,
    fmt: FormatSpec,
    chat_template: str,
    tokenizer_hash: str,
    datasets_dir: Path,
    duplicates_dropped: int = 0,
    roles: dict[str, str] | None = None,
    template_source: str = "given",
) -> DatasetSummary:
    """Format, tokenize and split `rows` with `chat_template` into `<datasets_dir>/<version>/`, or
    reuse that version when it exists."""
    splits = assign_splits(rows, fmt.eval_size, roles)
    version = dataset_version(splits, tokenizer_hash, chat_template, fmt)
    target = Path(datasets_dir) / version
    if (target / SUMMARY_FILE).is_file():
        summary = json.loads((target / SUMMARY_FILE).read_text())
        return DatasetSummary(**{**summary, "path": str(target), "reused": True})
    with using_template(tokenizer, chat_template):
        return _build(
            rows, splits, tokenizer, fmt, chat_template, template_source, version, target, duplicates_dropped
        )


def _build(rows, splits, tokenizer, fmt, chat_template, template_source, version, target, duplicates_dropped):
    started = time.perf_counter()
    marker, eot_id = end_of_turn(tokenizer)
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    too_long: list[dict] = []
    counts = {"truncated": 0, "dropped_too_long": 0, "dropped_untrainable_after_truncation": 0}
    for start in range(0, len(rows), TOKENIZE_BATCH):
        chunk = rows[start : start + TOKENIZE_BATCH]
        pairs = _pairs_of(chunk, tokenizer, fmt)
        conversations = {
            i: with_system_prompt(json.loads(row["messages"]), fmt.system_prompt)
            for i, row in enumerate(chunk)
            if row["messages"] is not None and i not in pairs
        }
        tokenized = (
            dict(
                zip(
                    conversations,
                    tokenize_conversations(
                        tokenizer, list(conversations.values()), fmt.train_turns, fmt.train_on_inputs
                    ),
                    strict=True,
                )
            )
            if conversations
            else {}
        )
        for i, row in enumerate(chunk):
            pair = pairs.get(i)
            if pair is not None:
                messages, chosen_turns, rejected_turns, tokens = pair
                example, other = tokens.chosen, tokens.rejected
                end_trained = all(
                    _end_trained(seq, turns, fmt, eot_id, tokenizer.eos_token_id)
                    for seq, turns in ((example, chosen_turns), (other, rejected_turns))
                )
            else:
                example = tokenized[i] if i in tokenized else tokenize_completion(tokenizer, row["text"])
                messages, rejected_turns, other = conversations.get(i), None, None
                end_trained = _end_trained(example, messages, fmt, eot_id, tokenizer.eos_token_id)
            truncated = False
            longest = max(len(example.input_ids), len(other.input_ids) if other else 0)
            if longest > fmt.max_seq_len:
                too_long.append({**row, "num_tokens": longest})
                if fmt.overlong in ("drop", "error"):
                    counts["dropped_too_long"] += 1
                    continue
                example = _cut(example, fmt.max_seq_len)
                other = _cut(other, fmt.max_seq_len) if other else None
                if example.trainable_tokens == 0 or (other is not None and other.trainable_tokens == 0):
                    counts["dropped_untrainable_after_truncation"] += 1
                    continue
                counts["truncated"] += 1
                truncated = True
            records[splits[row["example_hash"]]].append(
                {
                    "example_hash": row["example_hash"],
                    "source_file": row["source_file"],
                    "record_index": row["record_index"],
                    "sub_index": row["sub_index"],
                    "messages": json.dumps(messages, ensure_ascii=False) if messages is not None else None,
                    "text": row["text"],
                    "input_ids": example.input_ids,
                    "labels": example.labels,
                    # a pair's length is its longer sequence: what max_seq_len and a batch's width are about
                    "num_tokens": max(len(example.input_ids), len(other.input_ids) if other else 0),
                    "trainable_tokens": example.trainable_tokens + (other.trainable_tokens if other else 0),
                    "truncated": truncated,
                    "end_trained": end_trained and not truncated,
                    "rejected": json.dumps(rejected_turns, ensure_ascii=False) if other else None,
                    "rejected_input_ids": other.input_ids if other else None,
                    "rejected_labels": other.labels if other else None,
                    "prompt_tokens": pair[3].prompt_tokens if pair is not None else None,
                    "prompt_turns": len(messages) - len(pair[1]) if pair is not None else None,
                }
            )
        done = start + len(chunk)
        log.info("tokenized %d/%d examples (%.0f/s)", done, len(rows), done / (time.perf_counter() - started))

    if too_long and fmt.overlong == "error":
        worst = sorted(too_long, key=lambda r: -r["num_tokens"])[:10]
        listing = "; ".join(
            f"{r['source_file']} record {r['record_index']} ({r['num_tokens']} tokens)" for r in worst
        )
        raise DatasetError(
            f"{len(too_long)} example(s) are longer than format.max_seq_len ({fmt.max_seq_len} tokens), and "
            f"format.overlong is 'error': {listing}. Raise max_seq_len, shorten or remove those records, or "
            "set format.overlong to drop or truncate"
        )

    kept = [r for split in SPLITS for r in records[split]]
    lengths = sorted(r["num_tokens"] for r in kept)
    train = records["train"]
    summary = DatasetSummary(
        version=version,
        path=str(target),
        chat_template_source=template_source,
        end_of_turn=marker,
        train_examples=len(train),
        eval_examples=len(records["eval"]),
        duplicates_dropped=duplicates_dropped,
        train_tokens=sum(r["num_tokens"] for r in train),
        trainable_tokens=sum(r["trainable_tokens"] for r in train),
        examples_without_trained_tokens=sum(r["trainable_tokens"] == 0 for r in kept),
        examples_without_trained_end=sum(not r["end_trained"] and not r["truncated"] for r in kept),
        token_percentiles={f"p{q}": percentile(lengths, q) for q in (50, 90, 95, 99, 100)},
        mean_tokens=round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        packing_efficiency=round(planned_efficiency([r["num_tokens"] for r in train], fmt.max_seq_len), 4),
        preference_pairs=sum(r["rejected_input_ids"] is not None for r in kept),
        **counts,
    )
    with atomic_dir(target) as tmp:
        for split in SPLITS:
            pq.write_table(_to_table(records[split]), tmp / f"{split}.parquet")
        (tmp / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        write_json_atomic(tmp / SUMMARY_FILE, summary.to_json())
    log.info(
        "dataset %s: %d train / %d eval examples, %d tokens in %.1fs",
        version,
        summary.train_examples,
        summary.eval_examples,
        summary.train_tokens,
        time.perf_counter() - started,
    )
    return summary


def _pairs_of(chunk: list[dict], tokenizer, fmt: FormatSpec) -> dict[int, tuple]:
    """The preference rows of a chunk, tokenized in one batch: index -> (prompt + chosen messages,
    chosen continuation, rejected continuation, TokenizedPair)."""
    found = {}
    for i, row in enumerate(chunk):
        if row.get("rejected") is None:
            continue
        messages = json.loads(row["messages"])
        turns = row["prompt_turns"]
        prompt = with_system_prompt(messages[:turns], fmt.system_prompt)
        found[i] = (prompt, messages[turns:], json.loads(row["rejected"]))
    if not found:
        return {}
    tokens = tokenize_pairs(
        tokenizer,
        [p for p, _, _ in found.values()],
        [c for _, c, _ in found.values()],
        [r for _, _, r in found.values()],
        fmt.train_turns,
        fmt.train_on_inputs,
    )
    return {
        i: (prompt + chosen, chosen, rejected, pair)
        for (i, (prompt, chosen, rejected)), pair in zip(found.items(), tokens, strict=True)
    }


def _cut(example: TokenizedExample, length: int) -> TokenizedExample:
    return TokenizedExample(input_ids=example.input_ids[:length], labels=example.labels[:length])


def _end_trained(
    example: TokenizedExample, messages, fmt: FormatSpec, eot_id: int | None, eos_id: int
) -> bool:
    """Whether every trained turn's end-of-turn token carries a label (the text's eos for a completion)."""
    if messages is None:
        return bool(example.labels) and example.labels[-1] == eos_id
    if eot_id is None:
        return False
    answers = sum(m["role"] == "assistant" for m in messages)
    turns = 1 if fmt.train_turns == "last" and not fmt.train_on_inputs else answers
    return sum(label == eot_id for label in example.labels) >= turns


_SCHEMA = pa.schema(
    [
        ("example_hash", pa.string()),
        ("source_file", pa.string()),
        ("record_index", pa.int64()),
        ("sub_index", pa.int32()),
        ("messages", pa.string()),
        ("text", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("trainable_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("end_trained", pa.bool_()),
        ("rejected", pa.string()),
        ("rejected_input_ids", pa.list_(pa.int32())),
        ("rejected_labels", pa.list_(pa.int32())),
        ("prompt_tokens", pa.int32()),
        ("prompt_turns", pa.int32()),
    ]
)


def _to_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=_SCHEMA)


def load_split(dataset_dir: Path, split: str) -> list[dict]:
    """One split of a stored dataset as a list of dicts (messages parsed back into lists)."""
    rows = pq.read_table(Path(dataset_dir) / f"{split}.parquet").to_pylist()
    for row in rows:
        for key in ("messages", "rejected"):
            row[key] = json.loads(row[key]) if row[key] is not None else None
    return rows


def stored_template(dataset_dir: Path) -> str:
    """The chat template a dataset was rendered with."""
    return (Path(dataset_dir) / TEMPLATE_FILE).read_text(encoding="utf-8")


def dataset_tokenizer(base_model_dir: Path, dataset_dir: Path, trust_remote_code: bool = False):
    """The base model's tokenizer carrying the dataset's chat template: what training, evaluation and
    serving must all render with."""
    tokenizer = load_tokenizer(base_model_dir, trust_remote_code)
    tokenizer.chat_template = stored_template(dataset_dir)
    return tokenizer


def template_round_trip(tokenizer, dataset_dir: Path, fmt: FormatSpec, sample: int = 32) -> list[str]:
    """Render and tokenize up to `sample` stored conversations again with the stored template and a
    fresh tokenizer; the example hashes whose ids or labels differ from what was stored (none when
    the stored template reproduces training exactly)."""
    rows = [r for split in SPLITS for r in load_split(dataset_dir, split) if r["messages"] is not None]
    rows = rows[:sample]
    if not rows:
        return []
    with using_template(tokenizer, stored_template(dataset_dir)):
        pairs = [r for r in rows if r["rejected"] is not None]
        chats = [r for r in rows if r["rejected"] is None]
        again = dict(
            zip(
                (r["example_hash"] for r in chats),
                tokenize_conversations(
                    tokenizer, [r["messages"] for r in chats], fmt.train_turns, fmt.train_on_inputs
                ),
                strict=True,
            )
        )
        again_pairs = tokenize_pairs(
            tokenizer,
            [r["messages"][: r["prompt_turns"]] for r in pairs],
            [r["messages"][r["prompt_turns"] :] for r in pairs],
            [r["rejected"] for r in pairs],
            fmt.train_turns,
            fmt.train_on_inputs,
        )
    differ = []
    for row in chats:
        example = again[row["example_hash"]]
        if (
            example.input_ids[: row["num_tokens"]] != row["input_ids"]
            or example.labels[: row["num_tokens"]] != row["labels"]
        ):
            differ.append(row["example_hash"])
    for row, pair in zip(pairs, again_pairs, strict=True):
        width = len(row["input_ids"]), len(row["rejected_input_ids"])
        if (
            pair.chosen.input_ids[: width[0]] != row["input_ids"]
            or pair.chosen.labels[: width[0]] != row["labels"]
            or pair.rejected.input_ids[: width[1]] != row["rejected_input_ids"]
            or pair.rejected.labels[: width[1]] != row["rejected_labels"]
        ):
            differ.append(row["example_hash"])
    return differ


def sample_view(tokenizer, row: dict, mark: tuple[str, str] = ("[[", "]]")) -> str:
    """The text of one stored example with each trained span wrapped in `mark` ([[like this]]).

    Runs of tokens are decoded together, so characters split across tokens read correctly.
    """
    import itertools

    opening, closing = mark
    pieces = []
    pairs = zip(row["input_ids"], row["labels"], strict=True)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token_id for token_id, _ in run])
        pieces.append(f"{opening}{text}{closing}" if trained else text)
    return "".join(pieces)
