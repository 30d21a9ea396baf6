"""`python -m loraflow.plan`: the guide's tables beside the planner's estimates, or one pipeline's plan.

python -m loraflow.plan                         # the guide's memory and cost tables, recomputed
python -m loraflow.plan pipelines/defs/demo/defs.yaml     # that pipeline: memory, fit, time and cost
    [--dataset DIR] [--tokens N] [--gpu A100] [--price 3.0] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraflow.plan.cost import ACCELERATORS, accelerator, dataset_summary
from loraflow.plan.guide import report
from loraflow.plan.memory import GIB
from loraflow.plan.pipeline import base_model_folder, estimate_for_spec, latest_dataset, time_for_spec
from loraflow.plan.preflight import FreeMemory, available_system_memory, preflight
from loraflow.plan.shapes import ModelShape, PlanError
from loraflow.spec import SpecError, load_spec


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies under it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def pipeline_report(args: argparse.Namespace) -> str:
    spec = load_spec(args.pipeline)
    gpu = accelerator(args.gpu or spec.plan.gpu)
    device = args.device or ("cpu" if gpu.name == "CPU" else "cuda")
    model_dir = base_model_folder(spec)
    dataset_dir = Path(args.dataset) if args.dataset else latest_dataset(spec)
    out = [
        f"### Plan for pipeline {spec.name} ({args.pipeline})",
        "",
        f"- model: {ModelShape.from_folder(model_dir).describe()}",
    ]
    if dataset_dir is not None:
        s = dataset_summary(dataset_dir)
        out.append(
            f"- dataset: {_shown(dataset_dir)} ({s['train_examples']:,} train examples, {s['train_tokens']:,} tokens, "
            f"longest {s['token_percentiles'].get('p100')} tokens, {s['trainable_tokens'] / max(1, s['train_tokens']):.0%} trained)"
        )
    else:
        out.append(
            "- dataset: none built yet; the estimate assumes rows of format.max_seq_len with every token trained"
        )
    estimate = estimate_for_spec(spec, model_dir, dataset_dir, device=device)
    out.append(f"- settings: {estimate.setup.describe()}")
    if spec.training.start_from:
        out.append(
            f"- start_from {spec.training.start_from}: that adapter's method and shape decide what trains; the "
            "estimate assumes they are this pipeline's training.adapter settings"
        )
    out += ["", estimate.table("GiB"), ""]
    if device == "cpu":
        free = FreeMemory(available_system_memory(), "this machine (MemAvailable)")
    else:
        memory = spec.plan.gpu_memory_gib or gpu.memory_gib
        free = FreeMemory(round(memory * GIB), f"an empty {gpu.name} ({memory:g} GiB)")
    try:
        preflight(estimate, free.bytes, free.where)
        out.append(f"Fits: {estimate.peak / GIB:,.1f} GiB of {free.bytes / GIB:,.1f} GiB on {free.where}.")
    except PlanError as err:
        out.append(str(err))
    out.append("")
    try:
        time = time_for_spec(
            spec, model_dir, dataset_dir, tokens=args.tokens, gpu=gpu.name, price_per_hour=args.price
        )
        out.append(f"Time and cost: {time.describe()}.")
        out.append(
            f"Assumed utilisation: {gpu.note}; {gpu.utilisation:.0%} of peak (QLoRA: three quarters of it)."
        )
    except PlanError as err:
        out.append(f"Time and cost: {err}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraflow.plan", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?", help="a pipeline YAML; without it, the guide's tables")
    parser.add_argument("--dataset", help="a training dataset folder (default: the pipeline's newest)")
    parser.add_argument("--tokens", type=float, help="tokens to train, instead of the dataset's")
    parser.add_argument("--gpu", choices=list(ACCELERATORS), help="default: the YAML's plan.gpu")
    parser.add_argument(
        "--price", type=float, help="price per GPU-hour (default: the YAML's plan.price_per_hour)"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), help="estimate for this device (default: from --gpu)"
    )
    args = parser.parse_args(argv)
    try:
        print(pipeline_report(args) if args.pipeline else report())
    except (PlanError, SpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
