"""Will it fit, how long, how much: a training run planned before any GPU is spent."""

from loraflow.plan.memory import MemoryEstimate, Setup, estimate_memory, layer_activation_terms
from loraflow.plan.shapes import NAMED_SHAPES, ModelShape, PlanError, model_shape

__all__ = [
    "NAMED_SHAPES",
    "MemoryEstimate",
    "ModelShape",
    "PlanError",
    "Setup",
    "estimate_memory",
    "layer_activation_terms",
    "model_shape",
]
