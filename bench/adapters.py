"""Benchmark: what each adapter method and preference objective costs, trained by loraflow's engine.

    python bench/adapters.py [--steps N] [--examples N] [--store DIR]
    python bench/adapters.py --quick     # a two-layer model, 2 steps each: the same path in half a minute (CI runs it)

Trains SmolLM2-135M-Instruct in float32 on the demo's triage examples (batches of 4), one variant
after another in this process: SFT with `adapter: lora` (r=16 on q/k/v/o, the baseline), `adalora`
(init_r 12 -> target_r 4 on the same layers), `ia3` and `prefix` (20 virtual tokens); then DPO and
ORPO with LoRA on pairs made from the same examples (the right answer chosen, another example's
answer rejected). Prints, per variant, the trainable parameters, the planner's peak estimate for
this CPU, sequence tokens per second (a pair is two sequences) and seconds per step, and each
one's speed against LoRA SFT. The ratios are the figures to read: these machines are noisy.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path: put the project root there instead,
# so that no file in bench/ can hide a module of the same name from the libraries imported below.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.train import tiny_model  # noqa: E402
from loraflow.base_model import load_tokenizer, resolve_base_model  # noqa: E402
from loraflow.dataset import build_dataset  # noqa: E402
from loraflow.demo_data import generate_examples  # noqa: E402
from loraflow.plan import PlanError, estimate_training  # noqa: E402
from loraflow.plan.memory import GIB  # noqa: E402
from loraflow.spec import BaseModelSpec, FormatSpec, LoraSpec, PrefixSpec, TrainingSpec  # noqa: E402
from loraflow.train import train_adapter  # noqa: E402

SYSTEM_PROMPT = "You triage customer messages."
VARIANTS = (
    ("lora", "sft"),
    ("adalora", "sft"),
    ("ia3", "sft"),
    ("prefix", "sft"),
    ("lora", "dpo"),
    ("lora", "orpo"),
)


def rows_of(n: int, pairs: bool) -> list[dict]:
    """The demo examples as validated rows: conversations, or pairs whose rejected answer is the
    next example's answer."""
    examples = generate_examples(n, seed=0)
    rows = []
    for i, e in enumerate(examples):
        prompt = [{"role": "user", "content": f"{e['instruction']}\n\n{e['input']}"}]
        chosen = [{"role": "assistant", "content": e["output"]}]
        row = {
            "partition": "bench.jsonl",
            "source_file": "bench.jsonl",
            "record_index": i + 1,
            "sub_index": 0,
            "messages": json.dumps(prompt + chosen),
            "text": None,
            "example_hash": hashlib.sha256(f"{pairs}|{e['instruction']}|{e['input']}".encode()).hexdigest(),
        }
        if pairs:
            other = examples[(i + 1) % len(examples)]["output"]
            if other == e["output"]:
                continue
            row |= {"rejected": json.dumps([{"role": "assistant", "content": other}]), "prompt_turns": 1}
        rows.append(row)
    return rows


def spec_of(adapter: str, objective: str, steps: int) -> TrainingSpec:
    return TrainingSpec(
        method="lora",
        adapter=adapter,
        objective=objective,
        lora=LoraSpec(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        prefix=PrefixSpec(num_virtual_tokens=20),
        max_steps=steps,
        batch_size=4,
        learning_rate=1e-4 if objective == "sft" else 5e-6,
        checkpoint_every=None,
        log_every=steps,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per variant")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument(
        "--store",
        default=os.environ.get("LORAFLOW_HOME", ".loraflow"),
        help="where the built-in model is (or gets) converted",
    )
    parser.add_argument("--quick", action="store_true", help="a two-layer model, 2 steps, 16 examples")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.examples = 2, 16
    if args.steps < 1 or args.examples < 8:
        parser.error("--steps must be positive and --examples at least 8")

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    base = resolve_base_model(BaseModelSpec(), Path(args.store))
    tokenizer = load_tokenizer(base.path)
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-adapters-") as tmp:
        work = Path(tmp)
        model_dir = tiny_model(work / "tiny", tokenizer) if args.quick else Path(base.path)
        print(
            f"model: {'a two-layer Llama (quick mode)' if args.quick else 'SmolLM2-135M-Instruct'}, float32, "
            f"{args.steps} steps of 4, {args.examples} demo examples"
        )
        fmt = FormatSpec(system_prompt=SYSTEM_PROMPT, max_seq_len=512, eval_size=2)
        data = {
            pairs: build_dataset(
                rows_of(args.examples, pairs), tokenizer, fmt, tokenizer.chat_template, "bench", work / "data"
            ).path
            for pairs in (False, True)
        }
        print(
            f"{'variant':>14} {'trainable':>11} {'planned peak':>13} {'tokens/s':>9} {'s/step':>7} {'speed':>6}"
        )
        baseline = None
        for adapter, objective in VARIANTS:
            training = spec_of(adapter, objective, args.steps)
            dataset_dir = Path(data[objective != "sft"])
            try:
                planned = (
                    f"{estimate_training(training, model_dir, dataset_dir, None, 'cpu').peak / GIB:.2f} GiB"
                )
            except PlanError:
                planned = "n/a"
            result = train_adapter(training, model_dir, dataset_dir, work / f"{adapter}-{objective}")
            baseline = baseline or result.tokens_per_second
            print(
                f"{adapter + ' ' + objective:>14} {result.trainable_params:>11,} {planned:>13} "
                f"{result.tokens_per_second:>9.1f} {result.wall_seconds / result.steps:>7.2f} "
                f"{result.tokens_per_second / baseline:>5.2f}x"
            )
    print(f"adapters: {len(VARIANTS)} variants trained")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
