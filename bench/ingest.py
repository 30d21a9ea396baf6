"""Benchmark: raw ingestion plus validation of one large alpaca JSON Lines file.

    python bench/ingest.py [--rows N [N ...]] [--seed S] [--memory-limit 2GiB] [--pandas auto|on|off] [--keep DIR]
    python bench/ingest.py --rows 1000000 10000000   # 1M then 10M rows, each in its own process
    python bench/ingest.py --quick     # 20,000 rows, a few seconds (the test suite runs it)

Writes N synthetic alpaca rows (deterministic for a seed) to one .jsonl file, 5% of them bad in eight
planted ways, then times `ingest_file` and `validate_partition` on it in this process, on a DuckDB
file opened with the warehouse's memory limit (loraflow.lake.MEMORY_LIMIT, 2 GiB; beyond it DuckDB
spills to `<file>.tmp`), checks the counts (raw == valid + quarantined == N, and the quarantine
reasons against what was planted), and, for comparison, times `pandas.read_json(lines=True)` on a
copy of the file without the malformed lines (pandas refuses a file with a broken line). pandas holds
the whole file in memory, about 3 GiB per million rows, so by default it runs only up to 2,000,000
rows. Several sizes run one after another, each in its own process so that each peak is its own, and
end with a table of seconds, rows/s and peak MiB per size: how the cost grows.

Targets from the issue, reported and not asserted: at least 50,000 rows/s for ingest plus
validation on a 2-core machine, peak memory under 4 GiB, at 1M and at 10M rows.

Measured on this project's 2-core machine (x86_64, no GPU, 2026-12-01, load average 0.6 at the
start), `--rows 1000000 10000000`:

    1,000,000 rows (464 MiB):   17.5 s, 57,235 rows/s (ingest 183,261, validate 83,229), peak 2,274 MiB
    10,000,000 rows (4.5 GiB): 216.4 s, 46,217 rows/s (ingest 131,686, validate 71,210), peak 2,589 MiB

Ten times the rows take 12.4 times as long: beyond the memory limit DuckDB spills its temporary
tables (the file's lines while ingesting, the classified rows while validating) to disk and reads
them back. The peak grows by 315 MiB, not tenfold.

The last line of the output is always:
    ingest+validate: <rows/s> rows/s, peak <MiB> MiB, pandas read: <rows/s> rows/s (or: not run)
Exit status 1 when the count invariant fails (raw != valid + quarantined, or raw != N).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pandas as pd
import psutil

from loraflow.ingest import ingest_file
from loraflow.lake import MEMORY_LIMIT
from loraflow.spec import QualitySpec, SourceSpec
from loraflow.validate import partition_counts, validate_partition

PIPELINE = "bench"
PARTITION = "bench.jsonl"
BAD_FRACTION = 0.05
TARGET_ROWS_PER_S = 50_000
TARGET_PEAK_MIB = 4 * 1024
# Pool sizes are distinct primes: row i takes instruction i mod P1 and output i mod P2 (through fixed
# permutations), so by the Chinese remainder theorem no two rows below P1 * P2 share both, and the
# valid rows are all different examples without a visible row number in the text.
INSTRUCTION_POOL = 4999
OUTPUT_POOL = 20011
INPUT_POOL = 7001
CHUNK_ROWS = 20_000
QUICK_ROWS = 20_000
PANDAS_MAX_ROWS = 2_000_000

# planted kind -> the quarantine reason it should get
KINDS: dict[str, str] = {
    "truncated line (malformed JSON)": "malformed_json",
    'missing "output"': "missing_field",
    "number as output": "wrong_type",
    "empty output": "empty_response",
    "oversize input (> 4000 chars)": "prompt_too_long",
    "\\u0001 in the input": "control_characters",
    "email address in the input": "pii",
    "exact duplicate of an earlier line": "duplicate",
}
MALFORMED, MISSING, WRONG_TYPE, EMPTY, OVERSIZE, CONTROL, EMAIL, DUPLICATE = KINDS

# ---------------------------------------------------------------------------------------------
# synthetic text (ASCII letters and punctuation plus a few accented words: no digits, so that the
# phone and API-key patterns cannot fire by accident, and no '@')


def _items(text: str) -> list[str]:
    """A word list written as one string, the items separated by '|'."""
    return text.split("|")


TOPICS = _items(
    "solar panels|a sourdough starter|unit tests|the water cycle|compound interest|"
    "public libraries|remote work|bicycle maintenance|a vegetable garden|password managers|"
    "the French Revolution|photosynthesis|container shipping|jazz improvisation|sleep hygiene|"
    "electric cars|the immune system|version control|urban beekeeping|a café menu|"
    "volcanic eruptions|the stock market|machine translation|habit tracking|coral reefs|"
    "medieval castles|open source licenses|a job interview|the Roman road network|wind turbines|"
    "a first marathon|tide pools|climate adaptation|database indexes|a naïve Bayes classifier|"
    "composting at home|board game design|the printing press|migratory birds|noise cancelling|"
    "a tenant agreement|houseplants in winter|caching in web apps|river deltas|public speaking"
)
AUDIENCES = _items(
    "a ten year old|a busy manager|a new employee|a retired teacher|a first year student|"
    "a small business owner|a nervous beginner|an experienced engineer|a museum visitor|"
    "a hiking club|a school newsletter|a local council|a podcast audience"
)
INSTRUCTION_TEMPLATES = _items(
    "Explain {t} to {a}.|Write a short paragraph about {t} for {a}.|"
    "Summarize the main idea of {t} in two sentences.|Give three practical tips about {t}.|"
    "What are the most common mistakes people make with {t}?|"
    "Compare {t} with {u} and say which matters more for {a}.|"
    "Draft a friendly email to {a} that introduces {t}.|List the pros and cons of {t}.|"
    "Describe how {t} has changed over the last century.|"
    "Rewrite the text below so that {a} can follow it.|"
    "Classify the sentiment of the following review about {t}.|"
    "Suggest a title for an article on {t} aimed at {a}.|"
    "Answer the question using the context, and keep it brief.|"
    "Why does {t} matter, and how is it related to {u}?|"
    "Create a quiz question about {t} with its answer."
)
SUBJECTS = _items(
    "The committee|My neighbour|Our team|The report|A recent study|The teacher|This product|"
    "The city council|Most visitors|The old manual|Her grandfather|The new intern|The review|"
    "Our customers|The guidebook"
)
VERBS = _items(
    "argues that|found that|believes that|noticed that|claims that|explained that|wrote that|"
    "suggested that|reported that|is worried that"
)
CLAIMS = _items(
    "{t} is easier than it looks|{t} saves a lot of time|nobody really understands {t}|"
    "{t} deserves more attention|{t} was overrated for years|{t} changed how we work|"
    "{t} needs careful planning|{t} is surprisingly cheap|the risks of {t} are small|"
    "{t} works best in small steps|{t} and {u} are closely linked"
)
OPENERS = _items(
    "In short,|Put simply,|First of all,|The key point is that|It helps to remember that|"
    "A good rule of thumb is that|Many people find that|Experts generally agree that|"
    "One useful way to see it is that|Above all,"
)
FACTS = _items(
    "{t} depends on steady habits rather than big efforts|"
    "{t} is best understood through a simple example|{t} rewards patience and regular checks|"
    "the basics of {t} can be learned in an afternoon|"
    "{t} goes wrong mostly when the early steps are skipped|"
    "{t} has more in common with {u} than it seems|small changes to {t} add up over a season|"
    "{t} should be explained without jargon|the history of {t} explains a lot about its quirks|"
    "{t} is easier to judge after trying it once|a checklist makes {t} far less stressful|"
    "the cost of {t} is mostly time, not money"
)
CLOSERS = _items(
    "Start small and adjust as you go.|That is the whole trick.|Keep notes so you can compare.|"
    "Ask for feedback early.|Do not rush the first step.|It is worth the effort.|"
    "Try it and see what works for you.|Revisit the plan after a month."
)
FIRST_NAMES = _items("jane|omar|li|maria|tom|aisha|pieter|sofia|kenji|nadia")
LAST_NAMES = _items("doe|haddad|wei|garcia|baker|okafor|jansen|rossi|sato|novak")
DOMAINS = _items("example.com|mail.example.org|company.example.net|uni.example.edu")


def _fit(text: str, rng: random.Random, pad: list[str]) -> str:
    """Text of 30 to 300 characters: padded with sentences from `pad`, cut at a word boundary."""
    while len(text) < 30:
        text = f"{text} {rng.choice(pad)}"
    if len(text) > 300:
        text = text[:300].rsplit(" ", 1)[0].rstrip(",;:") + "."
    return text


def _pool(size: int, make, rng: random.Random) -> list[str]:
    """`size` distinct texts from `make(rng)`, JSON-escaped (without the quotes) for a JSON string."""
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < size:
        attempts += 1
        if attempts > size * 50:
            raise RuntimeError(f"cannot make {size} distinct texts; widen the word lists")
        seen.setdefault(make(rng), None)
    return [json.dumps(text, ensure_ascii=False)[1:-1] for text in seen]


def _instruction(rng: random.Random) -> str:
    t, u = rng.sample(TOPICS, 2)
    text = rng.choice(INSTRUCTION_TEMPLATES).format(t=t, u=u, a=rng.choice(AUDIENCES))
    if rng.random() < 0.5:
        text += f" Mention {rng.choice(TOPICS)} if it helps, and keep the tone {rng.choice(['warm', 'plain', 'formal', 'light', 'direct'])}."
    return _fit(text, rng, CLOSERS)


def _claim(rng: random.Random) -> str:
    t, u = rng.sample(TOPICS, 2)
    claim = rng.choice(CLAIMS).format(t=t, u=u)
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {claim}."


def _input(rng: random.Random) -> str:
    return _fit(" ".join(_claim(rng) for _ in range(rng.randint(1, 3))), rng, CLOSERS)


def _output(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(1, 4)):
        t, u = rng.sample(TOPICS, 2)
        fact = rng.choice(FACTS).format(t=t, u=u)
        sentences.append(f"{rng.choice(OPENERS)} {fact}.")
    if rng.random() < 0.6:
        sentences.append(rng.choice(CLOSERS))
    text = " ".join(sentences)
    return _fit(text[0].upper() + text[1:], rng, CLOSERS)


def _line(instruction: str, input_: str, output: str) -> str:
    return f'{{"instruction": "{instruction}", "input": "{input_}", "output": "{output}"}}\n'


def generate(path: Path, pandas_path: Path | None, rows: int, seed: int) -> dict[str, int]:
    """Write the benchmark file and (unless `pandas_path` is None) its copy without malformed lines;
    returns rows planted per kind."""
    rng = random.Random(seed)
    instructions = _pool(INSTRUCTION_POOL, _instruction, rng)
    outputs = _pool(OUTPUT_POOL, _output, rng)
    inputs = _pool(INPUT_POOL, _input, rng)
    if rows > INSTRUCTION_POOL * OUTPUT_POOL:
        print(f"warning: more than {INSTRUCTION_POOL * OUTPUT_POOL} rows; some valid rows may repeat")

    # which rows are bad, and how: 5% of the rows, the kinds as even as the count allows
    bad_total = round(rows * BAD_FRACTION)
    kinds = list(KINDS)
    per_kind = {
        kind: bad_total // len(kinds) + (1 if n < bad_total % len(kinds) else 0)
        for n, kind in enumerate(kinds)
    }
    plan = [kind for kind in kinds for _ in range(per_kind[kind])]
    rng.shuffle(plan)
    # row 0 is never bad, so every duplicate has an earlier valid line to copy
    positions = sorted(rng.sample(range(1, rows), bad_total)) if bad_total else []
    bad = dict(zip(positions, plan, strict=True))
    copy_of: dict[int, int] = {}
    for position, kind in bad.items():
        if kind == DUPLICATE:
            source = rng.randrange(position)
            while source in bad:
                source = rng.randrange(position)
            copy_of[position] = source
    wanted = set(copy_of.values())
    originals: dict[int, str] = {}

    instruction_order = list(range(INSTRUCTION_POOL))
    output_order = list(range(OUTPUT_POOL))
    rng.shuffle(instruction_order)
    rng.shuffle(output_order)
    planted = dict.fromkeys(kinds, 0)
    with (
        open(path, "w", encoding="utf-8") as out,
        open(pandas_path or os.devnull, "w", encoding="utf-8") as pandas_out,
    ):
        chunk: list[str] = []
        pandas_chunk: list[str] = []
        for i in range(rows):
            instruction = instructions[instruction_order[i % INSTRUCTION_POOL]]
            output = outputs[output_order[i % OUTPUT_POOL]]
            input_ = "" if rng.random() < 0.35 else inputs[rng.randrange(INPUT_POOL)]
            kind = bad.get(i)
            if kind is None:
                line = _line(instruction, input_, output)
                if i in wanted:
                    originals[i] = line
            elif kind == MALFORMED:
                whole = _line(instruction, input_, output)
                line = whole[: rng.randint(10, len(whole) - 3)] + "\n"
            elif kind == MISSING:
                line = f'{{"instruction": "{instruction}", "input": "{input_}"}}\n'
            elif kind == WRONG_TYPE:
                number = rng.choice(
                    [rng.randint(0, 100_000), -rng.randint(1, 999), round(rng.uniform(0, 10), 3)]
                )
                line = f'{{"instruction": "{instruction}", "input": "{input_}", "output": {number}}}\n'
            elif kind == EMPTY:
                line = _line(instruction, input_, "")
            elif kind == OVERSIZE:
                parts, size = [], 0
                target = rng.randint(4100, 6000)
                while size < target:
                    part = inputs[rng.randrange(INPUT_POOL)]
                    parts.append(part)
                    size += len(part) + 1
                line = _line(instruction, " ".join(parts), output)
            elif kind == CONTROL:
                text = inputs[rng.randrange(INPUT_POOL)]
                cut = rng.randrange(len(text))
                line = _line(instruction, text[:cut] + "\\u0001" + text[cut:], output)
            elif kind == EMAIL:
                address = f"{rng.choice(FIRST_NAMES)}.{rng.choice(LAST_NAMES)}@{rng.choice(DOMAINS)}"
                text = f"{inputs[rng.randrange(INPUT_POOL)]} Please reply to {address} before Friday."
                line = _line(instruction, text, output)
            else:  # DUPLICATE
                line = originals[copy_of[i]]
            if kind is not None:
                planted[kind] += 1
            chunk.append(line)
            if kind != MALFORMED and pandas_path is not None:
                pandas_chunk.append(line)
            if len(chunk) >= CHUNK_ROWS:
                out.write("".join(chunk))
                pandas_out.write("".join(pandas_chunk))
                chunk.clear()
                pandas_chunk.clear()
        out.write("".join(chunk))
        pandas_out.write("".join(pandas_chunk))
    return planted


# ---------------------------------------------------------------------------------------------
# measuring


class PeakRss:
    """Samples this process's resident set size every 50 ms in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.start = 0
        self.peak = 0
        self.samples = 0
        self._since_mark = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        self._since_mark = max(self._since_mark, rss)
        self.samples += 1

    def mark(self) -> int:
        """The peak since the previous mark (or the start), sampling once more first."""
        self._sample()
        peak, self._since_mark = self._since_mark, 0
        return peak

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._sample()
        self.start = self.peak
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def rate(rows: int, seconds: float) -> float:
    return rows / max(seconds, 1e-9)


def time_pandas(pandas_path: Path, pandas_rows: int, malformed: int) -> float:
    """Time pandas.read_json(lines=True) on the copy without malformed lines; returns rows/s."""
    with PeakRss() as pandas_sampler:
        started = time.perf_counter()
        frame = pd.read_json(pandas_path, lines=True)
        pandas_s = time.perf_counter() - started
    if len(frame) != pandas_rows:
        print(f"warning: pandas read {len(frame):,} rows, expected {pandas_rows:,}")
    del frame
    pandas_rate = rate(pandas_rows, pandas_s)
    print(
        f"\npandas.read_json(lines=True): {pandas_rows:,} rows in {pandas_s:.2f} s = {pandas_rate:,.0f} rows/s; "
        f"process RSS {pandas_sampler.start / 2**20:,.0f} MiB before, peak {pandas_sampler.peak / 2**20:,.0f} MiB "
        "during the read (not in the peak above)"
    )
    print(
        f"  read from a copy without the {malformed:,} malformed lines (pandas fails on them); "
        "it only parses, it neither stores nor validates"
    )
    return pandas_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[1_000_000],
        help="rows in the file (default 1,000,000); several sizes run one after another, each in its "
        "own process, and end with a table of how the rate and the peak grow",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data (default 0)")
    parser.add_argument(
        "--memory-limit",
        default=MEMORY_LIMIT,
        help=f"DuckDB's memory limit, as the warehouse sets it (default {MEMORY_LIMIT})",
    )
    parser.add_argument(
        "--pandas",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"time pandas.read_json for comparison: auto runs it up to {PANDAS_MAX_ROWS:,} rows (pandas "
        "holds the whole file in memory: about 3 GiB per million rows)",
    )
    parser.add_argument(
        "--keep", type=Path, help="write the files and the DuckDB database here and keep them"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ROWS:,} rows: the same path and checks in seconds"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = [QUICK_ROWS]
    if min(args.rows) < 2:
        parser.error("--rows must be at least 2")
    if len(args.rows) > 1:
        return growth(args)

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print("loraflow ingest + validate benchmark")
    print(f"date:           {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine:        {platform.machine()} ({platform.system()} {platform.release()})")
    print(f"CPUs:           {cpus} (usable by this process: {usable})")
    if load is not None:
        print(
            f"load average:   {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other jobs make the rates pessimistic)"
        )
    print(f"memory:         {psutil.virtual_memory().total / 2**30:.1f} GiB total")
    disk = shutil.disk_usage(args.keep or tempfile.gettempdir())
    print(f"disk:           {disk.free / 2**30:.1f} GiB free where the files go")
    print(f"python:         {platform.python_version()}")
    print(f"duckdb:         {duckdb.__version__}")
    print(f"pandas:         {pd.__version__}")

    rows = args.rows[0]
    with_pandas = args.pandas == "on" or (args.pandas == "auto" and rows <= PANDAS_MAX_ROWS)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        folder, cleanup = args.keep.resolve(), None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="loraflow-bench-")
        folder = Path(cleanup.name)
    try:
        return run(folder, rows, args.seed, args.memory_limit, with_pandas)
    finally:
        if cleanup is not None:
            cleanup.cleanup()


def growth(args: argparse.Namespace) -> int:
    """Each size in its own process (so that each peak is its own), then how the figures grow."""
    results = []
    status = 0
    for rows in args.rows:
        command = [sys.executable, __file__, "--rows", str(rows), "--seed", str(args.seed)]
        command += ["--memory-limit", args.memory_limit, "--pandas", args.pandas]
        if args.keep is not None:
            command += ["--keep", str(args.keep / f"rows-{rows}")]
        print(f"$ {' '.join(command)}", flush=True)
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        last = ""
        for line in child.stdout:
            print(line, end="", flush=True)
            last = line.strip() or last
        status = max(status, child.wait())
        found = re.fullmatch(r"ingest\+validate: (\d+) rows/s, peak (\d+) MiB, .*", last)
        results.append((rows, *(map(int, found.groups()) if found else (None, None))))
        print()
    print(f"growth (DuckDB memory limit {args.memory_limit}; each size in its own process)")
    print(f"  {'rows':>12}{'seconds':>10}{'rows/s':>10}{'peak MiB':>10}")
    for rows, per_s, peak in results:
        if per_s is None:
            print(f"  {rows:>12,}  failed (see its output above)")
        else:
            print(f"  {rows:>12,}{rows / per_s:>10.1f}{per_s:>10,}{peak:>10,}")
    print(last)
    return status


def run(folder: Path, rows: int, seed: int, memory_limit: str, with_pandas: bool) -> int:
    path = folder / PARTITION
    pandas_path = folder / "bench-without-malformed.jsonl" if with_pandas else None
    database = folder / "warehouse.duckdb"
    for stale in (database, database.with_name(database.name + ".wal")):
        stale.unlink(missing_ok=True)

    print(f"\nfolder:         {folder}")
    print(f"rows:           {rows:,} (seed {seed}), {BAD_FRACTION:.0%} planted bad")
    started = time.perf_counter()
    planted = generate(path, pandas_path, rows, seed)
    generation = time.perf_counter() - started
    size = path.stat().st_size
    print(f"generated:      {size / 2**20:,.1f} MiB in {generation:.1f} s (not part of the measured rates)")

    source = SourceSpec(path="*", format="alpaca")
    quality = QualitySpec()
    con = duckdb.connect(str(database), config={"memory_limit": memory_limit})
    threads, memory_limit = con.execute(
        "SELECT current_setting('threads'), current_setting('memory_limit')"
    ).fetchone()
    print(f"duckdb:         threads {threads}, memory_limit {memory_limit}, database {database.name}")
    rss_before = maxrss_mib()

    with PeakRss() as sampler:
        cpu = cpu_seconds()
        started = time.perf_counter()
        ingested = ingest_file(con, PIPELINE, PARTITION, path, source)
        ingest_s = time.perf_counter() - started
        ingest_cpu, cpu = cpu_seconds() - cpu, cpu_seconds()
        ingest_peak = sampler.mark() / 2**20
        started = time.perf_counter()
        result = validate_partition(con, PIPELINE, PARTITION, source, quality)
        validate_s = time.perf_counter() - started
        validate_cpu = cpu_seconds() - cpu
        validate_peak = sampler.mark() / 2**20
    rss_after = maxrss_mib()
    sampled = sampler.peak / 2**20
    peak = max(rss_after, sampled)
    # ValidationResult.raw is valid + quarantined by construction; the stored tables are the real test
    stored_raw, stored_valid, stored_quarantined = partition_counts(con, PIPELINE, PARTITION)
    con.close()
    database_size = sum(p.stat().st_size for p in folder.glob("warehouse.duckdb*"))

    both_s = ingest_s + validate_s
    print("\nmeasured (rows = lines of the file)")
    print(f"  {'stage':<20}{'seconds':>9}{'rows/s':>12}{'CPU s':>9}{'cores busy':>12}{'RSS peak MiB':>14}")
    for name, seconds, cpu_s, rss in (
        ("ingest_file", ingest_s, ingest_cpu, ingest_peak),
        ("validate_partition", validate_s, validate_cpu, validate_peak),
        ("both", both_s, ingest_cpu + validate_cpu, max(ingest_peak, validate_peak)),
    ):
        busy = cpu_s / max(seconds, 1e-9)
        print(
            f"  {name:<20}{seconds:>9.2f}{rate(rows, seconds):>12,.0f}{cpu_s:>9.1f}{busy:>12.2f}{rss:>14,.0f}"
        )
    print(
        "  (cores busy = process CPU time / wall time; well under the CPU count means waiting on disk "
        "or on other jobs)"
    )
    print(
        f"  ingest: {ingested.file_type}, {ingested.records:,} records, {ingested.rows:,} rows, "
        f"{ingested.blank_lines} blank lines; database now {database_size / 2**20:,.1f} MiB"
    )
    print("memory")
    print(f"  ru_maxrss before the measured stages:    {rss_before:,.0f} MiB (imports, data generation)")
    print(f"  ru_maxrss after the measured stages:     {rss_after:,.0f} MiB (process peak so far)")
    print(
        f"  sampled RSS peak during the stages:      {sampled:,.0f} MiB ({sampler.samples} samples, every 50 ms)"
    )
    print(f"  peak reported (the higher of the two):   {peak:,.0f} MiB")

    # checks
    failures = []
    if result.raw != result.valid + result.quarantined:
        failures.append(f"raw {result.raw} != valid {result.valid} + quarantined {result.quarantined}")
    if result.raw != rows:
        failures.append(f"raw {result.raw} != rows written {rows}")
    if stored_raw != stored_valid + stored_quarantined or stored_raw != rows:
        failures.append(
            f"stored tables: raw {stored_raw}, validated {stored_valid} + quarantined {stored_quarantined}, "
            f"rows written {rows}"
        )
    expected: dict[str, int] = {}
    for kind, count in planted.items():
        expected[KINDS[kind]] = expected.get(KINDS[kind], 0) + count
    print(
        f"\nvalidation: schema {result.schema}, raw {result.raw:,}, valid {result.valid:,}, "
        f"quarantined {result.quarantined:,} ({result.invalid_fraction:.2%})"
    )
    print(f"  {'planted as':<38}{'reason':<22}{'planted':>9}{'found':>9}")
    mismatches = []
    for kind, reason in KINDS.items():
        found = result.reasons.get(reason, 0)
        flag = "" if found == expected[reason] else "  <-- differs"
        if flag:
            mismatches.append(reason)
        print(f"  {kind:<38}{reason:<22}{planted[kind]:>9,}{found:>9,}{flag}")
    for reason, found in result.reasons.items():
        if found and reason not in expected:
            mismatches.append(reason)
            print(f"  {'(nothing planted)':<38}{reason:<22}{0:>9,}{found:>9,}  <-- unexpected")
    planted_total = sum(planted.values())
    print(f"  {'total':<38}{'':<22}{planted_total:>9,}{result.quarantined:>9,}")
    valid_expected = rows - planted_total
    if result.valid != valid_expected:
        print(f"  valid rows: {result.valid:,}, expected {valid_expected:,}  <-- differs")
    print(
        f"  read back from the tables: raw {stored_raw:,}, validated {stored_valid:,}, "
        f"quarantine {stored_quarantined:,}"
    )
    print(
        f"  count invariant (raw == valid + quarantined == {rows:,}, result and tables): "
        f"{'FAILED' if failures else 'ok'}"
    )
    for failure in failures:
        print(f"    {failure}")
    print(f"  reasons match the planted rows: {'no: ' + ', '.join(mismatches) if mismatches else 'yes'}")

    # pandas, for comparison
    pandas_rate = None
    if pandas_path is not None:
        pandas_rate = time_pandas(pandas_path, rows - planted[MALFORMED], planted[MALFORMED])
    else:
        print(
            f"\npandas.read_json: not run (--pandas; it holds the whole file in memory, so by default it "
            f"runs up to {PANDAS_MAX_ROWS:,} rows)"
        )

    both_rate = rate(rows, both_s)
    print("\ntargets from the issue (reported, not asserted)")
    print(
        f"  >= {TARGET_ROWS_PER_S:,} rows/s ingest+validate on a 2-core machine: {both_rate:,.0f} rows/s "
        f"{'met' if both_rate >= TARGET_ROWS_PER_S else 'NOT met'}"
    )
    print(
        f"  peak memory < {TARGET_PEAK_MIB:,} MiB: {peak:,.0f} MiB {'met' if peak < TARGET_PEAK_MIB else 'NOT met'}"
    )
    if failures:
        print("count invariant FAILED (exit status 1)")
    pandas_figure = f"{pandas_rate:.0f} rows/s" if pandas_rate is not None else "not run"
    print(f"ingest+validate: {both_rate:.0f} rows/s, peak {peak:.0f} MiB, pandas read: {pandas_figure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
