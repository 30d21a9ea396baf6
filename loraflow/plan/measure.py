"""Measured peaks to hold the planner's CPU estimates against.

    python -m loraflow.plan.measure '{"pipeline": "p.yaml", "model": DIR, "dataset": DIR, "adapter": DIR}'

trains the pipeline's `training` section with `train_adapter` in this (fresh) process and prints
`PEAKS [...]`: the process's peak resident set size (VmHWM in /proc/self/status) after each step,
in bytes. The Python and torch runtime is in it, and the planner counts it as overhead.
`measure_peaks` runs that in a subprocess; `sample_chats` gives short chats to train on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def measure_peaks(
    pipeline: str | Path,
    model: str | Path,
    dataset: str | Path,
    adapter: str | Path,
    env: dict[str, str | None] | None = None,
    timeout: float = 600,
) -> list[int]:
    """Peak RSS after each step of the pipeline's training, in a fresh process with `env` added to
    (or, for a None value, removed from) this one's environment. Raises RuntimeError with the
    worker's last lines when it fails."""
    request = {
        "pipeline": str(pipeline),
        "model": str(model),
        "dataset": str(dataset),
        "adapter": str(adapter),
    }
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    done = subprocess.run(
        [sys.executable, "-m", "loraflow.plan.measure", json.dumps(request)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    if done.returncode != 0 or "PEAKS" not in done.stdout:
        raise RuntimeError("measuring failed:\n" + "\n".join(done.stderr.strip().splitlines()[-15:]))
    return json.loads(done.stdout.split("PEAKS")[-1])


def sample_chats(n: int) -> list[dict]:
    """`n` short chats (60-95 tokens with SmolLM2's template) in the shape of validated examples."""
    rows = []
    for i in range(n):
        messages = [
            {"role": "user", "content": f"Summarize record {i}: " + "alpha beta gamma " * (3 + i % 5)},
            {"role": "assistant", "content": "delta epsilon " * (5 + (7 * i) % 12)},
        ]
        rows.append(
            {
                "partition": "f.jsonl",
                "source_file": "f.jsonl",
                "record_index": i + 1,
                "sub_index": 0,
                "messages": json.dumps(messages),
                "text": None,
                "example_hash": hashlib.sha256(f"r{i}".encode()).hexdigest(),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    from loraflow.spec import load_spec
    from loraflow.train import train_adapter

    args = json.loads((argv or sys.argv[1:])[0])
    spec = load_spec(args["pipeline"])
    peaks: list[int] = []
    train_adapter(
        spec.training,
        Path(args["model"]),
        Path(args["dataset"]),
        Path(args["adapter"]),
        progress=lambda figures: peaks.append(peak_rss()),
    )
    print("PEAKS", json.dumps(peaks))


if __name__ == "__main__":
    main()
