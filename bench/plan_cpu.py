"""Benchmark: loraflow.plan's memory estimates against peaks measured on this CPU.

    .venv/bin/python bench/plan_cpu.py [--steps 3] [--store DIR]   # about 5 minutes on a 2-core CPU
    .venv/bin/python bench/plan_cpu.py --quick     # one row: the tiny Llama's LoRA, 2 steps (CI runs it)

Each case trains a few steps with `loraflow.train.train_adapter` in a fresh process and reads the
process's peak resident set size (VmHWM in /proc/self/status) after its last step; the estimate
is `loraflow.plan.estimate_for_spec` for the same pipeline, model and dataset on the CPU. Cases:
the tests' two-layer Llama (random weights, SmolLM2's tokenizer) and SmolLM2-135M-Instruct, LoRA
and QLoRA, on 38 chats of 60-95 tokens.

Two allocator settings: glibc's default, whose heap grows step by step past the live peak (the
planner adds half the heap-held activations for it), and MALLOC_MMAP_THRESHOLD_=65536, where
every activation is mapped and unmapped and resident memory follows the live bytes (the planner
adds nothing). The table prints both, with each step's peak.

`--quick` measures one row, the tiny Llama's LoRA case under MALLOC_MMAP_THRESHOLD_=65536, for 2
steps: the same estimate, measuring process and table, in well under a minute.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path: put the project root there instead,
# so that no file in bench/ can hide a module of the same name from the libraries imported below.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import atexit  # noqa: E402
import datetime  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

MAPPED = {"MALLOC_MMAP_THRESHOLD_": "65536"}
QUICK_STEPS = 2


def tiny_model(folder: Path, tokenizer) -> Path:
    """The tests' two-layer Llama with SmolLM2's tokenizer, random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def pipeline_yaml(folder: Path, name: str, method: str, batch: int, steps: int, checkpointing: bool) -> Path:
    path = folder / "pipelines" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        textwrap.dedent(
            f"""\
            data:
              sources:
                - path: data/*.jsonl
            training:
              method: {method}
              batch_size: {batch}
              max_steps: {steps}
              checkpoint_every: null
              gradient_checkpointing: {str(checkpointing).lower()}
            """
        )
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=2, help="cases measured at once")
    parser.add_argument(
        "--store",
        default=os.environ.get("LORAFLOW_HOME", str(Path(sys.path[0]) / ".loraflow")),
        help="where the built-in model is (or gets) converted",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one row: the tiny Llama's LoRA, mapped allocator, {QUICK_STEPS} steps",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = QUICK_STEPS
    if args.steps < 1 or args.parallel < 1:
        parser.error("--steps and --parallel must be positive")

    from loraflow.base_model import load_tokenizer, resolve_base_model
    from loraflow.dataset import build_dataset
    from loraflow.plan import estimate_for_spec
    from loraflow.plan.measure import measure_peaks, sample_chats
    from loraflow.plan.memory import MIB
    from loraflow.spec import BaseModelSpec, FormatSpec, load_spec

    work = Path(tempfile.mkdtemp(prefix="loraflow-plan-cpu-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # scratch: models, data, adapters
    smol = resolve_base_model(BaseModelSpec(source="smollm2-135m-instruct"), Path(args.store)).path
    tokenizer = load_tokenizer(smol)
    tiny = tiny_model(work / "tiny-llama", tokenizer)
    fmt = FormatSpec(eval_size=2, max_seq_len=128)
    data = build_dataset(sample_chats(40), tokenizer, fmt, tokenizer.chat_template, "t", work / "datasets")
    cases = [
        ("tiny Llama", tiny, "lora", 8, False),
        ("tiny Llama", tiny, "qlora", 8, False),
        ("SmolLM2-135M", smol, "lora", 4, False),
        ("SmolLM2-135M", smol, "qlora", 4, False),
        ("SmolLM2-135M", smol, "lora", 8, True),
    ]
    if args.quick:
        cases = cases[:1]
    modes = ("mapped",) if args.quick else ("mapped", "default")
    runs = [(case, mode) for case in cases for mode in modes]
    environment = threading.Lock()

    def measure(run):
        (label, model, method, batch, checkpointing), mode = run
        name = f"{label.split()[0].lower().replace('-', '_')}_{method}_{batch}_{int(checkpointing)}_{mode}"
        yaml_path = pipeline_yaml(work, name, method, batch, args.steps, checkpointing)
        with environment:  # one thread at a time sets the environment the estimate reads
            previous = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            try:  # the estimate reads the same environment the training process gets
                os.environ.update(MAPPED if mode == "mapped" else {})
                estimate = estimate_for_spec(load_spec(yaml_path), model, data.path, device="cpu")
            finally:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
                if previous is not None:
                    os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
        adapter = work / name
        try:
            peaks = measure_peaks(
                yaml_path,
                model,
                data.path,
                adapter,
                env={"MALLOC_MMAP_THRESHOLD_": None} | (MAPPED if mode == "mapped" else {}),
            )
        except RuntimeError as err:
            return run, estimate, None, str(err).splitlines()[-1]
        return run, estimate, peaks, None

    print(
        f"loraflow.plan against measured peak RSS, {datetime.date.today()}, {os.cpu_count()} CPUs, "
        f"{args.steps} steps"
    )
    print(
        f"dataset: {data.train_examples} chats, {data.train_tokens:,} tokens, longest "
        f"{data.token_percentiles['p100']}, {data.trainable_tokens / data.train_tokens:.0%} of tokens trained\n"
    )
    print(
        "| model | method | batch | checkpointing | allocator | estimated MiB | measured MiB (per step) | difference |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:  # rows print as they finish
        for ((label, _, method, batch, checkpointing), mode), estimate, peaks, error in pool.map(
            measure, runs
        ):
            allocator = "MALLOC_MMAP_THRESHOLD_=65536" if mode == "mapped" else "glibc default"
            if peaks is None:
                measured, difference = f"failed: {error}", "-"
            else:
                measured = f"{peaks[-1] / MIB:,.0f} ({', '.join(f'{p / MIB:,.0f}' for p in peaks)})"
                difference = f"{estimate.peak / peaks[-1] - 1:+.1%}"
            print(
                f"| {label} | {method} | {batch} | {'on' if checkpointing else 'off'} | {allocator} | "
                f"{estimate.peak / MIB:,.0f} | {measured} | {difference} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
