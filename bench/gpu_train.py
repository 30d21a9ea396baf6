"""Benchmark: loraflow's trainer on a GPU. LoRA and QLoRA on Llama-shaped models of about 1B and 7B.

    python bench/gpu_train.py prepare --size 1b [--seq-len 1024] [--examples 144]
    python bench/gpu_train.py train --size 1b --method qlora [--batch-size 8] [--timed-steps 15] [...]
    python bench/gpu_train.py skip --size 7b --method lora --reason "..."
    python bench/gpu_train.py report [--out DIR]
    python bench/gpu_train.py --quick [--work DIR] [--out DIR]   # all four on the tiny size, in seconds

`bench/gpu.sh` runs these in order on a GPU machine, each in its own process, so every run starts
on an empty GPU and a crash or a timeout costs one row of the table, not the whole table.

- `prepare` builds a model from a Llama config with random weights (no download: the GPU machine
  has no network), saves it in bfloat16 safetensors with a generated word-level tokenizer whose
  vocabulary is the model's own, and writes a dataset of synthetic chats (a short question, a
  long answer) through loraflow's own `build_dataset`: every example is exactly `--seq-len`
  tokens, so batches have no padding and tokens/s counts only real tokens.
- `train` calls `loraflow.train.train_adapter` on that folder, as the `adapter` asset does (QLoRA
  quantizes to 4-bit NF4 on load). Tokens/s is measured over the timed steps only, after the
  untimed ones (CUDA start-up, kernel selection, allocator growth); peak memory is
  `torch.cuda.max_memory_allocated()` over the whole process: load and training.
- `report` prints the table with the date, GPU and library versions, and writes
  `gpu_results.json`.

Each run also records loraflow.plan's estimate beside the measured peak: on a GPU its allocated
peak (comparable to `torch.cuda.max_memory_allocated`, no CUDA context), on a CPU its process peak.
If the planner cannot estimate, the estimate is left out and the reason is recorded.

Sizes: `1b` has the shape of Llama 3.2 1B (grouped-query attention, a 128k vocabulary, tied
embeddings), `7b` that of Llama 2 7B, `8b` that of Llama 3 8B, `tiny` a few MB for trying the
script on a CPU (there, memory is the process's peak resident set size instead).

`--quick` runs the four commands in this one process on the tiny size, on a CPU as on a GPU:
`prepare` (sequences of 64 tokens), `train` for LoRA in packed rows of 256 and for QLoRA, 1 untimed
and 2 timed steps each, `skip` for a row the way bench/gpu.sh records one, then `report`. It works
in a temporary folder unless --work is given, and the test suite runs it.
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
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

MODEL_SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
LIBRARIES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "bitsandbytes",
    "accelerate",
    "liger-kernel",
    "flash-attn",
)
PEAK_BF16_FLOPS = 790e12
"""What this project's H200 measured for bf16 matrix products; MFU is against it."""
DEFAULT_WORK = Path(tempfile.gettempdir()) / "loraflow-gpu-bench"
RESULTS_FILE = "gpu_results.json"

log = logging.getLogger("bench.gpu_train")


# ---------------------------------------------------------------------------------------------
# prepare: a random-weight model folder and a dataset of exact-length examples


def word_tokenizer(vocab_size: int):
    """A fast tokenizer whose words are `t<id>`: the text `t17 t9` is exactly the ids 17 and 9."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    unk, bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad
    )


def build_model_folder(size: str, seq_len: int, target: Path, device: str, dtype: str) -> int:
    """Save a random-weight Llama of `size` with its tokenizer into `target`; its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraflow.artifacts import atomic_dir
    from loraflow.base_model import torch_dtype

    shape = MODEL_SHAPES[size]
    config = LlamaConfig(
        **shape,
        max_position_embeddings=max(2048, seq_len),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):  # built where it will train: a 7B model initializes in seconds on a GPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "built %s: %s parameters on %s in %.1fs", size, f"{params:,}", device, time.perf_counter() - started
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    needed = params * model.dtype.itemsize * 1.1
    if free < needed:
        raise RuntimeError(
            f"{target.parent}: {free / 2**30:.1f} GiB free, the {size} model needs {needed / 2**30:.1f} GiB; "
            "point WORK at a larger disk"
        )
    started = time.perf_counter()
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        word_tokenizer(shape["vocab_size"]).save_pretrained(tmp)
    log.info("saved %s to %s in %.1fs", size, target, time.perf_counter() - started)
    return params


PROMPT_WORDS = 8


def synthetic_rows(count: int, answer_words: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """Chat rows (a short question, a long answer) of random vocabulary words, shaped like
    validated examples."""
    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(first, vocab_size)}" for _ in range(n))

    rows = []
    for i in range(count):
        messages = [
            {"role": "user", "content": words(PROMPT_WORDS)},
            {"role": "assistant", "content": words(answer_words)},
        ]
        text = json.dumps(messages)
        rows.append(
            {
                "example_hash": hashlib.sha256(text.encode()).hexdigest(),
                "partition": "synthetic",
                "source_file": "synthetic",
                "record_index": i,
                "sub_index": 0,
                "messages": text,
                "text": None,
            }
        )
    return rows


def template_overhead(tokenizer, template: str) -> int:
    """Tokens the chat template adds to a conversation of one question and one answer."""
    from loraflow.formatting import tokenize_with_mask
    from loraflow.templates import using_template

    messages = [{"role": "user", "content": "t4 " * PROMPT_WORDS}, {"role": "assistant", "content": "t5"}]
    with using_template(tokenizer, template):
        return len(tokenize_with_mask(tokenizer, messages).input_ids) - PROMPT_WORDS - 1


def build_synthetic_dataset(
    model_dir: Path, datasets_dir: Path, examples: int, seq_len: int, vocab_size: int
):
    """`examples` train rows (plus one eval row) of exactly `seq_len` tokens, formatted, masked and
    stored by loraflow's own dataset code."""
    from loraflow.base_model import load_tokenizer, tokenizer_hash
    from loraflow.dataset import build_dataset
    from loraflow.spec import FormatSpec
    from loraflow.templates import NAMED_TEMPLATES

    tokenizer = load_tokenizer(model_dir)
    template = NAMED_TEMPLATES["zephyr"]
    answer_words = seq_len - PROMPT_WORDS - template_overhead(tokenizer, template)
    if answer_words < 1:
        raise SystemExit(
            f"--seq-len {seq_len} is too short for a question of {PROMPT_WORDS} words and an answer"
        )
    # "error": a length mistake stops here rather than skewing tokens/s with padding
    fmt = FormatSpec(max_seq_len=seq_len, overlong="error", eval_size=1)
    rows = synthetic_rows(examples + 1, answer_words, vocab_size)
    summary = build_dataset(
        rows, tokenizer, fmt, template, tokenizer_hash(model_dir), datasets_dir, template_source="zephyr"
    )
    lengths = set(summary.token_percentiles.values())
    if lengths != {seq_len} or summary.train_examples != examples:
        raise RuntimeError(
            f"the synthetic dataset is not {examples} examples of exactly {seq_len} tokens: "
            f"{summary.train_examples} train examples, token percentiles {summary.token_percentiles}"
        )
    return summary


def prepare(args) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.size != "tiny":
        raise SystemExit(f"size {args.size} needs a CUDA GPU; on a CPU try --size tiny")
    dtype = "bfloat16" if cuda else "float32"
    work = Path(args.work)
    model_dir = work / "models" / args.size
    prepared_file = work / f"prepared-{args.size}.json"
    if prepared_file.is_file():
        prepared = json.loads(prepared_file.read_text())
        if prepared["seq_len"] == args.seq_len and prepared["train_examples"] == args.examples:
            log.info("%s is prepared already: %s", args.size, prepared_file)
            return
    started = time.perf_counter()
    params = build_model_folder(args.size, args.seq_len, model_dir, "cuda" if cuda else "cpu", dtype)
    summary = build_synthetic_dataset(
        model_dir,
        work / "datasets" / args.size,
        args.examples,
        args.seq_len,
        MODEL_SHAPES[args.size]["vocab_size"],
    )
    prepared = {
        "size": args.size,
        "model_dir": str(model_dir),
        "dataset_dir": summary.path,
        "dtype": dtype,
        "params": params,
        "seq_len": args.seq_len,
        "train_examples": summary.train_examples,
        "seconds": round(time.perf_counter() - started, 1),
    }
    prepared_file.write_text(json.dumps(prepared, indent=2))
    log.info("prepared %s in %.1fs: %s", args.size, prepared["seconds"], prepared_file)


# ---------------------------------------------------------------------------------------------
# train: one loraflow training run, timed


def environment() -> dict:
    """The machine and library versions a run measured with."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_mib": round(torch.cuda.get_device_properties(0).total_memory / 2**20) if cuda else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "versions": library_versions(),
    }


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def unquantized_base_device(dtype: str) -> str:
    """Where loraflow's loader puts a model it does not quantize (LoRA's base), tried on a tiny one."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraflow.base_model import load_causal_lm

    with tempfile.TemporaryDirectory() as folder:
        config = LlamaConfig(**MODEL_SHAPES["tiny"])
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        return next(load_causal_lm(Path(folder), dtype=dtype).parameters()).device.type


def training_spec(method: str, dtype: str, args):
    """The TrainingSpec a pipeline YAML would give for this run."""
    from loraflow.spec import LoraSpec, QuantizationSpec, TrainingSpec

    liger = {"auto": "auto", "on": True, "off": False}[getattr(args, "liger", "off")]
    settings = dict(
        liger_kernel=liger,
        torch_compile=bool(getattr(args, "compile", False)),
        method=method,
        dtype=dtype,
        quantization=QuantizationSpec(compute_dtype=dtype) if method == "qlora" else None,
        lora=LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05, target_modules=args.target_modules),
        max_steps=args.untimed_steps + args.timed_steps,
        learning_rate=2e-4,
        warmup_steps=args.untimed_steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        seed=0,
        log_every=1,
        attn_implementation=getattr(args, "attn", "sdpa"),
        checkpoint_every=None,  # a checkpoint is disk time the table should not count
    )
    # newer spec fields are set only where the spec has them
    return TrainingSpec(**{k: v for k, v in settings.items() if k in TrainingSpec.model_fields})


def planned_peak(model_dir: Path, training, seq_len: int, cuda: bool) -> tuple[float | None, str]:
    """(loraflow.plan's peak estimate in MiB, or None; what it counts, or why there is none). On a GPU
    the allocated peak (what torch.cuda.max_memory_allocated measures), on a CPU the process peak."""
    try:
        plan = importlib.import_module("loraflow.plan")
    except ImportError as err:
        return None, f"no estimate ({err})"
    try:
        setup = plan.setup_from_training(
            training, seq_len=seq_len, padded=False, device="cuda" if cuda else "cpu"
        )
        estimate = plan.estimate_memory(plan.ModelShape.from_folder(model_dir), setup)
        if cuda:
            return round(estimate.allocated_mib, 1), "loraflow.plan: allocated peak, without CUDA context"
        return round(estimate.peak_mib, 1), "loraflow.plan: process peak, runtime included"
    except Exception as err:  # noqa: BLE001 - an estimate that cannot be had is recorded, not fatal
        return None, f"loraflow.plan gave no estimate: {type(err).__name__}: {err}"


def train(args) -> int:
    import torch

    from loraflow.train import train_adapter

    work = Path(args.work)
    variant = variant_of(args)
    record_file = run_record_file(work, args.size, args.method, variant)
    prepared_file = work / f"prepared-{args.size}.json"
    base = {"size": args.size, "method": args.method, "variant": variant, "started": now()}
    if not prepared_file.is_file():
        write_json(
            record_file, {**base, "status": "skipped", "reason": f"not prepared ({prepared_file} missing)"}
        )
        return 1
    prepared = json.loads(prepared_file.read_text())
    cuda = torch.cuda.is_available()
    dtype = prepared["dtype"]
    training = training_spec(args.method, dtype, args)
    if args.batch_size * training.max_steps > prepared["train_examples"]:
        log.warning("fewer prepared examples than steps x batch: later steps repeat examples")
    base.update(
        params=prepared["params"],
        seq_len=prepared["seq_len"],
        batch_size=args.batch_size,
        untimed_steps=args.untimed_steps,
        timed_steps=args.timed_steps,
        lora_r=args.lora_r,
        target_modules=args.target_modules,
        dtype=dtype,
        memory_measure="cuda max_memory_allocated" if cuda else "process peak RSS",
        environment=environment(),
    )
    # Written first: if the process is killed (timeout, host memory), the report still shows the row.
    write_json(
        record_file,
        {**base, "status": "unfinished", "reason": "the process ended before reporting; see gpu.log"},
    )

    if args.method == "lora" and cuda:
        device = unquantized_base_device(dtype)
        if device != "cuda":
            reason = (
                f"loraflow.base_model.load_causal_lm leaves an unquantized base on the {device} (no "
                "device_map unless quantizing), so LoRA would train there, not on the GPU"
            )
            write_json(record_file, {**base, "status": "skipped", "reason": reason})
            log.error("skipped %s %s: %s", args.size, args.method, reason)
            return 1

    planned_mib, plan_note = planned_peak(Path(prepared["model_dir"]), training, prepared["seq_len"], cuda)
    steps: list[tuple[float, int, float]] = []  # (time, tokens seen, loss) after each step

    def on_step(figures: dict) -> None:
        if cuda:  # the step's last kernels (the optimizer's) belong to it
            torch.cuda.synchronize()
        steps.append((time.perf_counter(), figures["tokens_seen"], figures["loss"]))

    kwargs = {"progress": on_step} if "progress" in inspect.signature(train_adapter).parameters else {}
    adapter_dir = work / "adapters" / f"{args.size}-{args.method}"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result = train_adapter(
            training,
            Path(prepared["model_dir"]),
            Path(prepared["dataset_dir"]),
            adapter_dir,
            pack_to=args.pack_to,
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 - the table reports a failed run, the log has the trace
        traceback.print_exc()
        write_json(
            record_file,
            {**base, **memory_peaks(cuda), "status": "failed", "reason": f"{type(err).__name__}: {err}"},
        )
        return 1
    wall = time.perf_counter() - started

    if len(steps) > args.untimed_steps >= 1:
        (t0, tokens0, _), (t1, tokens1, _) = steps[args.untimed_steps - 1], steps[-1]
        rate, timing = (tokens1 - tokens0) / (t1 - t0), f"steps {args.untimed_steps + 1}-{len(steps)}"
        seconds_per_step = (t1 - t0) / (len(steps) - args.untimed_steps)
        load_seconds = steps[0][0] - started
    else:  # no per-step times (or no untimed steps): the trainer's own figure over every step
        rate, timing = result.tokens_per_second, "all steps, untimed ones included"
        seconds_per_step, load_seconds = result.wall_seconds / result.steps, None
    status, reason = "ok", None
    peaks = memory_peaks(cuda)
    if cuda and peaks["peak_memory_mib"] < prepared["params"] / 2 / 2**20:
        status = "failed"
        reason = "peak GPU memory is below the size of the 4-bit weights: the model did not train on the GPU"
    mfu = None
    if cuda:
        from loraflow.plan import ModelShape, flops_per_token, setup_from_training

        setup = setup_from_training(
            training, seq_len=args.pack_to or prepared["seq_len"], padded=False, device="cuda"
        )
        per_token = flops_per_token(ModelShape.from_folder(Path(prepared["model_dir"])), setup)
        mfu = round(100 * rate * per_token.model / PEAK_BF16_FLOPS, 1)
    record = {
        **base,
        "status": status,
        "reason": reason,
        "tokens_per_second": round(rate, 1),
        "mfu_percent": mfu,
        "runtime": result.runtime,
        "timed_over": timing,
        "seconds_per_step": round(seconds_per_step, 3),
        **peaks,
        "planned_peak_mib": planned_mib,
        "plan_note": plan_note,
        "load_and_first_step_seconds": round(load_seconds, 1) if load_seconds is not None else None,
        "train_adapter_seconds": round(wall, 1),
        "trainer_tokens_per_second": result.tokens_per_second,
        "trainable_params": result.trainable_params,
        "first_loss": result.loss_curve[0][1],
        "final_loss": result.final_loss,
    }
    write_json(record_file, record)
    log.info(
        "%s %s: %.0f tokens/s, %.3f s/step, peak %.0f MiB",
        args.size,
        args.method,
        rate,
        seconds_per_step,
        record["peak_memory_mib"],
    )
    shutil.rmtree(adapter_dir, ignore_errors=True)
    return 0 if status == "ok" else 1


def memory_peaks(cuda: bool) -> dict:
    import resource

    import torch

    if not cuda:
        return {"peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    return {
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
    }


# ---------------------------------------------------------------------------------------------
# records and the report


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_record_file(work: Path, size: str, method: str, variant: str = "") -> Path:
    return work / "runs" / f"{size}-{method}{'-' + variant if variant else ''}.json"


def variant_of(args) -> str:
    """The run's options besides size and method, as a name: liger on, compile, packing."""
    parts = []
    if getattr(args, "liger", "off") != "off":
        parts.append(f"liger-{args.liger}")
    if getattr(args, "compile", False):
        parts.append("compile")
    if getattr(args, "pack_to", None):
        parts.append(f"packed{args.pack_to}")
    return "-".join(parts)


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def skip(args) -> int:
    record = {
        "size": args.size,
        "method": args.method,
        "started": now(),
        "status": "skipped",
        "reason": args.reason,
    }
    record["variant"] = variant_of(args)
    write_json(run_record_file(Path(args.work), args.size, args.method, record["variant"]), record)
    return 0


def report(args) -> int:
    """Print the table and write gpu_results.json; exit status 1 unless every run is ok."""
    work = Path(args.work)
    runs = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*.json"))]
    order = {size: i for i, size in enumerate(MODEL_SHAPES)}
    runs.sort(key=lambda r: (order.get(r["size"], 99), r["method"]))
    env = next((r["environment"] for r in runs if r.get("environment")), None)
    env = env or {
        "gpu": None,
        "cuda": None,
        "python": platform.python_version(),
        "versions": library_versions(),
    }
    settings = next((r for r in runs if "seq_len" in r), {})
    lines = [
        f"loraflow GPU bench, {now()}",
        f"GPU: {env['gpu'] or 'none (CPU)'}"
        + (f" ({env['gpu_memory_mib']} MiB)" if env.get("gpu_memory_mib") else "")
        + f", CUDA {env['cuda']}, Python {env['python']}",
        ", ".join(f"{name} {version}" for name, version in env["versions"].items()),
    ]
    if settings:
        lines.append(
            f"sequence {settings['seq_len']} tokens, batch {settings['batch_size']}, "
            f"{settings['timed_steps']} timed steps after {settings['untimed_steps']} untimed, "
            f"LoRA r={settings['lora_r']} on {settings['target_modules']}, {settings['dtype']}; "
            f"memory is {settings['memory_measure']}"
        )
    lines += [
        "",
        "| model | params | method | options | tokens/s | MFU % | s/step | peak MiB | reserved MiB | planned MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cells = [
            r["size"],
            _params(r.get("params")),
            r["method"],
            r.get("variant") or "-",
            _figure(r.get("tokens_per_second"), "{:,.0f}"),
            _figure(r.get("mfu_percent"), "{:.1f}"),
            _figure(r.get("seconds_per_step"), "{:.3f}"),
            _figure(r.get("peak_memory_mib"), "{:,.0f}"),
            _figure(r.get("peak_reserved_mib"), "{:,.0f}"),
            _figure(r.get("planned_peak_mib"), "{:,.0f}"),
            r["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{r['size']} {r['method']} {r['status']}: {r['reason']}" for r in runs if r.get("reason")]
    notes += [
        f"planned MiB: {note}" for note in dict.fromkeys(r["plan_note"] for r in runs if r.get("plan_note"))
    ]
    lines += [""] + notes if notes else []
    print("\n".join(lines))

    results = {"date": now(), "environment": env, "runs": runs}
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS_FILE, results)
    return 0 if runs and all(r["status"] == "ok" for r in runs) else 1


def _params(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


def _figure(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per step of bench/gpu.sh, or --quick alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help=f"models, datasets and run records ({DEFAULT_WORK})")
    parser.add_argument(
        "--quick", action="store_true", help="prepare, train, skip and report on the tiny size, in seconds"
    )
    parser.add_argument(
        "--out",
        dest="quick_out",
        metavar="DIR",
        help="--quick: where gpu_results.json goes ($OUT, else --work)",
    )
    commands = parser.add_subparsers(dest="command")

    p = commands.add_parser("prepare", help="build the model folder and dataset of one size")
    p.add_argument("--size", choices=MODEL_SHAPES, required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--examples", type=int, default=144, help="train examples (steps x batch needs)")

    t = commands.add_parser("train", help="one timed training run")
    t.add_argument("--size", choices=MODEL_SHAPES, required=True)
    t.add_argument("--method", choices=("lora", "qlora"), required=True)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--untimed-steps", type=int, default=3)
    t.add_argument("--timed-steps", type=int, default=15)
    t.add_argument("--lora-r", type=int, default=16)
    t.add_argument("--target-modules", default="all-linear", help="all-linear or a comma-separated list")
    t.add_argument("--pack-to", type=int, default=None, help="pack examples into rows of this many tokens")
    t.add_argument("--liger", choices=("off", "on", "auto"), default="off", help="Liger's kernels")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--attn", default="sdpa", help="sdpa, eager, flash_attention_2 or auto")

    s = commands.add_parser("skip", help="record a run as skipped")
    s.add_argument("--size", choices=MODEL_SHAPES, required=True)
    s.add_argument("--method", choices=("lora", "qlora"), required=True)
    s.add_argument("--reason", required=True)
    s.add_argument("--pack-to", type=int, default=None)
    s.add_argument("--liger", choices=("off", "on", "auto"), default="off")
    s.add_argument("--compile", action="store_true")

    r = commands.add_parser("report", help="print the table and write gpu_results.json")
    r.add_argument("--out", default=os.environ.get("OUT"), help="where gpu_results.json goes")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick == (args.command is not None):
        parser.error("give one command (prepare, train, skip, report), or --quick alone")
    if args.quick_out is not None and not args.quick:
        parser.error("--out before a command belongs to --quick; report takes its own --out after it")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        out = args.quick_out or os.environ.get("OUT")
        if args.work is not None:
            return quick(Path(args.work), out)
        with tempfile.TemporaryDirectory(prefix="loraflow-gpu-bench-quick-") as scratch:
            return quick(Path(scratch), out)
    args.work = args.work or str(DEFAULT_WORK)
    if getattr(args, "target_modules", "all-linear") != "all-linear":
        args.target_modules = args.target_modules.split(",")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.command == "prepare":
        prepare(args)
        return 0
    return {"train": train, "skip": skip, "report": report}[args.command](args)


QUICK_RUNS = (
    ("train", "lora", ["--pack-to", "256"]),
    ("train", "qlora", []),
    ("skip", "lora", ["--liger", "on", "--reason", "quick mode: a row recorded as skipped"]),
)


def quick(work: Path, out: str | None) -> int:
    """Every command on the tiny size through the same command line bench/gpu.sh uses; exit status 0
    when each did what it should: two trained rows ok, the skipped row skipped, the report written."""
    shutil.rmtree(work / "runs", ignore_errors=True)
    common = ["--work", str(work)]
    failed = []
    if main([*common, "prepare", "--size", "tiny", "--seq-len", "64", "--examples", "12"]) != 0:
        failed.append("prepare")
    steps = ["--batch-size", "2", "--untimed-steps", "1", "--timed-steps", "2"]
    for command, method, options in QUICK_RUNS:
        argv = [*common, command, "--size", "tiny", "--method", method, *options]
        if main(argv + steps if command == "train" else argv) != 0:
            failed.append(f"{command} {method}")
    out_dir = Path(out) if out else work
    main([*common, "report", "--out", str(out_dir)])  # 1: the skipped row is not ok, as it should be
    runs = json.loads((out_dir / RESULTS_FILE).read_text())["runs"]
    statuses = sorted((r["method"], r.get("variant") or "-", r["status"]) for r in runs)
    expected = [("lora", "liger-on", "skipped"), ("lora", "packed256", "ok"), ("qlora", "-", "ok")]
    if statuses != expected:
        failed.append(f"report rows {statuses}, expected {expected}")
    print(f"quick: {'FAILED: ' + '; '.join(failed) if failed else 'ok'} ({len(runs)} rows)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
