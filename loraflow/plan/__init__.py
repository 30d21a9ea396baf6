"""Will it fit, how long, how much: a training run planned before any GPU is spent.

    shapes     a Llama-style model's shape, from config.json or a named size (7B, 13B, 70B, ...)
    memory     the itemized peak memory of a training step (weights, LoRA, gradients, optimizer,
               activations, overhead), each formula in its docstring
    cost       FLOPs per token, hours and cost on a named GPU
    pipeline   the same for a pipeline YAML, its base model and its training dataset
    preflight  the device's free memory, and a clear error with the settings that would fit
    guide      the fine-tuning guide's tables recomputed (python -m loraflow.plan)

Before training (no model is loaded, only config.json and the dataset's summary.json are read):

    estimate = check_fits(spec, base_model_dir, dataset_dir)   # raises PlanError if it cannot fit
    estimate = check_training_fits(training, base_model_dir, dataset_dir, pack_to)   # the same, in a worker
"""

from loraflow.plan.cost import ACCELERATORS, TimeEstimate, estimate_time, flops_per_token
from loraflow.plan.memory import MemoryEstimate, Setup, estimate_memory, layer_activation_terms
from loraflow.plan.pipeline import (
    check_fits,
    check_training_fits,
    estimate_for_spec,
    estimate_training,
    setup_from_training,
    time_for_spec,
)
from loraflow.plan.preflight import FreeMemory, fitting_alternatives, free_memory, preflight
from loraflow.plan.shapes import NAMED_SHAPES, ModelShape, PlanError, model_shape

__all__ = [
    "ACCELERATORS",
    "NAMED_SHAPES",
    "FreeMemory",
    "MemoryEstimate",
    "ModelShape",
    "PlanError",
    "Setup",
    "TimeEstimate",
    "check_fits",
    "check_training_fits",
    "estimate_for_spec",
    "estimate_memory",
    "estimate_training",
    "estimate_time",
    "fitting_alternatives",
    "flops_per_token",
    "free_memory",
    "layer_activation_terms",
    "model_shape",
    "preflight",
    "setup_from_training",
    "time_for_spec",
]
