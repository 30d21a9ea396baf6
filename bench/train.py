"""Benchmark: loraflow's training loop against a plain transformers Trainer, on SmolLM2-135M.

    .venv/bin/python bench/train.py            # about 10 minutes on a 2-core CPU

Same data (the demo's triage examples, formatted and tokenized by loraflow), same steps, batch
size, learning rate, schedule and LoRA shape for every variant:

- baseline: `transformers.Trainer` with a PEFT LoRA model in fp32, each batch padded to its
  longest example, no packing (what a first fine-tuning script usually looks like);
- loraflow lora / qlora, packing off and on.

Each variant runs `--steps` optimizer steps; the first `--warmup` are not timed. Throughput is
non-padding tokens per second. MFU is model FLOPs per second over a peak measured in this run
with a large matrix product, in bf16 (the usual reference) and in fp32 (what this CPU does
fastest when it has no bf16 units). Model FLOPs per non-padding token for LoRA training:
2·N forward plus 2·N for the input gradients of the backward pass (frozen weights need no weight
gradients) plus 6·N_lora, where N counts every matmul weight, output head included, plus the
attention scores (4·layers·hidden·context forward and twice that backward). Packed and padded
runs are credited the same FLOPs per real token, so padding and head work skipped are not counted.
The last line reads `best: <N> tokens/s, <R>x baseline, MFU <M>%`.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, where bench/tokenize.py would hide
# the standard library's `tokenize` module: put the project root there instead, before anything else.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from loraflow.base_model import load_tokenizer, resolve_base_model  # noqa: E402
from loraflow.dataset import build_dataset, load_split  # noqa: E402
from loraflow.demo_data import generate_examples  # noqa: E402
from loraflow.spec import BaseModelSpec, FormatSpec, LoraSpec, TrainingSpec  # noqa: E402
from loraflow.train import lora_config, train_adapter  # noqa: E402

SYSTEM_PROMPT = "You triage customer messages."
LORA = LoraSpec(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def demo_dataset(tokenizer, folder: Path, n: int, max_seq_len: int) -> Path:
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
    fmt = FormatSpec(system_prompt=SYSTEM_PROMPT, max_seq_len=max_seq_len, eval_size=0.01)
    return Path(build_dataset(rows, tokenizer, fmt, tokenizer.chat_template, "bench", folder).path)


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
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", config.num_attention_heads),
    )
    head_dim = hidden // heads
    attention = hidden * (heads * head_dim) * 2 + hidden * (kv_heads * head_dim) * 2
    mlp = 3 * hidden * config.intermediate_size
    matmul_weights = layers * (attention + mlp) + hidden * config.vocab_size
    scores = 4 * layers * hidden * context  # QK^T and attention x V, forward
    return 4 * matmul_weights + 3 * scores + 6 * lora_params


class StepClock:
    """Wall time of optimizer steps after the first `warmup`, and the tokens they processed."""

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


def run_loraflow(model_dir, dataset_dir, out, method, packing, args) -> tuple[float, int]:
    spec = TrainingSpec(
        method=method,
        lora=LORA,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=1e-3,
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
        pack_to=args.max_seq_len if packing else None,
        progress=lambda f: clock.tick(f["step"], f["tokens_seen"]),
    )
    return clock.tokens_per_second, result.trainable_params


def run_baseline(model_dir, dataset_dir, out, args) -> tuple[float, int]:
    """A plain Trainer run: fp32 LoRA, dynamic padding to the longest of each batch."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = load_tokenizer(model_dir)
    rows = load_split(dataset_dir, "train")
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    seen = {"tokens": 0}

    def collate(features):
        batch = pad(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    clock = StepClock(args.warmup)

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock.tick(state.global_step, seen["tokens"])

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config(LORA)
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=1e-3,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            logging_steps=args.steps,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            seed=0,
        ),
        train_dataset=data,
        data_collator=collate,
        callbacks=[Clock()],
    )
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return clock.tokens_per_second, trainable


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--examples", type=int, default=2400)
    parser.add_argument("--variants", default="baseline,lora,lora+packing,qlora,qlora+packing")
    parser.add_argument("--store", default=os.environ.get("LORAFLOW_HOME", ".loraflow"))
    args = parser.parse_args()

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    # without bf16 units a CPU emulates bf16 products hundreds of times slower: a small one is enough
    bf16_size = 2048 if torch.cuda.is_available() or matmul_peak(torch.bfloat16, 256, 1) > 5e9 else 512
    peaks = {"bf16": matmul_peak(torch.bfloat16, bf16_size, 3), "fp32": matmul_peak(torch.float32)}
    print(", ".join(f"{k} matmul peak {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))

    model = resolve_base_model(BaseModelSpec(), Path(args.store))
    tokenizer = load_tokenizer(model.path)
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    dataset_dir = demo_dataset(tokenizer, work / "datasets", args.examples, args.max_seq_len)
    rows = load_split(dataset_dir, "train")
    mean_len = sum(r["num_tokens"] for r in rows) / len(rows)
    print(
        f"data: {len(rows):,} train examples, {mean_len:.0f} tokens on average; {args.steps} steps of {args.batch_size}"
    )

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model.path)
    results = {}
    for variant in args.variants.split(","):
        started = time.perf_counter()
        if variant == "baseline":
            rate, lora_params = run_baseline(model.path, dataset_dir, work / variant, args)
        else:
            method, _, packing = variant.partition("+")
            rate, lora_params = run_loraflow(
                model.path, dataset_dir, work / variant, method, bool(packing), args
            )
        # context: each token attends to half its example on average (causal)
        flops = flops_per_token(config, lora_params, context=mean_len / 2) * rate
        results[variant] = (rate, flops)
        print(
            f"{variant:>15}: {rate:8.1f} tokens/s | {flops / 1e9:6.1f} GFLOP/s | "
            f"MFU {100 * flops / peaks['bf16']:5.1f}% of bf16 peak, {100 * flops / peaks['fp32']:5.1f}% of fp32 peak "
            f"| {time.perf_counter() - started:.0f} s",
            flush=True,
        )

    baseline = results.get("baseline", (float("nan"), 0.0))[0]
    for variant, (rate, _) in results.items():
        if variant != "baseline":
            print(f"{variant:>15}: {rate / baseline:.2f}x baseline")
    best = max((v for v in results if v != "baseline"), key=lambda v: results[v][0])
    rate, flops = results[best]
    print(
        f"best: {rate:.0f} tokens/s, {rate / baseline:.2f}x baseline, MFU {100 * flops / peaks['bf16']:.1f}% ({best})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
