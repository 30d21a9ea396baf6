"""Checks of the GPU path that a CPU cannot make: the crash paths and the correctness of CUDA runs.

    python bench/gpu_checks.py --work DIR [--out DIR]     # bench/gpu.sh runs it first, on a tiny model
    python bench/gpu_checks.py --quick [--out DIR]        # every check on half the chats, a scratch folder

On a tiny random Llama (SmolLM2-like chat data from loraflow's own dataset code):

- crash paths: 4 steps with `eval_every: 2` and `checkpoint_every: 2` (the settings whose code
  paths a GPU had never run) for LoRA in bf16 with sdpa and packing; QLoRA with bf16 compute, a
  paged 8-bit optimizer and gradient checkpointing; flash_attention_2 with packing. Each records
  whether its losses are finite, where its parameters live, the dtype of a decoder layer's output,
  and, for a setting that cannot run here, the error loraflow gives (which must say why);
- correctness: packed rows through the GPU's path (flash-attention's variable-length kernel when
  flash-attn is installed, else sdpa with the block mask) give each example the logits it gets
  alone, within bf16's tolerance; QLoRA's first-step loss is close to LoRA's on the same weights;
  a run interrupted at step 3 and resumed continues the uninterrupted run's loss curve.

Writes `gpu_checks.json` (one record per check, with its verdict) into --out and prints a line per
check with its figures. On a CPU the CUDA-only settings are expected to be refused, and the record
says so; every other check runs there too (packed logits in float32). `--quick` runs every check on
24 chats instead of 48, in a temporary --work folder unless one is given; on a CPU, where bf16 is
emulated many times slower, its LoRA crash path trains in fp32. The test suite runs it. Exit status
1 when a check fails (a refusal is not a failure).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path: put the project root there instead,
# so that `bench.gpu_train` imports as a module of this checkout and no file in bench/ hides another.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    import torch

RESULTS_FILE = "gpu_checks.json"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "loraflow-gpu-checks"
CHATS = 48
QUICK_CHATS = 24
SHORT_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}


def tiny_model(folder: Path, dtype: torch.dtype) -> Path:
    """A two-layer Llama with a word tokenizer (bench/gpu_train.py's), random weights, in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.gpu_train import SPECIAL_TOKENS, word_tokenizer

    vocab = 512
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    )
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    word_tokenizer(vocab).save_pretrained(folder)
    return folder


def chat_dataset(model_dir: Path, folder: Path, n: int = CHATS) -> Path:
    """Chats of varied lengths (so packing has work to do), built by loraflow's dataset code."""
    import random

    from loraflow.base_model import load_tokenizer
    from loraflow.dataset import build_dataset
    from loraflow.spec import FormatSpec
    from loraflow.templates import NAMED_TEMPLATES

    rng = random.Random(0)
    rows = []
    for i in range(n):
        words = lambda k: " ".join(f"t{rng.randrange(4, 512)}" for _ in range(k))  # noqa: E731
        messages = [
            {"role": "user", "content": words(6 + i % 5)},
            {"role": "assistant", "content": words(20 + 7 * (i % 9))},
        ]
        text = json.dumps(messages)
        rows.append(
            {
                "example_hash": hashlib.sha256(text.encode()).hexdigest(),
                "partition": "checks",
                "source_file": "checks",
                "record_index": i,
                "sub_index": 0,
                "messages": text,
                "text": None,
            }
        )
    fmt = FormatSpec(max_seq_len=256, eval_size=4)
    tokenizer = load_tokenizer(model_dir)
    return Path(build_dataset(rows, tokenizer, fmt, NAMED_TEMPLATES["zephyr"], "checks", folder).path)


class LayerDtypes:
    """The dtypes of the decoder layers' outputs while in the block."""

    def __enter__(self):
        import torch

        self.seen: set[str] = set()

        def record(module, args, output):
            if type(module).__name__.endswith("DecoderLayer"):
                self.seen.add(str((output[0] if isinstance(output, tuple) else output).dtype))

        self._handle = torch.nn.modules.module.register_module_forward_hook(record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def crash_paths(model_dir: Path, dataset_dir: Path, work: Path, lora_dtype: str = "bfloat16") -> list[dict]:
    import torch

    from loraflow.spec import LoraSpec, QuantizationSpec, TrainingSpec
    from loraflow.train import TrainingError, train_adapter

    common = dict(
        lora=LoraSpec(r=8, alpha=16, target_modules="all-linear"),
        max_steps=4,
        batch_size=2,
        learning_rate=1e-3,
        eval_every=2,
        checkpoint_every=2,
        log_every=1,
        dtype="bfloat16",
    )
    cases = {
        f"lora {SHORT_DTYPES[lora_dtype]}, sdpa, packed": (
            TrainingSpec(method="lora", attn_implementation="sdpa", **{**common, "dtype": lora_dtype}),
            256,
        ),
        "qlora bf16 compute, paged_adamw_8bit, gradient checkpointing": (
            TrainingSpec(
                method="qlora",
                quantization=QuantizationSpec(compute_dtype="bfloat16"),
                optimizer="paged_adamw_8bit",
                gradient_checkpointing=True,
                **common,
            ),
            None,
        ),
        "flash_attention_2, packed": (
            TrainingSpec(method="lora", attn_implementation="flash_attention_2", **common),
            256,
        ),
    }
    records = []
    for name, (spec, pack_to) in cases.items():
        record = {"check": f"crash path: {name}"}
        try:
            with LayerDtypes() as layers:
                result = train_adapter(
                    spec,
                    model_dir,
                    dataset_dir,
                    work / name.replace(" ", "_").replace(",", ""),
                    pack_to=pack_to,
                )
            losses = [loss for _, loss in result.loss_curve] + [loss for _, loss in result.eval_curve]
            record.update(
                ok=all(math.isfinite(x) for x in losses)
                and (not torch.cuda.is_available() or "cuda" in result.runtime),
                losses=result.loss_curve,
                eval_losses=result.eval_curve,
                runtime=result.runtime,
                decoder_output_dtypes=sorted(layers.seen),
                peak_memory_mb=result.peak_memory_mb,
                peak_reserved_mb=result.peak_reserved_mb,
            )
        except TrainingError as err:  # a setting that cannot run here: the message must say why
            record.update(ok=None, refused=str(err))
        except Exception as err:  # noqa: BLE001 - a crash is what this check is for
            record.update(
                ok=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-4000:]
            )
        records.append(record)
    return records


def packed_logits(model_dir: Path, dataset_dir: Path) -> dict:
    """Each example's logits, packed through the GPU's path, against the example alone."""
    import torch

    from loraflow.base_model import load_causal_lm
    from loraflow.dataset import load_split
    from loraflow.packing import collate_flat, collate_packed, pack_examples
    from loraflow.runtime import installed

    cuda = torch.cuda.is_available()
    attention = "flash_attention_2" if cuda and installed("flash_attn") else "sdpa"
    dtype = "bfloat16" if cuda else "float32"
    model = load_causal_lm(model_dir, dtype=dtype, attn_implementation=attention).eval()
    examples = load_split(dataset_dir, "train")[:12]
    rows = pack_examples(examples, 256)
    batch = collate_flat(rows) if attention == "flash_attention_2" else collate_packed(rows, 0)
    device = next(model.parameters()).device
    worst = 0.0
    with torch.no_grad():
        packed = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float()
        offset = 0
        for r, row in enumerate(rows):
            start = 0
            for segment in sorted(set(row.segment_ids)):
                n = row.segment_ids.count(segment)
                alone = (
                    model(input_ids=torch.tensor([row.input_ids[start : start + n]], device=device))
                    .logits[0]
                    .float()
                )
                mine = (
                    packed[0, offset + start : offset + start + n]
                    if attention == "flash_attention_2"
                    else packed[r, start : start + n]
                )
                worst = max(worst, float((mine - alone).abs().max() / alone.abs().max()))
                start += n
            if attention == "flash_attention_2":
                offset += len(row.input_ids)
    tolerance = 2e-2 if dtype == "bfloat16" else 1e-5
    return {
        "check": f"packed logits equal each example alone ({attention}, {dtype})",
        "ok": worst <= tolerance,
        "largest_relative_difference": worst,
        "tolerance": tolerance,
    }


def qlora_against_lora(model_dir: Path, dataset_dir: Path, work: Path) -> dict:
    """QLoRA's first-step loss on the same weights and data is close to LoRA's (4-bit rounding aside)."""
    from loraflow.spec import LoraSpec, TrainingSpec
    from loraflow.train import TrainingError, train_adapter

    first = {}
    for method in ("lora", "qlora"):
        spec = TrainingSpec(
            method=method, lora=LoraSpec(r=8, alpha=16), max_steps=1, batch_size=4, checkpoint_every=None
        )
        try:
            first[method] = train_adapter(spec, model_dir, dataset_dir, work / f"first-{method}").loss_curve[
                0
            ][1]
        except TrainingError as err:
            return {"check": "qlora first-step loss near lora's", "ok": None, "refused": str(err)}
    gap = abs(first["qlora"] - first["lora"]) / first["lora"]
    return {
        "check": "qlora first-step loss near lora's",
        "ok": gap < 0.05,
        "losses": first,
        "relative_gap": gap,
    }


def resume_continues(model_dir: Path, dataset_dir: Path, work: Path, steps: int = 6) -> dict:
    """A run stopped at step 3 resumes from its step-2 checkpoint and ends on the straight run's curve."""
    from loraflow.spec import LoraSpec, TrainingSpec
    from loraflow.train import train_adapter

    spec = TrainingSpec(
        method="lora", lora=LoraSpec(r=8, alpha=16), max_steps=steps, batch_size=2, checkpoint_every=2
    )
    straight = train_adapter(spec, model_dir, dataset_dir, work / "straight")

    def stop(figures):
        if figures["step"] == 3:
            raise KeyboardInterrupt("stopped on purpose")

    with contextlib.suppress(KeyboardInterrupt):
        train_adapter(spec, model_dir, dataset_dir, work / "resumed", progress=stop)
    resumed = train_adapter(spec, model_dir, dataset_dir, work / "resumed")
    a, b = [x for _, x in straight.loss_curve], [x for _, x in resumed.loss_curve]
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return {
        "check": "a resumed run continues the loss curve",
        "ok": resumed.resumed_from_step == 2 and worst < 1e-3,
        "resumed_from_step": resumed.resumed_from_step,
        "largest_loss_difference": worst,
    }


def figures(record: dict) -> str:
    """A record's figures in a few words, for its printed line."""
    parts = []
    if record.get("losses") and isinstance(record["losses"], list):
        parts.append(f"loss {record['losses'][0][1]:.4f} -> {record['losses'][-1][1]:.4f}")
    if record.get("eval_losses"):
        parts.append(f"eval loss {record['eval_losses'][-1][1]:.4f}")
    if record.get("decoder_output_dtypes"):
        parts.append(f"decoder outputs {', '.join(record['decoder_output_dtypes'])}")
    if "largest_relative_difference" in record:
        parts.append(
            f"largest relative difference {record['largest_relative_difference']:.2e} "
            f"(tolerance {record['tolerance']:.0e})"
        )
    if isinstance(record.get("losses"), dict):
        parts.append(", ".join(f"{k} loss {v:.4f}" for k, v in record["losses"].items()))
    if "relative_gap" in record:
        parts.append(f"gap {record['relative_gap']:.2%}")
    if "resumed_from_step" in record:
        parts.append(
            f"resumed from step {record['resumed_from_step']}, "
            f"largest loss difference {record['largest_loss_difference']:.2e}"
        )
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", help=f"the model, datasets and trainings (default {DEFAULT_WORK})")
    parser.add_argument("--out", default=os.environ.get("OUT"), help=f"where {RESULTS_FILE} goes")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_CHATS} chats, a temporary --work folder"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick and args.work is None:
        with tempfile.TemporaryDirectory(prefix="loraflow-gpu-checks-") as scratch:
            return run_checks(Path(scratch), args.out, quick=True, scratch=True)
    return run_checks(Path(args.work or DEFAULT_WORK), args.out, quick=args.quick)


def run_checks(work: Path, out: str | None, quick: bool = False, scratch: bool = False) -> int:
    """Every check on a tiny model in `work`; the records go to `out` (else `work`)."""
    import torch

    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    chats = QUICK_CHATS if quick else CHATS
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'CPU (the CUDA-only settings are refused)'}; "
        f"{chats} chats; work {work}",
        flush=True,
    )
    model_dir = tiny_model(work / "tiny", torch.bfloat16 if cuda else torch.float32)
    dataset_dir = chat_dataset(model_dir, work / "datasets", chats)
    lora_dtype = "float32" if quick and not cuda else "bfloat16"
    records = crash_paths(model_dir, dataset_dir, work / "crash", lora_dtype)
    checks = {
        "packed_logits": lambda: packed_logits(model_dir, dataset_dir),
        "qlora_against_lora": lambda: qlora_against_lora(model_dir, dataset_dir, work / "qlora_against_lora"),
        # --quick: 4 steps still stop at 3 and resume from the step-2 checkpoint
        "resume_continues": lambda: resume_continues(
            model_dir, dataset_dir, work / "resume_continues", steps=4 if quick else 6
        ),
    }
    for name, check in checks.items():
        try:
            records.append(check())
        except Exception as err:  # noqa: BLE001 - recorded, the other checks still run
            records.append({"check": name, "ok": False, "error": f"{type(err).__name__}: {err}"})
    for record in records:
        verdict = {True: "ok", False: "FAILED", None: "refused here"}[record["ok"]]
        detail = record.get("refused") or record.get("error") or record.get("runtime") or ""
        line = f"{verdict:>13}: {record['check']}" + (f" ({detail})" if detail else "")
        print(line + (f": {figures(record)}" if figures(record) else ""))
    out_dir = Path(out) if out else work
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_FILE
    results.write_text(json.dumps({"cuda": cuda, "checks": records}, indent=2, default=str))
    counts = {
        v: sum(r["ok"] is k for r in records) for k, v in ((True, "ok"), (None, "refused"), (False, "failed"))
    }
    where = f"{results} (removed with the scratch folder: --out keeps it)" if scratch and not out else results
    print(f"checks: {counts['ok']} ok, {counts['refused']} refused here, {counts['failed']} failed; {where}")
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
