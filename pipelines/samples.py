"""Print a few examples of a pipeline's training dataset as training sees them.

    python -m pipelines.samples demo            # 3 train examples, trained spans highlighted
    python -m pipelines.samples demo -n 5 --split eval --plain

Each example is the text rendered with the dataset's chat template; trained tokens (those that
carry labels) are green on a terminal, or inside [[ ]] with --plain or when piped. Reads the
latest `training_dataset` materialized in the artifact store (LORAFLOW_HOME).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraflow.dataset import SPLITS, dataset_tokenizer, load_split, sample_view
from pipelines.paths import default_home

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


def show(pipeline: str, home: Path, n: int, split: str, plain: bool) -> str:
    manifests = home / "manifests" / pipeline
    dataset_file, base_file = manifests / "training_dataset.json", manifests / "base_model.json"
    if not dataset_file.is_file() or not base_file.is_file():
        raise SystemExit(
            f"no training dataset for pipeline {pipeline!r} under {home}: materialize {pipeline}/training_dataset "
            f"first (python -m pipelines.run {pipeline}, or from the UI)"
        )
    dataset, base = json.loads(dataset_file.read_text()), json.loads(base_file.read_text())
    tokenizer = dataset_tokenizer(Path(base["path"]), Path(dataset["path"]), base["trust_remote_code"])
    rows = load_split(Path(dataset["path"]), split)
    mark = ("[[", "]]") if plain else (GREEN, RESET)
    header = (
        f"{pipeline}: dataset {dataset['version']} ({dataset['train_examples']} train, "
        f"{dataset['eval_examples']} eval), template {dataset['chat_template_source']}; "
        f"showing {min(n, len(rows))} {split} example(s), trained tokens "
        + ("in [[ ]]" if plain else f"{GREEN}like this{RESET}")
    )
    parts = [header]
    for row in rows[:n]:
        parts.append(
            f"--- {row['source_file']} record {row['record_index']}: {row['num_tokens']} tokens, "
            f"{row['trainable_tokens']} trained{' (truncated)' if row['truncated'] else ''}\n"
            + sample_view(tokenizer, row, mark)
        )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", help="pipeline name (its YAML file's stem)")
    parser.add_argument("-n", type=int, default=3, help="how many examples (default 3)")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument(
        "--plain", action="store_true", help="mark trained spans with [[ ]] instead of colour"
    )
    args = parser.parse_args(argv)
    plain = args.plain or not sys.stdout.isatty()
    print(show(args.pipeline, default_home(), args.n, args.split, plain))


if __name__ == "__main__":
    main()
