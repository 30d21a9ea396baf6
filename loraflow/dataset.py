"""The training dataset: validated examples formatted, tokenized with loss masks and split.

The dataset is content-addressed: its version hashes the example hashes, the tokenizer and
template (through the base model's content hash), and the formatting settings. A version that
already exists in the store is reused as is, with no retokenizing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from loraflow.artifacts import atomic_dir, write_json_atomic
from loraflow.formatting import tokenize_completion, tokenize_conversations, with_system_prompt
from loraflow.spec import FormatSpec
from loraflow.validate import CROSS_DUPLICATES_VIEW, EXAMPLES_VIEW, ensure_tables

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
TOKENIZE_BATCH = 1000


def is_eval(example_hash: str, eval_fraction: float) -> bool:
    """Whether an example is held out: decided by its content hash alone, so it never moves."""
    return int(example_hash[:16], 16) / 2**64 < eval_fraction


def select_examples(con: duckdb.DuckDBPyConnection, pipeline: str) -> tuple[list[dict], int]:
    """All validated examples of a pipeline, each content once, and how many repeats were dropped.

    Of identical examples in several files, the copy in the partition that sorts first (then the
    lowest record index) is kept, whatever order the partitions were ingested in.
    """
    ensure_tables(con, pipeline)
    columns = ("partition", "source_file", "record_index", "sub_index", "messages", "text", "example_hash")
    rows = con.execute(
        f'SELECT {", ".join(columns)} FROM "{pipeline}".{EXAMPLES_VIEW} ORDER BY example_hash'
    ).fetchall()
    dropped = con.execute(f'SELECT count(*) FROM "{pipeline}".{CROSS_DUPLICATES_VIEW}').fetchone()[0]
    return [dict(zip(columns, row, strict=True)) for row in rows], int(dropped)


def dataset_version(
    example_hashes: list[str], base_model_hash: str, chat_template: str, fmt: FormatSpec
) -> str:
    """Content hash of everything that decides the tokenized dataset."""
    digest = hashlib.sha256()
    for part in (base_model_hash, chat_template, json.dumps(fmt.model_dump(mode="json"), sort_keys=True)):
        digest.update(part.encode() + b"\0")
    for example_hash in sorted(example_hashes):
        digest.update(example_hash.encode())
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class DatasetSummary:
    version: str
    path: str
    train_examples: int
    eval_examples: int
    dropped_too_long: int
    duplicates_dropped: int
    train_tokens: int
    trainable_tokens: int
    max_tokens: int
    mean_tokens: float
    reused: bool

    def to_json(self) -> dict:
        return asdict(self)


def build_dataset(
    rows: list[dict],
    tokenizer,
    fmt: FormatSpec,
    base_model_hash: str,
    datasets_dir: Path,
    duplicates_dropped: int = 0,
) -> DatasetSummary:
    """Format, tokenize and split `rows` into `<datasets_dir>/<version>/`, or reuse that version."""
    chat_template = tokenizer.chat_template or ""
    version = dataset_version([r["example_hash"] for r in rows], base_model_hash, chat_template, fmt)
    target = Path(datasets_dir) / version
    if (target / "summary.json").is_file():
        summary = json.loads((target / "summary.json").read_text())
        return DatasetSummary(**{**summary, "reused": True})

    started = time.perf_counter()
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    too_long = 0
    for start in range(0, len(rows), TOKENIZE_BATCH):
        chunk = rows[start : start + TOKENIZE_BATCH]
        conversations = {
            i: with_system_prompt(json.loads(row["messages"]), fmt.system_prompt)
            for i, row in enumerate(chunk)
            if row["messages"] is not None
        }
        tokenized = dict(
            zip(
                conversations,
                tokenize_conversations(
                    tokenizer, list(conversations.values()), fmt.train_turns, fmt.train_on_inputs
                ),
                strict=True,
            )
        )
        for i, row in enumerate(chunk):
            example = tokenized[i] if i in tokenized else tokenize_completion(tokenizer, row["text"])
            if len(example.input_ids) > fmt.max_seq_len:
                too_long += 1
                continue
            split = "eval" if is_eval(row["example_hash"], fmt.eval_fraction) else "train"
            messages = conversations.get(i)
            records[split].append(
                {
                    "example_hash": row["example_hash"],
                    "source_file": row["source_file"],
                    "record_index": row["record_index"],
                    "sub_index": row["sub_index"],
                    "messages": json.dumps(messages, ensure_ascii=False) if messages is not None else None,
                    "text": row["text"],
                    "input_ids": example.input_ids,
                    "labels": example.labels,
                    "num_tokens": len(example.input_ids),
                    "trainable_tokens": example.trainable_tokens,
                }
            )
        done = start + len(chunk)
        log.info("tokenized %d/%d examples (%.0f/s)", done, len(rows), done / (time.perf_counter() - started))

    lengths = [r["num_tokens"] for split in SPLITS for r in records[split]]
    train = records["train"]
    summary = DatasetSummary(
        version=version,
        path=str(target),
        train_examples=len(train),
        eval_examples=len(records["eval"]),
        dropped_too_long=too_long,
        duplicates_dropped=duplicates_dropped,
        train_tokens=sum(r["num_tokens"] for r in train),
        trainable_tokens=sum(r["trainable_tokens"] for r in train),
        max_tokens=max(lengths, default=0),
        mean_tokens=round(sum(lengths) / len(lengths), 1) if lengths else 0.0,
        reused=False,
    )
    with atomic_dir(target) as tmp:
        for split in SPLITS:
            pq.write_table(_to_table(records[split]), tmp / f"{split}.parquet")
        (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        write_json_atomic(tmp / "summary.json", {**summary.to_json(), "path": str(target)})
    log.info(
        "dataset %s: %d train / %d eval examples, %d tokens in %.1fs",
        version,
        summary.train_examples,
        summary.eval_examples,
        summary.train_tokens,
        time.perf_counter() - started,
    )
    return summary


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
    ]
)


def _to_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=_SCHEMA)


def load_split(dataset_dir: Path, split: str) -> list[dict]:
    """One split of a stored dataset as a list of dicts (messages parsed back into lists)."""
    rows = pq.read_table(Path(dataset_dir) / f"{split}.parquet").to_pylist()
    for row in rows:
        row["messages"] = json.loads(row["messages"]) if row["messages"] is not None else None
    return rows


def sample_view(tokenizer, row: dict) -> str:
    """The rendered text of one example with trained spans marked [[like this]], for reading."""
    pieces, current = [], None
    for token_id, label in zip(row["input_ids"], row["labels"], strict=True):
        trained = label != -100
        if trained != current:
            pieces.append("[[" if trained else ("]]" if current else ""))
            current = trained
        pieces.append(tokenizer.decode([token_id]))
    if current:
        pieces.append("]]")
    return "".join(pieces)
