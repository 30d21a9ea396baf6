"""Benchmarks run as their docstrings say: each one's quick mode, end to end, printing its figures;
bench/gpu.sh's calls match the scripts' command lines; no bench file hides a module."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SHARED = ROOT.parent / "shared" / "data"
SCRIPTS = sorted(BENCH.glob("*.py"))


def quick(script: str, *args: str, timeout: float = 300) -> list[str]:
    """Run `python bench/<script> --quick ARGS` from the repository root, as documented; its stdout
    lines, after asserting it exits 0."""
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout.splitlines()


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared datasets are not beside the project ({SHARED})")
def test_the_training_benchmark_runs_every_variant_in_its_quick_mode(builtin_model, store_root):
    lines = quick("train.py", "--store", str(store_root), timeout=600)
    for data in ("demo", "roleplay"):
        assert any(line.startswith(f"{data}: ") for line in lines), data
    for variant in ("naive", "trl", "trl packed", "loraflow", "loraflow packed"):
        assert sum(line.strip().startswith(f"{variant}: ") and "tokens/s" in line for line in lines) == 2, (
            variant
        )
    assert lines[-1].startswith("best: ") and "x baseline, MFU " in lines[-1] and "x trl (" in lines[-1]


def test_the_adapter_benchmark_trains_every_method_and_objective_in_its_quick_mode(builtin_model, store_root):
    lines = quick("adapters.py", "--store", str(store_root))
    for variant in ("lora sft", "adalora sft", "ia3 sft", "prefix sft", "lora dpo", "lora orpo"):
        (row,) = [line for line in lines if line.strip().startswith(variant + " ")]
        assert row.endswith("x") and " GiB " in row, row
    assert lines[-1] == "adapters: 6 variants trained"


def test_the_ingestion_benchmark_checks_every_planted_row_in_its_quick_mode():
    lines = quick("ingest.py")
    assert "rows:           20,000 (seed 0), 5% planted bad" in lines
    assert any(line.strip().startswith("ingest_file ") for line in lines)
    assert any(line.strip().startswith("validate_partition ") for line in lines)
    assert any("count invariant" in line and line.endswith(": ok") for line in lines)
    assert "  reasons match the planted rows: yes" in lines
    assert re.fullmatch(r"ingest\+validate: \d+ rows/s, peak \d+ MiB, pandas read: \d+ rows/s", lines[-1])


def test_the_ingestion_benchmark_runs_several_sizes_and_reports_how_they_grow():
    done = subprocess.run(
        [sys.executable, "bench/ingest.py", "--rows", "3000", "6000", "--pandas", "off"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    lines = done.stdout.splitlines()
    assert sum(line.endswith(": ok") and "count invariant" in line for line in lines) == 2
    table = lines[lines.index(next(line for line in lines if line.startswith("growth ("))) + 2 :][:2]
    assert [row.split()[0] for row in table] == ["3,000", "6,000"]
    for row in table:
        rows, seconds, per_s, peak = row.split()
        assert int(per_s.replace(",", "")) > 0 and int(peak.replace(",", "")) > 0 and float(seconds) > 0
    assert re.fullmatch(r"ingest\+validate: \d+ rows/s, peak \d+ MiB, pandas read: not run", lines[-1])


def test_the_tokenization_benchmark_tokenizes_and_packs_in_its_quick_mode(builtin_model, store_root):
    lines = quick("tokenization.py", "--store", str(store_root))
    assert any(line.startswith("examples: 2,000, tokens: ") for line in lines)
    assert any(line.startswith("format + tokenize with loss masks: ") for line in lines)
    assert any(line.startswith("unpacked (batches of 8") and "real tokens" in line for line in lines)
    assert any(line.startswith("packed into ") and "rows of 512" in line for line in lines)
    assert re.fullmatch(r"tokenize: \d+ tokens/s, packing efficiency \d+\.\d%", lines[-1])


def test_the_planner_benchmark_measures_the_tiny_case_in_its_quick_mode(builtin_model, store_root):
    lines = quick("plan_cpu.py", "--store", str(store_root))
    assert any(line.startswith("dataset: ") for line in lines)
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in lines
        if line.startswith("| tiny Llama | lora | 8 | off | ")
    ]
    assert [cells[4] for cells in rows] == ["MALLOC_MMAP_THRESHOLD_=65536"], lines
    for cells in rows:
        assert re.fullmatch(r"[\d,]+", cells[5]), cells  # the estimate
        assert re.fullmatch(r"[\d,]+ \([\d,]+, [\d,]+\)", cells[6]), cells  # measured, one peak per step
        assert re.fullmatch(r"[+-]\d+\.\d%", cells[7]), cells


def test_the_gpu_checks_run_on_this_machine_in_their_quick_mode(tmp_path):
    lines = quick("gpu_checks.py", "--out", str(tmp_path))
    records = json.loads((tmp_path / "gpu_checks.json").read_text())
    checks = records["checks"]
    assert len(checks) == 6
    assert all(check["ok"] is not False for check in checks), checks
    printed = [line for line in lines if re.match(r" *(ok|FAILED|refused here): ", line)]
    assert len(printed) == 6, lines
    figures = {
        "packed logits": "largest relative difference ",
        "qlora first-step": "gap ",
        "a resumed run": "resumed from step 2, largest loss difference ",
    }
    for check, figure in figures.items():
        assert any(check in line and figure in line for line in printed), (check, printed)
    if not records["cuda"]:  # what a CPU cannot run is refused, with its reason, never crashed on
        refused = [check for check in checks if check["ok"] is None]
        assert {check["check"] for check in refused} == {
            "crash path: qlora bf16 compute, paged_adamw_8bit, gradient checkpointing",
            "crash path: flash_attention_2, packed",
        }
        assert all("CUDA" in check["refused"] for check in refused)
    assert lines[-1].startswith(
        "checks: 4 ok, 2 refused here, 0 failed" if not records["cuda"] else "checks: "
    )


def test_the_gpu_training_benchmark_runs_each_command_in_its_quick_mode(tmp_path):
    lines = quick("gpu_train.py", "--out", str(tmp_path))
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    rows = {(run["method"], run["variant"]): run for run in results["runs"]}
    assert set(rows) == {("lora", "packed256"), ("qlora", ""), ("lora", "liger-on")}
    for key in (("lora", "packed256"), ("qlora", "")):
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["tokens_per_second"] > 0 and rows[key]["peak_memory_mib"] > 0
        assert rows[key]["planned_peak_mib"] is not None, rows[key]["plan_note"]
    assert rows[("lora", "liger-on")]["status"] == "skipped"
    table = [line for line in lines if line.startswith("| tiny | ")]
    assert len(table) == 3, lines
    assert lines[-1] == "quick: ok (3 rows)"


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.sh")), ids=lambda p: p.name)
def test_the_gpu_machine_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for named in re.findall(r"bench/\w+\.(?:py|sh)", script.read_text()):
        assert (ROOT / named).is_file(), named


STUB = """\
#!{python}
# Stands in for Python under bench/gpu.sh: records each call, parses bench scripts' arguments with
# their own parsers, and says liger-kernel is missing so that the skip path runs too.
import contextlib, io, json, os, sys

sys.path.insert(0, os.getcwd())
args = sys.argv[1:]
record = {{"argv": args, "ok": True}}
if args[:1] == ["-c"] and "liger_kernel" in args[1]:
    record["ok"] = None
elif args and args[0] in ("bench/gpu_train.py", "bench/gpu_checks.py"):
    module = __import__("bench." + args[0][len("bench/") : -len(".py")], fromlist=["build_parser"])
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            record["parsed"] = vars(module.build_parser().parse_args(args[1:]))
    except SystemExit:
        record.update(ok=False, error=errors.getvalue())
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(record, default=str) + "\\n")
sys.exit(1 if record["ok"] is None else 0)
"""


def test_every_call_bench_gpu_sh_makes_is_one_the_scripts_accept(tmp_path):
    """bench/gpu.sh with its own settings, Python replaced by a stand-in that checks each call's
    arguments against the script's parser: a renamed command or option fails here, not on a GPU."""
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    done = subprocess.run(
        ["bash", "bench/gpu.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PYTHON": str(stub),
            "WORK": str(tmp_path / "work"),
            "OUT": str(tmp_path / "out"),
            "STUB_LOG": str(log),
        },
    )
    assert done.returncode == 0, done.stdout[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c for c in calls if c["ok"] is False] == []
    bench_calls = [c for c in calls if c["argv"][:1] == ["bench/gpu_train.py"]]
    commands = {c["parsed"]["command"] for c in bench_calls}
    assert commands == {"prepare", "train", "skip", "report"}
    trained = {
        (c["parsed"]["size"], c["parsed"]["method"]) for c in bench_calls if c["parsed"]["command"] == "train"
    }
    assert trained == {(size, method) for size in ("1b", "8b") for method in ("lora", "qlora")}
    assert sum(c["argv"][:1] == ["bench/gpu_checks.py"] for c in calls) == 1
    assert "=== done in " in done.stdout


def test_the_packages_gpu_prepare_sh_pins_are_the_ones_here():
    text = (BENCH / "gpu_prepare.sh").read_text()
    packages = re.search(r'^PACKAGES="([^"]+)"', text, re.MULTILINE).group(1).split()
    not_here = ast.literal_eval(re.search(r"^NOT_HERE = (\{.*\})$", text, re.MULTILINE).group(1))
    for name in packages:
        if name not in not_here:
            assert importlib.metadata.version(name), name  # raises PackageNotFoundError otherwise


def test_no_bench_script_hides_a_module_of_its_name():
    """Run as a script, bench/ comes first on sys.path: a file there named like a module (as
    bench/tokenize.py once was, the standard library's tokenize) replaces it for every import."""
    for script in SCRIPTS:
        assert script.stem not in sys.stdlib_module_names, script.name
        assert importlib.util.find_spec(script.stem) is None, script.name


def test_readme_and_docstrings_name_the_bench_scripts_and_their_quick_modes():
    readme = (ROOT / "README.md").read_text()
    for named in set(re.findall(r"bench/\w+\.(?:py|sh)", readme)):
        assert (ROOT / named).is_file(), f"README.md names {named}"
    for script in SCRIPTS:
        docstring = ast.get_docstring(ast.parse(script.read_text()))
        assert re.search(rf"python bench/{script.name} --quick", docstring), script.name
        for named in set(re.findall(r"bench/\w+\.(?:py|sh)", docstring)):
            assert (ROOT / named).is_file(), f"{script.name} names {named}"
        assert f"bench/{script.name} --quick" in readme, f"README.md has no quick mode of {script.name}"
