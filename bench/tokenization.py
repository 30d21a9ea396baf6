"""Benchmark: formatting and tokenizing chat examples with loss masks, and packing efficiency.

    python bench/tokenization.py [--examples N] [--max-seq-len L] [--store DIR]
    python bench/tokenization.py --quick     # 2,000 examples, a few seconds (the test suite runs it)

Formats N demo triage examples (default 100,000) with SmolLM2's chat template, tokenizes them with
loss masks from character offsets (the code the training_dataset asset runs), and packs them into
rows of `max_seq_len`. Prints tokens/s for formatting plus tokenizing, and the share of row tokens
that are real tokens without packing (one example per row, padded to the longest in its batch of 8)
and with packing. The last line reads `tokenize: <N> tokens/s, packing efficiency <E>%`.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path: put the project root there instead,
# so that no file in bench/ can hide a module of the same name from the libraries imported below.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from loraflow.base_model import load_tokenizer, resolve_base_model  # noqa: E402
from loraflow.demo_data import generate_examples  # noqa: E402
from loraflow.formatting import tokenize_conversations, with_system_prompt  # noqa: E402
from loraflow.packing import pack_examples, packing_efficiency  # noqa: E402
from loraflow.spec import BaseModelSpec  # noqa: E402

SYSTEM_PROMPT = "You triage customer messages."
BATCH = 8
QUICK_EXAMPLES = 2_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument(
        "--store",
        default=os.environ.get("LORAFLOW_HOME", ".loraflow"),
        help="where the built-in model is (or gets) converted",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_EXAMPLES:,} examples: the same path in seconds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.examples = QUICK_EXAMPLES
    if args.examples < 1 or args.max_seq_len < 1:
        parser.error("--examples and --max-seq-len must be positive")

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    model = resolve_base_model(BaseModelSpec(), Path(args.store))
    tokenizer = load_tokenizer(model.path)
    examples = generate_examples(args.examples, seed=0)
    conversations = [
        with_system_prompt(
            [
                {"role": "user", "content": f"{e['instruction']}\n\n{e['input']}"},
                {"role": "assistant", "content": e["output"]},
            ],
            SYSTEM_PROMPT,
        )
        for e in examples
    ]

    started = time.perf_counter()
    tokenized = []
    for start in range(0, len(conversations), 1000):  # as the training_dataset asset does
        tokenized += tokenize_conversations(tokenizer, conversations[start : start + 1000])
    seconds = time.perf_counter() - started
    tokens = sum(len(t.input_ids) for t in tokenized)
    trained = sum(t.trainable_tokens for t in tokenized)
    rate = tokens / seconds
    print(f"examples: {len(tokenized):,}, tokens: {tokens:,} ({trained:,} trained, {trained / tokens:.1%})")
    print(
        f"format + tokenize with loss masks: {seconds:.1f} s, {rate:,.0f} tokens/s, "
        f"{len(tokenized) / seconds:,.0f} examples/s"
    )

    rows = [{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized]
    started = time.perf_counter()
    packed = pack_examples(rows, args.max_seq_len)
    pack_seconds = time.perf_counter() - started
    efficiency = packing_efficiency(packed, args.max_seq_len)
    padded = sum(
        BATCH * max(len(r["input_ids"]) for r in rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)
    )
    print(f"unpacked (batches of {BATCH}, padded to the longest): {tokens / padded:.1%} real tokens")
    print(
        f"packed into {len(packed):,} rows of {args.max_seq_len} in {pack_seconds:.1f} s: "
        f"{efficiency:.1%} real tokens"
    )
    print(f"tokenize: {rate:.0f} tokens/s, packing efficiency {100 * efficiency:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
