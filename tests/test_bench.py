"""Benchmarks run as their docstrings say: each one's quick mode, end to end, printing its last line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared datasets are not beside the project ({SHARED})")
def test_the_training_benchmark_runs_every_variant_in_its_quick_mode(builtin_model, store_root):
    done = subprocess.run(
        [sys.executable, "bench/train.py", "--quick", "--store", str(store_root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for data in ("demo", "roleplay"):
        assert any(line.startswith(f"{data}: ") for line in lines), data
    for variant in ("naive", "trl", "trl packed", "loraflow", "loraflow packed"):
        assert sum(line.strip().startswith(f"{variant}: ") and "tokens/s" in line for line in lines) == 2, (
            variant
        )
    assert lines[-1].startswith("best: ") and "x baseline, MFU " in lines[-1] and "x trl (" in lines[-1]
