"""Benchmark: loraflow's training engine against what a user would first write, on SmolLM2-135M.

    .venv/bin/python bench/train.py            # about 15 minutes on a 2-core CPU
    .venv/bin/python bench/train.py --quick    # a minute: a two-layer model, 3 steps (CI runs it)

Two data sets, each formatted once by loraflow (its ingestion, validation and chat template):

- demo: the demo's triage examples, short (about 80 tokens, a fifth of them trained);
- roleplay: GPTeacher's roleplay set from ../shared/data, longer (about 300 tokens, mostly answer).

On each, the same model, LoRA shape (r=16 on q/k/v/o, fp32), learning rate and steps for:

- naive: `transformers.Trainer` with a PEFT model, each batch of 4 padded to its longest example,
  the model's own loss (what a first fine-tuning script looks like);
- trl / trl packed: TRL's SFTTrainer as its documentation shows it, a conversational dataset and a
  LoraConfig, with two settings a CPU user must change or wait: bf16 off (TRL's default; emulated
  in bf16 on a CPU without bf16 units it is about 17x slower) and gradient checkpointing off;
  padded batches of 4, and `packing=True` (TRL's best-fit padding-free rows of 512: with sdpa,
  position ids alone, so packed examples attend to each other);
- loraflow / loraflow packed: `loraflow.train.train_adapter`, the engine the adapter asset runs
  (SFTTrainer fed loraflow's rows, collators and loss), batches of 4, and 2 packed rows of 512
  with a block-diagonal mask.

Each variant runs `--steps` optimizer steps; the first `--warmup` are not timed. Throughput is real
(non-padding) tokens per second. MFU is model FLOPs per second over a peak measured in this run
with a large matrix product, in bf16 (the usual reference) and in fp32 (what this CPU does fastest
when it has no bf16 units). Model FLOPs per real token for LoRA training: 2·N forward plus 2·N for
the input gradients (frozen weights need no weight gradients) plus 6·N_lora, where N counts every
matmul weight, output head included, plus the attention scores; padding and head work skipped are
not counted, so every variant is credited the same FLOPs per real token.

The last line reads `best: <N> tokens/s, <R>x baseline, MFU <M>%, <T>x trl` for loraflow's best
variant on the longer set: against the naive Trainer and against TRL's packed figure.
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
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from loraflow.base_model import load_tokenizer, resolve_base_model  # noqa: E402
from loraflow.dataset import build_dataset, load_split, select_examples  # noqa: E402
from loraflow.demo_data import generate_examples  # noqa: E402
from loraflow.spec import BaseModelSpec, FormatSpec, LoraSpec, QualitySpec, SourceSpec, TrainingSpec  # noqa: E402
from loraflow.train import lora_config, train_adapter  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROLEPLAY = SHARED / "gpteacher_roleplay_simple_deduped.json"
SYSTEM_PROMPT = "You triage customer messages."
LORA = LoraSpec(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
MAX_SEQ_LEN = 512
PADDED_BATCH = 4
PACKED_ROWS = 2
LEARNING_RATE = 1e-3
VARIANTS = ("naive", "trl", "trl packed", "loraflow", "loraflow packed")


# ---------------------------------------------------------------------------------------------
# data


def demo_dataset(tokenizer, folder: Path, n: int) -> Path:
    """The demo examples as a loraflow dataset folder (the tokenizer's own chat template)."""
    rows = [
        {
            "partition": "bench.jsonl",
            "source_file": "bench.jsonl",
            "record_index": i + 1,
            "sub_index": 0,
            "messages": json.dumps(
                [
                    {"role": "user", "content": f"{e['instruction']}\n\n{e['input']}"},
                    {"role": "assistant", "content": e["output"]},
                ]
            ),
            "text": None,
            "example_hash": hashlib.sha256(f"{e['instruction']}|{e['input']}".encode()).hexdigest(),
        }
        for i, e in enumerate(generate_examples(n, seed=0))
    ]
    fmt = FormatSpec(system_prompt=SYSTEM_PROMPT, max_seq_len=MAX_SEQ_LEN, eval_size=2)
    return Path(build_dataset(rows, tokenizer, fmt, tokenizer.chat_template, "bench", folder).path)


def roleplay_dataset(tokenizer, folder: Path, n: int) -> Path:
    """GPTeacher's roleplay records, ingested and validated by loraflow in their own schema, the
    first `n` formatted (over-long answers truncated to 512 tokens, as examples/roleplay.yaml does)."""
    import duckdb

    from loraflow.ingest import ingest_file
    from loraflow.validate import validate_partition

    if not ROLEPLAY.is_file():
        raise SystemExit(f"the longer-example set is not beside the project: {ROLEPLAY} (../shared/data)")
    source = SourceSpec(path=str(ROLEPLAY), format="alpaca", columns={"output": "response"})
    con = duckdb.connect()
    ingest_file(con, "bench", "roleplay", ROLEPLAY, source)
    validate_partition(con, "bench", "roleplay", source, QualitySpec(pii={"action": "redact"}))
    rows, _ = select_examples(con, "bench")
    rows = sorted(rows, key=lambda r: r["record_index"])[:n]
    fmt = FormatSpec(max_seq_len=MAX_SEQ_LEN, overlong="truncate", eval_size=2)
    return Path(build_dataset(rows, tokenizer, fmt, tokenizer.chat_template, "bench", folder).path)


# ---------------------------------------------------------------------------------------------
# measuring


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square matrix products of `size`, after one warm-up."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def flops_per_token(config, lora_params: int, context: float) -> float:
    """Model FLOPs of one LoRA training token (see the module docstring)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    head_dim = hidden // heads
    attention = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2
    mlp = 3 * hidden * config.intermediate_size
    matmul_weights = layers * (attention + mlp) + hidden * config.vocab_size
    scores = 4 * layers * hidden * context  # QK^T and attention x V, forward
    return 4 * matmul_weights + 3 * scores + 6 * lora_params


class StepClock:
    """Wall time of optimizer steps after the first `warmup`, and the real tokens they processed."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.tokens_at_start = warmup, None, 0
        self.end, self.tokens_at_end = None, 0

    def tick(self, step: int, tokens_seen: int) -> None:
        now = time.perf_counter()
        if step == self.warmup:
            self.start, self.tokens_at_start = now, tokens_seen
        elif step > self.warmup:
            self.end, self.tokens_at_end = now, tokens_seen

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens_at_end - self.tokens_at_start) / (self.end - self.start)


def counting(collate, seen: dict):
    """A collator that also counts the real tokens of each batch it builds."""

    def wrapped(features):
        batch = collate(features)
        if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
            seen["tokens"] += int(batch["attention_mask"].sum())
        else:  # padding-free: one row of real tokens
            seen["tokens"] += int(batch["input_ids"].numel())
        return batch

    return wrapped


def trainer_args(out: Path, args, batch: int) -> dict:
    """The settings the peers share with loraflow: steps, batch, learning rate, warm-up, schedule."""
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=args.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=args.steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )


# ---------------------------------------------------------------------------------------------
# the variants


def run_loraflow(model_dir, dataset_dir, out, packed: bool, args) -> tuple[float, int]:
    spec = TrainingSpec(
        method="lora",
        lora=LORA,
        max_steps=args.steps,
        batch_size=PACKED_ROWS if packed else PADDED_BATCH,
        learning_rate=LEARNING_RATE,
        warmup_steps=2,
        log_every=args.steps,
        checkpoint_every=None,
    )
    clock = StepClock(args.warmup)
    result = train_adapter(
        spec,
        model_dir,
        dataset_dir,
        out,
        pack_to=MAX_SEQ_LEN if packed else None,
        progress=lambda f: clock.tick(f["step"], f["tokens_seen"]),
    )
    return clock.tokens_per_second, result.trainable_params


def run_naive(model_dir, dataset_dir, out, args) -> tuple[float, int]:
    """A plain Trainer run: fp32 LoRA, dynamic padding to the longest of each batch."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = load_tokenizer(model_dir)
    rows = load_split(dataset_dir, "train")
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    seen = {"tokens": 0}
    collate = counting(DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100), seen)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config(LORA)
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**trainer_args(out, args, PADDED_BATCH)),
        train_dataset=data,
        data_collator=collate,
        callbacks=[clock_callback(args.warmup, seen, clock := StepClock(args.warmup))],
    )
    trainer.remove_callback(PrinterCallback)  # its per-step dicts would drown the table
    trainer.train()
    return clock.tokens_per_second, sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_trl(model_dir, dataset_dir, out, packed: bool, args) -> tuple[float, int]:
    """TRL's SFTTrainer on the same conversations, as its documentation writes it (see the docstring)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(model_dir)
    rows = load_split(dataset_dir, "train")
    data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    seen = {"tokens": 0}
    config = SFTConfig(
        **trainer_args(out, args, PACKED_ROWS if packed else PADDED_BATCH),
        max_length=MAX_SEQ_LEN,
        packing=packed,
        bf16=False,
        gradient_checkpointing=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=lora_config(LORA),
        )
    trainer.data_collator = counting(trainer.data_collator, seen)
    clock = StepClock(args.warmup)
    trainer.add_callback(clock_callback(args.warmup, seen, clock))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock.tokens_per_second, sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)


def clock_callback(warmup: int, seen: dict, clock: StepClock):
    """A callback that ticks `clock` after each optimizer step with the real tokens seen so far."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock.tick(state.global_step, seen["tokens"])

    return Clock()


def tiny_model(folder: Path, tokenizer) -> Path:
    """A two-layer Llama with SmolLM2's tokenizer, random weights: the quick mode's model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed")
    parser.add_argument("--examples", type=int, default=1000, help="examples of each data set")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--datasets", default="demo,roleplay")
    parser.add_argument("--quick", action="store_true", help="a two-layer model, 3 steps, 64 examples")
    parser.add_argument("--store", default=os.environ.get("LORAFLOW_HOME", ".loraflow"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.examples = 3, 1, 64
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # renamed arguments, not this benchmark's

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    # without bf16 units a CPU emulates bf16 products many times slower: a small one is enough
    bf16_size = 2048 if torch.cuda.is_available() or matmul_peak(torch.bfloat16, 256, 1) > 5e9 else 512
    peaks = {"bf16": matmul_peak(torch.bfloat16, bf16_size, 3), "fp32": matmul_peak(torch.float32)}
    print(", ".join(f"{k} matmul peak {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))

    model = resolve_base_model(BaseModelSpec(), Path(args.store))
    tokenizer = load_tokenizer(model.path)
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # scratch: models, data, adapters
    model_dir = tiny_model(work / "tiny-llama", tokenizer) if args.quick else Path(model.path)
    print(
        f"model: {'a two-layer Llama (quick mode)' if args.quick else 'SmolLM2-135M-Instruct'}, fp32 LoRA r=16 q/k/v/o"
    )

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    builders = {"demo": demo_dataset, "roleplay": roleplay_dataset}
    results: dict[str, dict[str, float]] = {}
    model_flops: dict[str, dict[str, float]] = {}
    for name in args.datasets.split(","):
        dataset_dir = builders[name](tokenizer, work / "datasets" / name, args.examples)
        rows = load_split(dataset_dir, "train")
        mean_len = sum(r["num_tokens"] for r in rows) / len(rows)
        trained = sum(r["trainable_tokens"] for r in rows) / sum(r["num_tokens"] for r in rows)
        print(
            f"\n{name}: {len(rows):,} train examples, {mean_len:.0f} tokens on average ({trained:.0%} trained); "
            f"{args.steps} steps ({args.warmup} untimed), batches of {PADDED_BATCH} or {PACKED_ROWS} rows of {MAX_SEQ_LEN}"
        )
        results[name], model_flops[name] = {}, {}
        for variant in args.variants.split(","):
            started = time.perf_counter()
            out = work / name / variant.replace(" ", "-")
            if variant == "naive":
                rate, lora_params = run_naive(model_dir, dataset_dir, out, args)
            elif variant.startswith("trl"):
                rate, lora_params = run_trl(model_dir, dataset_dir, out, variant.endswith("packed"), args)
            else:
                rate, lora_params = run_loraflow(
                    model_dir, dataset_dir, out, variant.endswith("packed"), args
                )
            # context: each token attends to half its example on average (causal)
            flops = flops_per_token(config, lora_params, context=mean_len / 2) * rate
            results[name][variant], model_flops[name][variant] = rate, flops
            print(
                f"{variant:>16}: {rate:8.1f} tokens/s | {flops / 1e9:6.1f} GFLOP/s | MFU "
                f"{100 * flops / peaks['bf16']:5.1f}% of bf16 peak, {100 * flops / peaks['fp32']:5.1f}% of fp32 peak "
                f"| {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        figures = results[name]
        for variant in figures:
            if variant.startswith("loraflow") and "naive" in figures:
                versus = [f"{figures[variant] / figures['naive']:.2f}x naive"]
                for peer in ("trl", "trl packed"):
                    if peer in figures:
                        versus.append(f"{figures[variant] / figures[peer]:.2f}x {peer}")
                print(f"{variant:>16}: {', '.join(versus)}")

    name = "roleplay" if "roleplay" in results else next(iter(results))
    figures = results[name]
    best = max((v for v in figures if v.startswith("loraflow")), key=figures.get)
    rate, flops = figures[best], model_flops[name][best]
    baseline = figures.get("naive", float("nan"))
    trl = figures.get("trl packed", figures.get("trl", float("nan")))
    print(
        f"best: {rate:.0f} tokens/s, {rate / baseline:.2f}x baseline, MFU {100 * flops / peaks['bf16']:.1f}%, "
        f"{rate / trl:.2f}x trl ({best} on {name})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
