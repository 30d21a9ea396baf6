"""Seeded generator of demo training data for a customer-feedback triage fine-tune.

Every example is an alpaca-style record ``{"instruction", "input", "output"}``:

* ``instruction`` is always :data:`INSTRUCTION`;
* ``input`` is a short, made-up customer message (one to three sentences);
* ``output`` is a single line of the form
  ``sentiment: <label> | topic: <label> | summary: <a few lowercase words>``.

The labels are drawn first and the message is then composed to express them,
from templates and slot fillers shared with the summary, so the target always
describes the message. Everything is driven by ``random.Random(seed)``: the same
seed always gives the same records and byte-identical files.

The texts themselves (products and their issue and praise phrases, slot fillers,
greetings, closers, misspellings and the message and summary templates) live in
``loraflow/data/demo_templates.yaml``, shipped inside the package and read with
:mod:`importlib.resources` on first use. They are data to read and edit, not code,
so they are kept out of this module, which holds only the logic that combines them.
Editing the file changes the generated data. A missing or malformed file raises
:class:`DemoTemplatesError`, naming the file and, for a malformed one, the key path
of the problem.

:func:`write_demo_data` also plants a handful of deliberately broken JSONL lines
(see :func:`broken_records`) in the last file, so that a validation step has
something to reject.

Command line::

    python -m loraflow.demo_data OUT_DIR [--n N] [--seed S] [--files F] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.resources
import json
import os
import pathlib
import random
import string
import tempfile
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from typing import Any

import yaml

__all__ = [
    "INSTRUCTION",
    "OUTPUT_PATTERN",
    "DemoTemplatesError",
    "SENTIMENTS",
    "TOPICS",
    "broken_records",
    "generate_examples",
    "main",
    "write_demo_data",
]

INSTRUCTION: str = "Triage this customer message: give its sentiment, topic and a short summary."

OUTPUT_PATTERN: str = (
    r"sentiment: (positive|negative|neutral|mixed) \| "
    r"topic: (delivery|billing|product quality|customer service|account|returns) \| "
    r"summary: [^|\n]+"
)

SENTIMENTS: tuple[str, ...] = ("negative", "positive", "neutral", "mixed")
_SENTIMENT_WEIGHTS: tuple[int, ...] = (40, 30, 15, 15)

TOPICS: tuple[str, ...] = (
    "delivery",
    "billing",
    "product quality",
    "customer service",
    "account",
    "returns",
)

_MIN_WORDS = 15
_MAX_WORDS = 60

# ---------------------------------------------------------------------------
# The template file
# ---------------------------------------------------------------------------

# A regular package: `loraflow` itself is a namespace package, which importlib.resources on
# Python 3.11 cannot read from in an editable install.
_TEMPLATE_PACKAGE = "loraflow.data"
_TEMPLATE_FILE = "demo_templates.yaml"

# The shape the template file must have: `str` a non-empty text, `bool` true or false, `[x]` a
# non-empty list of x, a mapping with exactly these keys, and `{str: x}` any text keys with x values.
_PAIR = {"message": str, "summary": str}
_FILLERS = (  # the slots filled with one entry of a list, each list under its slot's name
    "wait",
    "short_wait",
    "used",
    "short_time",
    "times",
    "weekday",
    "month",
    "agent",
    "Courier",
    "Driver",
    "left_at",
    "region",
    "error_code",
)
_SCHEMA: dict[str, Any] = {
    "products": [{"name": str, "plural": bool, "issues": [_PAIR], "praise": [_PAIR]}],
    "fillers": dict.fromkeys(_FILLERS, [str]),
    "code_words": [str],
    "currencies": [str],
    "keep_capitalised": [str],
    "greetings": [str],
    "closers": dict.fromkeys(SENTIMENTS, [str]),
    "misspellings": {str: str},
    "templates": dict.fromkeys(TOPICS, dict.fromkeys(SENTIMENTS, [_PAIR])),
}


class DemoTemplatesError(RuntimeError):
    """The demo template file is missing, unreadable, not valid YAML or not of the expected shape."""


class _Malformed(Exception):
    """A problem at one key path of the template file (the caller adds the file name)."""


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML loading (with libyaml where PyYAML has it) that rejects a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            keys.append(key)
        return super().construct_mapping(node, deep=deep)


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check(value: object, schema: Any, where: str) -> None:
    """Raise :class:`_Malformed` at the first place where ``value`` does not fit ``schema``."""
    at = where or "the top level"
    if schema is str or schema is bool:
        if not isinstance(value, schema) or (isinstance(value, str) and not value.strip()):
            expected = "a non-empty text" if schema is str else "true or false"
            raise _Malformed(f"{at}: expected {expected}, got {_brief(value)}")
    elif isinstance(schema, list):
        if not isinstance(value, list) or not value:
            raise _Malformed(f"{at}: expected a non-empty list, got {_brief(value)}")
        for i, item in enumerate(value):
            _check(item, schema[0], f"{where}[{i}]")
    else:
        if not isinstance(value, dict) or not value:
            raise _Malformed(f"{at}: expected a mapping, got {_brief(value)}")
        if str not in schema:
            missing = [key for key in schema if key not in value]
            unknown = [key for key in value if key not in schema]
            if missing or unknown:
                what = f"missing key {missing[0]!r}" if missing else f"unknown key {unknown[0]!r}"
                raise _Malformed(f"{at}: {what} (the keys here are {', '.join(schema)})")
        for key, item in value.items():
            _check(key, str, f"{at} (a key)")
            _check(item, schema[str] if str in schema else schema[key], f"{where}.{key}" if where else key)


def _check_slots(texts: dict[str, Any]) -> None:
    """Every ``{slot}`` of every template must be one that :func:`_slots` fills."""
    known = set(_slots(random.Random(0), texts))
    for topic, by_sentiment in texts["templates"].items():
        for sentiment, templates in by_sentiment.items():
            for i, template in enumerate(templates):
                for part, text in template.items():
                    where = f"templates.{topic}.{sentiment}[{i}].{part}"
                    try:
                        names = {field[1] for field in string.Formatter().parse(text) if field[1] is not None}
                    except ValueError as err:
                        raise _Malformed(f"{where}: not a valid template ({err})") from None
                    if names - known:
                        unknown = ", ".join(f"{{{name}}}" for name in sorted(names - known))
                        raise _Malformed(f"{where}: unknown slot {unknown} in {text!r}")


def _read_texts(resource: Traversable) -> dict[str, Any]:
    """Read and check the template file at ``resource``; :class:`DemoTemplatesError` names it."""
    try:
        raw = yaml.load(resource.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise DemoTemplatesError(
            f"{resource}: cannot read the demo template file, which ships inside the loraflow package: {reason}"
        ) from err
    except yaml.YAMLError as err:
        raise DemoTemplatesError(f"{resource}: the demo template file is not valid YAML: {err}") from err
    try:
        _check(raw, _SCHEMA, "")
        _check_slots(raw)
    except _Malformed as err:
        raise DemoTemplatesError(f"{resource}: malformed demo template file: {err}") from None
    return raw


@functools.cache
def _demo_texts() -> dict[str, Any]:
    """The packaged template file, read and checked on first use."""
    return _read_texts(importlib.resources.files(_TEMPLATE_PACKAGE) / _TEMPLATE_FILE)


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def _money(rng: random.Random, currency: str, low: int, high: int) -> str:
    pence = rng.choice(("99", "49", "00", "95", "50"))
    return f"{currency}{rng.randint(low, high)}.{pence}"


def _order_ref(rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 0:
        return f"order #{rng.randint(10000, 999999)}"
    if style == 1:
        return f"order ORD-{rng.randint(100000, 999999)}"
    if style == 2:
        return f"order number {rng.randint(1000000, 9999999)}"
    letter = rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ")
    return f"order {letter}{rng.randint(1000, 99999)}"


def _slots(rng: random.Random, texts: dict[str, Any]) -> dict[str, str]:
    """Draw one value for every template slot."""
    fill = texts["fillers"]
    product = rng.choice(texts["products"])
    plural = product["plural"]
    issue = rng.choice(product["issues"])
    praise = rng.choice(product["praise"])
    currency = rng.choice(texts["currencies"])
    amount = _money(rng, currency, 8, 180)
    amount2 = amount
    while amount2 == amount:
        amount2 = _money(rng, currency, 8, 180)
    return {
        "product": product["name"],
        "issue": issue["message"],
        "issue_s": issue["summary"],
        "praise": praise["message"],
        "praise_s": praise["summary"],
        "It": "They" if plural else "It",
        "it": "they" if plural else "it",
        "Is": "Are" if plural else "Is",
        "Does": "Do" if plural else "Does",
        "order": _order_ref(rng),
        "wait": rng.choice(fill["wait"]),
        "short_wait": rng.choice(fill["short_wait"]),
        "used": rng.choice(fill["used"]),
        "late_days": str(rng.randint(2, 12)),
        "minutes": str(rng.randint(20, 95)),
        "late_minutes": str(rng.randint(3, 15)),
        "short_time": rng.choice(fill["short_time"]),
        "times": rng.choice(fill["times"]),
        "weekday": rng.choice(fill["weekday"]),
        "month": rng.choice(fill["month"]),
        "year": str(rng.randint(2023, 2026)),
        "agent": rng.choice(fill["agent"]),
        "Courier": rng.choice(fill["Courier"]),
        "Driver": rng.choice(fill["Driver"]),
        "left_at": rng.choice(fill["left_at"]),
        "region": rng.choice(fill["region"]),
        "code": f"{rng.choice(texts['code_words'])}{rng.choice((5, 10, 15, 20, 25))}",
        "error_code": rng.choice(fill["error_code"]),
        "return_days": str(rng.choice((14, 28, 30, 60))),
        "amount": amount,
        "amount2": amount2,
        "diff": _money(rng, currency, 2, 30),
    }


def _word_count(text: str) -> int:
    return len(text.split())


def _keeps_capital(word: str, texts: dict[str, Any]) -> bool:
    """True when a sentence-initial word should stay capitalised after a greeting."""
    if word == "I" or word.startswith("I'"):
        return True
    bare = word.rstrip(",.!?:;")
    return bare in texts["fillers"]["agent"] or bare in texts["keep_capitalised"]


def _join_greeting(greeting: str, body: str, texts: dict[str, Any]) -> str:
    first = body.split(" ", 1)[0]
    if not _keeps_capital(first, texts):
        body = body[:1].lower() + body[1:]
    return f"{greeting} {body}"


def _add_typo(rng: random.Random, text: str, misspellings: dict[str, str]) -> str:
    present = [pair for pair in misspellings.items() if pair[0] in text]
    if present and rng.random() < 0.5:
        right, wrong = rng.choice(present)
        return text.replace(right, wrong, 1)
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 6 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word = words[i]
    j = rng.randint(1, len(word) - 3)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def _add_noise(rng: random.Random, text: str, sentiment: str, texts: dict[str, Any]) -> str:
    """Occasional human touches: typos, emphatic punctuation, all-lowercase typing."""
    if rng.random() < 0.07:
        text = _add_typo(rng, text, texts["misspellings"])
    if sentiment in ("negative", "positive") and text.endswith(".") and rng.random() < 0.18:
        text = text[:-1] + rng.choice(("!", "!", "!!", "!!!"))
    elif text.endswith(".") and rng.random() < 0.04:
        text = text[:-1]
    if rng.random() < 0.07:
        text = text.lower()
    return text


def _clean_summary(summary: str) -> str:
    summary = " ".join(summary.lower().replace("|", "/").split())
    return summary.rstrip(" .")


def _compose(rng: random.Random, topic: str, sentiment: str, texts: dict[str, Any]) -> tuple[str, str]:
    """Compose a message expressing ``topic`` and ``sentiment``, plus its summary."""
    templates = texts["templates"][topic][sentiment]
    greetings = texts["greetings"]
    closers = texts["closers"][sentiment]
    message = summary = ""
    for _ in range(64):
        ctx = _slots(rng, texts)
        template = rng.choice(templates)
        body = template["message"].format(**ctx)
        summary = template["summary"].format(**ctx)
        greeting = rng.choice(greetings) if rng.random() < 0.45 else ""
        closer = rng.choice(closers) if rng.random() < 0.55 else ""
        if _word_count(body) + _word_count(greeting) + _word_count(closer) < _MIN_WORDS:
            greeting = greeting or rng.choice(greetings)
            closer = closer or rng.choice(closers)
        message = _join_greeting(greeting, body, texts) if greeting else body
        if closer:
            message = f"{message} {closer}"
        if _MIN_WORDS <= _word_count(message) <= _MAX_WORDS:
            break
    return _add_noise(rng, message, sentiment, texts), _clean_summary(summary)


def _format_output(sentiment: str, topic: str, summary: str) -> str:
    return f"sentiment: {sentiment} | topic: {topic} | summary: {summary}"


def _make_example(rng: random.Random, texts: dict[str, Any]) -> dict[str, str]:
    sentiment = rng.choices(SENTIMENTS, weights=_SENTIMENT_WEIGHTS)[0]
    topic = rng.choice(TOPICS)
    message, summary = _compose(rng, topic, sentiment, texts)
    return {
        "instruction": INSTRUCTION,
        "input": message,
        "output": _format_output(sentiment, topic, summary),
    }


def generate_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Return ``n`` valid triage examples, deterministic for ``seed``.

    Labels are drawn first (sentiment roughly 40% negative, 30% positive, 15% neutral,
    15% mixed; topics uniform), then a message and summary are composed to match them.
    Inputs are distinct within one call (a repeated message is drawn again), so the
    only exact duplicates in the demo files are the ones planted by
    :func:`broken_records`. Examples are generated one after another from
    ``random.Random(seed)``, so the first ``k`` examples are the same for any ``n >= k``.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    texts = _demo_texts()
    rng = random.Random(seed)
    examples: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts_left = 50 * n + 1000
    while len(examples) < n:
        if attempts_left == 0:
            raise RuntimeError(f"could not compose {n} distinct examples")
        attempts_left -= 1
        example = _make_example(rng, texts)
        if example["input"] in seen:
            continue
        seen.add(example["input"])
        examples.append(example)
    return examples


def _dumps(record: object) -> str:
    return json.dumps(record, ensure_ascii=False)


def broken_records(seed: int = 0) -> list[str]:
    """Return eight deliberately broken JSONL lines (strings without newlines).

    In order: an empty ``output``; an ``input`` of only whitespace; an oversize
    ``input`` (one message pasted until it exceeds 4,000 characters); a record missing
    the ``output`` key; a record whose ``output`` is a number; a truncated, malformed
    JSON object; a record whose ``output`` ignores the required format; and an exact
    duplicate of the first record ``generate_examples(n, seed)`` yields for any ``n >= 1``.
    """
    texts = _demo_texts()
    rng = random.Random(f"loraflow-demo-broken-{seed}")
    pool = [_make_example(rng, texts) for _ in range(6)]

    empty_output = dict(pool[0], output="")
    blank_input = dict(pool[1], input=rng.choice(("   ", " \t  ", "\t\t", "    \t ")))
    message = pool[2]["input"]
    copies = 4000 // (len(message) + 1) + 2
    oversize = dict(pool[2], input=" ".join([message] * copies))
    missing_output = {"instruction": INSTRUCTION, "input": pool[3]["input"]}
    numeric_output = dict(pool[4], output=rng.choice((0, 1, 3, 42)))
    full_line = _dumps(pool[5])
    truncated = full_line[: len(full_line) * 2 // 3]
    sentiment = pool[0]["output"].split(" | ", 1)[0].split(": ", 1)[1]
    off_format = dict(pool[1], output=f"{sentiment.capitalize()} - see message above")
    duplicate = generate_examples(1, seed)[0]

    lines = [
        _dumps(empty_output),
        _dumps(blank_input),
        _dumps(oversize),
        _dumps(missing_output),
        _dumps(numeric_output),
        truncated,
        _dumps(off_format),
        _dumps(duplicate),
    ]
    return [line.replace("\n", " ") for line in lines]


def _file_names(files: int) -> list[str]:
    if files == 2:
        return ["feedback-2026-10.jsonl", "feedback-2026-11.jsonl"]
    return [f"feedback-part-{i:02d}.jsonl" for i in range(1, files + 1)]


def _plan(n: int, seed: int, files: int) -> list[tuple[str, list[str], int, int]]:
    """Lay out the files: (name, lines, valid count, broken count) for each."""
    if files < 1:
        raise ValueError(f"files must be at least 1, got {files}")
    valid = [_dumps(record) for record in generate_examples(n, seed)]
    base, extra = divmod(n, files)
    plan: list[tuple[str, list[str], int, int]] = []
    start = 0
    for index, name in enumerate(_file_names(files)):
        size = base + (1 if index < extra else 0)
        plan.append((name, valid[start : start + size], size, 0))
        start += size

    broken = broken_records(seed)
    name, lines, size, _ = plan[-1]
    mixed: list[str] = []
    slots = len(broken) + 1
    # Spread the broken lines evenly through the valid ones, at fixed positions.
    cuts = [round(size * (k + 1) / slots) for k in range(len(broken))]
    previous = 0
    for k, bad in enumerate(broken):
        mixed.extend(lines[previous : cuts[k]])
        mixed.append(bad)
        previous = cuts[k]
    mixed.extend(lines[previous:])
    plan[-1] = (name, mixed, size, len(broken))
    return plan


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _write_plan(
    out_dir: str | pathlib.Path, n: int, seed: int, files: int
) -> list[tuple[pathlib.Path, int, int]]:
    folder = pathlib.Path(out_dir)
    plan = _plan(n, seed, files)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[tuple[pathlib.Path, int, int]] = []
    for name, lines, valid_count, broken_count in plan:
        path = folder / name
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        _atomic_write(path, data)
        written.append((path, valid_count, broken_count))
    return written


def write_demo_data(
    out_dir: str | pathlib.Path, n: int = 2400, seed: int = 0, files: int = 2
) -> list[pathlib.Path]:
    """Write ``n`` valid examples split across ``files`` JSONL files in ``out_dir``.

    With ``files=2`` the files are ``feedback-2026-10.jsonl`` and
    ``feedback-2026-11.jsonl``; otherwise ``feedback-part-01.jsonl`` and so on. The
    valid records are split as evenly as possible in generation order, and the lines
    from :func:`broken_records` are interleaved at fixed, evenly spaced positions in the
    last file only. Each file is UTF-8, one JSON object per line, written atomically
    (temporary file in the same folder, then ``os.replace``). The same arguments always
    produce byte-identical files. Returns the paths written, in order.
    """
    return [path for path, _, _ in _write_plan(out_dir, n, seed, files)]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: write the demo files unless they already exist."""
    parser = argparse.ArgumentParser(
        prog="python -m loraflow.demo_data",
        description="Write seeded demo JSONL data for the customer-feedback triage fine-tune.",
    )
    parser.add_argument("out_dir", type=pathlib.Path, help="folder to write the JSONL files into")
    parser.add_argument("--n", type=int, default=2400, help="number of valid examples (default 2400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--files", type=int, default=2, help="number of files (default 2)")
    parser.add_argument("--force", action="store_true", help="overwrite files that already exist")
    args = parser.parse_args(argv)
    if args.n < 0:
        parser.error("--n must be non-negative")
    if args.files < 1:
        parser.error("--files must be at least 1")

    targets = [args.out_dir / name for name in _file_names(args.files)]
    existing = [path for path in targets if path.exists()]
    if existing and not args.force:
        for path in existing:
            print(f"{path} already exists; leaving it (use --force to overwrite)")
        return 0

    for path, valid_count, broken_count in _write_plan(args.out_dir, args.n, args.seed, args.files):
        total = valid_count + broken_count
        print(f"{path}: {total} records ({valid_count} valid, {broken_count} broken)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
