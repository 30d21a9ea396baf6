"""The shape of a Llama-style decoder, from a model's config.json or a named size.

Everything the planner counts follows from these numbers: the parameters of each layer, which
linear layers an adapter can target and their input and output widths, and the widths of the
tensors a training step keeps for the backward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of one decoder layer, by the names LoRA's `target_modules` uses."""


class PlanError(ValueError):
    """A plan that cannot be made, or a run that will not fit: what, where, and what to change."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: embeddings, `num_layers` identical layers (RMSNorm, attention with
    q/k/v/o projections and rotary positions, RMSNorm, a gated MLP of gate/up/down projections),
    a final RMSNorm and an output head (tied to the embeddings or not)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    checkpoint_bytes: int | None = None
    """Size of the folder's *.safetensors files, when read from a folder."""
    checkpoint_dtype: str | None = None
    """The dtype config.json says the weights are stored in, when it says."""

    @property
    def q_dim(self) -> int:
        """Width of the query projection (and of the attention output): heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections: key-value heads x head_dim (smaller with GQA)."""
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(input width, output width) of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of one layer's linear layers: in x out summed over q, k, v, o, gate, up, down."""
        return sum(i * o for i, o in self.linears().values())

    @property
    def other_params_per_layer(self) -> int:
        """One layer's parameters outside the linear weights: two RMSNorm weights (2 x hidden) and
        the biases when the config has them (q, k, v with attention_bias; the MLP's with mlp_bias)."""
        bias = (self.q_dim + 2 * self.kv_dim + self.hidden_size) if self.attention_bias else 0
        if self.mlp_bias:
            bias += 2 * self.intermediate_size + self.hidden_size
        return 2 * self.hidden_size + bias

    @property
    def embedding_params(self) -> int:
        """The input embeddings: vocab x hidden."""
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """The output head's own weights: vocab x hidden, or 0 when tied to the embeddings."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def quantizable_params(self) -> int:
        """Weights a 4- or 8-bit load quantizes: every decoder layer's linear weights. Embeddings,
        norms and the output head stay in floating point."""
        return self.num_layers * self.linear_params_per_layer

    @property
    def unquantized_params(self) -> int:
        """Everything else: embeddings, norms, biases, the final norm and an untied head."""
        return (
            self.embedding_params
            + self.head_params
            + self.num_layers * self.other_params_per_layer
            + self.hidden_size
        )

    @property
    def params(self) -> int:
        """All parameters, as `sum(p.numel() for p in model.parameters())` counts them."""
        return self.quantizable_params + self.unquantized_params

    def describe(self) -> str:
        return (
            f"{self.name}: {self.params / 1e9:.2f}B parameters, {self.num_layers} layers, hidden "
            f"{self.hidden_size}, MLP {self.intermediate_size}, {self.num_heads} heads "
            f"({self.num_kv_heads} key-value), vocabulary {self.vocab_size:,}"
            + (", tied embeddings" if self.tie_embeddings else "")
        )

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> ModelShape:
        """The shape from a Hugging Face config.json's keys (Llama, Mistral, Qwen2 and other models
        with the same layer layout). Mixture-of-experts models are refused: their MLP is not one."""
        if any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise PlanError(
                f"{name}: a mixture-of-experts model ({config.get('model_type')}); the planner knows "
                "dense Llama-style decoders only"
            )
        needed = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [k for k in needed if not isinstance(config.get(k), int)]
        if missing:
            raise PlanError(
                f"{name}: config.json lacks {', '.join(missing)}; the planner reads Llama-style configs "
                f"(model_type {config.get('model_type')!r}). Give a named size (7B, 13B, 70B) instead"
            )
        heads = config["num_attention_heads"]
        return cls(
            name=name,
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelShape:
        """The shape of the model in a folder, from its config.json."""
        path = Path(folder) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PlanError(f"{path}: no config.json; is {folder} a model folder?") from None
        except (OSError, json.JSONDecodeError) as err:
            raise PlanError(f"{path}: cannot read the model config: {err}") from None
        shape = cls.from_config(config, name=Path(folder).name)
        stored = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        dtype = config.get("dtype") or config.get("torch_dtype")
        return replace(shape, checkpoint_bytes=stored or None, checkpoint_dtype=dtype)


# Published shapes of the Llama family, so the guide's sizes can be planned without a download.
NAMED_SHAPES: dict[str, ModelShape] = {
    "1B": ModelShape("1B (Llama 3.2 1B shape)", 2048, 8192, 16, 32, 8, 64, 128256, True),
    "7B": ModelShape("7B (Llama 2 7B shape)", 4096, 11008, 32, 32, 32, 128, 32000, False),
    "8B": ModelShape("8B (Llama 3 8B shape)", 4096, 14336, 32, 32, 8, 128, 128256, False),
    "13B": ModelShape("13B (Llama 2 13B shape)", 5120, 13824, 40, 40, 40, 128, 32000, False),
    "65B": ModelShape("65B (LLaMA 65B shape)", 8192, 22016, 80, 64, 64, 128, 32000, False),
    "70B": ModelShape("70B (Llama 2 70B shape)", 8192, 28672, 80, 64, 8, 128, 32000, False),
}


def model_shape(model: str | Path | ModelShape) -> ModelShape:
    """A shape from a named size (7B, 13B, 70B, ...), a model folder, or a shape already."""
    if isinstance(model, ModelShape):
        return model
    named = NAMED_SHAPES.get(str(model).upper())
    if named is not None:
        return named
    if Path(model).is_dir():
        return ModelShape.from_folder(model)
    raise PlanError(
        f"{model!r} is neither a named size ({', '.join(NAMED_SHAPES)}) nor a model folder with a config.json"
    )
