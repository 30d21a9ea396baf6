"""The adapter methods on a tiny Llama: AdaLoRA moves its rank budget (and resumes exactly), IA3
trains its vectors alone and merges, prefix tuning publishes the adapter beside its named base, the
4-bit base takes IA3 and AdaLoRA, and the planner counts what PEFT builds."""

from __future__ import annotations

import json

import pytest
from conftest import autograd_saved_bytes
from test_training import dataset

from loraflow.adapters import (
    ADALORA_STATE,
    adalora_schedule,
    adapter_method,
    adapter_regularization,
    attach_adapter,
    orthogonality_penalty,
    saved_adalora_ranks,
)
from loraflow.runtime import TrainingError
from loraflow.spec import AdaLoraSpec, LoraSpec, PrefixSpec, TrainingSpec
from loraflow.train import TRAINING_RECORD, train_adapter

SHORT = dict(method="lora", max_steps=4, batch_size=4, learning_rate=1e-2, checkpoint_every=None)
ADALORA = TrainingSpec(
    **{**SHORT, "max_steps": 10, "checkpoint_every": 4},
    adapter="adalora",
    lora=LoraSpec(alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    adalora=AdaLoraSpec(init_r=6, target_r=2),
)
IA3 = TrainingSpec(**SHORT, adapter="ia3")
PREFIX = TrainingSpec(**SHORT, adapter="prefix", prefix=PrefixSpec(num_virtual_tokens=8))


@pytest.fixture(scope="module")
def data(tokenizer, tmp_path_factory):
    return dataset(tokenizer, tmp_path_factory.mktemp("adapters") / "datasets", tokenizer.chat_template)


@pytest.fixture(scope="module")
def adalora(tiny_model_dir, data, tmp_path_factory):
    return train_adapter(ADALORA, tiny_model_dir, data.path, tmp_path_factory.mktemp("adalora") / "adapter")


@pytest.fixture(scope="module")
def ia3(tiny_model_dir, data, tmp_path_factory):
    return train_adapter(IA3, tiny_model_dir, data.path, tmp_path_factory.mktemp("ia3") / "adapter")


@pytest.fixture(scope="module")
def prefix(tiny_model_dir, data, tmp_path_factory):
    return train_adapter(PREFIX, tiny_model_dir, data.path, tmp_path_factory.mktemp("prefix") / "adapter")


def record_of(result) -> dict:
    from pathlib import Path

    return json.loads((Path(result.adapter_dir) / TRAINING_RECORD).read_text())["adapter"]


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def probe_ids(tokenizer):
    return tokenizer("A probe for the published model.", return_tensors="pt")["input_ids"]


# ---------------------------------------------------------------------------------------------
# AdaLoRA


def test_adalora_moves_its_rank_budget_between_layers_and_the_record_says_where(
    adalora, tiny_model_dir, tmp_path
):
    from pathlib import Path

    from loraflow.merge import merge_adapter, published_record

    adapter_dir = Path(adalora.adapter_dir)
    assert adapter_method(adapter_dir) == "adalora"
    record = record_of(adalora)
    ranks = record["ranks"]
    assert len(ranks) == 2 * 3  # two layers x q, v, down
    # every layer started at init_r 6; the budget moved: ranks differ between layers, none is 6 any more
    assert len(set(ranks.values())) > 1 and max(ranks.values()) < 6
    assert record["initial_budget"] == 36 and record["target_budget"] == 12
    assert 10 <= record["budget"] <= 12 == record["target_budget"]  # down to target_r per layer on average
    assert (record["tinit"], record["tfinal"], record["total_step"]) == (1, 2, 10)  # a tenth, a fifth
    # the saved adapter is cut to those ranks, and its config keeps the pattern PEFT reloads it with
    assert saved_adalora_ranks(adapter_dir) == ranks
    pattern = json.loads((adapter_dir / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted(sum(kept) for kept in pattern.values()) == sorted(ranks.values())

    published = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "models", "v1", "float32", "# card\n")
    assert published.merge_max_abs_diff <= 1e-3 and published.adapter_effect > 0
    assert published_record(Path(published.path))["adapter_method"] == "adalora"


def test_an_adalora_run_resumes_to_the_same_ranks_and_weights_bit_for_bit(
    adalora, tiny_model_dir, data, tmp_path
):
    import torch
    from safetensors.torch import load_file

    def crash_at_step_5(figures: dict) -> None:
        if figures["step"] == 5:
            raise KeyboardInterrupt("the machine went away")

    with pytest.raises(KeyboardInterrupt):
        train_adapter(ADALORA, tiny_model_dir, data.path, tmp_path / "resumed", progress=crash_at_step_5)
    checkpoint = tmp_path / "resumed.checkpoints" / "checkpoint-4"
    assert (checkpoint / ADALORA_STATE).is_file()  # the allocator's scores, which PEFT keeps in memory only

    resumed = train_adapter(ADALORA, tiny_model_dir, data.path, tmp_path / "resumed")
    assert resumed.resumed_from_step == 4
    assert resumed.loss_curve == adalora.loss_curve
    assert record_of(resumed)["ranks"] == record_of(adalora)["ranks"]
    a = load_file(f"{adalora.adapter_dir}/adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_orthogonality_penalty_is_the_term_peft_adds_to_a_loss_with_labels(tokenizer, tiny_model_dir):
    """loraflow's loss passes no labels, so PEFT never adds the term itself; ours must be PEFT's."""
    import torch
    from transformers import AutoModelForCausalLM

    model = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ADALORA, total_steps=10)
    ids = probe_ids(tokenizer)
    config = model.peft_config["default"]
    assert config.orth_reg_weight == 0  # so TRL's fused-head path, which passes labels, cannot count it twice
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss
        config.orth_reg_weight = ADALORA.adalora.orth_reg_weight
        with_term = model(input_ids=ids, labels=ids).loss
    term = adapter_regularization(ADALORA)(model)
    assert float(term) > 0
    assert float(term) == pytest.approx(float(with_term - plain), rel=1e-5)
    term.backward()  # and it trains the P and Q matrices
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n
    )
    assert adapter_regularization(IA3) is None and orthogonality_penalty(model, 0.0) is None


def test_an_adalora_schedule_without_a_budgeting_phase_names_the_keys_to_change():
    assert adalora_schedule(AdaLoraSpec(), 2) == (0, 1)  # even two steps reallocate once
    assert adalora_schedule(AdaLoraSpec(), 100) == (10, 20)
    with pytest.raises(
        TrainingError,
        match=r"training.adalora: tinit 5 .* tfinal 5 .* no step of 8 .*\(tinit 5, tfinal 5 set in",
    ):
        adalora_schedule(AdaLoraSpec(tinit=5, tfinal=5), 8)
    with pytest.raises(TrainingError, match=r"training.max_steps or epochs.*at least 2 steps"):
        adalora_schedule(AdaLoraSpec(), 1)


# ---------------------------------------------------------------------------------------------
# IA3


def test_ia3_trains_its_vectors_alone_and_publishes_merged_weights(ia3, tokenizer, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraflow.merge import merge_adapter, published_record

    assert adapter_method(ia3.adapter_dir) == "ia3" and record_of(ia3)["method"] == "ia3"
    vectors = load_file(f"{ia3.adapter_dir}/adapter_model.safetensors")
    assert all(".ia3_l" in name for name in vectors)  # nothing else was trained or saved
    # two layers x (k_proj's and v_proj's outputs, 32 each, and down_proj's input, 128)
    assert sum(v.numel() for v in vectors.values()) == ia3.trainable_params == 2 * (32 + 32 + 128)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in vectors.values())  # they start at 1

    published = merge_adapter(
        tiny_model_dir, ia3.adapter_dir, tmp_path / "models", "v1", "float32", "# card\n"
    )
    folder = tmp_path / "models" / "v1"
    assert (folder / "model.safetensors").is_file() and published_record(folder)["merged"] is True
    merged = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no peft
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ia3.adapter_dir)
    ids = probe_ids(tokenizer)
    assert torch.allclose(logits(merged, ids), logits(tuned, ids), atol=1e-4)
    assert published.adapter_effect > 0


# ---------------------------------------------------------------------------------------------
# prefix tuning


def test_prefix_tuning_publishes_the_adapter_alone_loadable_on_its_named_base(
    prefix, ia3, tokenizer, tiny_model_dir, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.export import ExportError, export_gguf
    from loraflow.merge import (
        MergeError,
        load_published_model,
        merge_in_memory,
        merge_verdict,
        publish_version,
        published_record,
        write_published,
    )
    from loraflow.model_card import render_model_card

    assert adapter_method(prefix.adapter_dir) == "prefix" and record_of(prefix)["mergeable"] is False
    # two layers x 2 (key, value) x 8 virtual tokens x the key-value width, 32
    assert prefix.trainable_params == 2 * 2 * 8 * 32
    card = render_model_card(
        pipeline="triage",
        description="",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        base_model_hash="abc123",
        license="apache-2.0",
        sources=[],
        dataset_version="d1",
        training_config=PREFIX.model_dump(mode="json"),
        code_version="c1",
        eval_table="",
        adapter_method=adapter_method(prefix.adapter_dir),
    )
    merged = merge_in_memory(tiny_model_dir, prefix.adapter_dir, "bfloat16")
    verdict = merge_verdict(merged.fidelity)
    assert not merged.merged and verdict.passed and merged.fidelity.changed
    version = publish_version(prefix.adapter_dir, "abc123", "bfloat16")
    assert version == publish_version(prefix.adapter_dir, "abc123", "float32")  # no weights: no dtype
    models = tmp_path / "models"
    record = {"base_model": str(tiny_model_dir), "base_model_hash": "abc123"}
    write_published(merged, prefix.adapter_dir, models, version, card, record=record, verdict=verdict)

    folder = models / version
    assert not list(folder.glob("*.safetensors"))  # no merged weights
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    saved = published_record(folder)
    assert saved["merged"] is False and saved["adapter_method"] == "prefix"
    assert saved["base_model"] == str(tiny_model_dir) and saved["base_model_hash"] == "abc123"
    readme = " ".join((folder / "README.md").read_text().split())
    assert "They are not a change to any weight, so they cannot be merged into the base's weights" in readme
    assert (
        "library_name: peft" in readme and 'PeftModel.from_pretrained(base, "<this hub repository>"' in readme
    )

    # the published adapter on the named base gives the tuned logits, which are not the base's
    ids = probe_ids(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits(base, ids)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), prefix.adapter_dir
    )
    reloaded = PeftModel.from_pretrained(base, folder / "adapter")
    assert torch.equal(logits(reloaded, ids), logits(tuned, ids))
    assert not torch.allclose(logits(tuned, ids), base_logits)
    assert torch.equal(logits(load_published_model(folder, tiny_model_dir), ids), logits(tuned, ids))
    with pytest.raises(MergeError, match="holds a prefix adapter alone .* load it on its base model"):
        load_published_model(folder)

    # llama.cpp and Ollama take merged weights only: the export refuses before converting anything
    with pytest.raises(ExportError, match="cannot be merged .* Remove gguf from publish.exports"):
        export_gguf(folder, "triage", ["q8_0"], merged, [], 4, None)
    assert not list(folder.glob("*.gguf"))

    # a retrain with another method is scored against this published version (must_beat_published):
    # PEFT cannot hold an IA3 and a prefix adapter at once, so the published one is loaded on its own
    from loraflow.evaluate import evaluate_adapter
    from loraflow.spec import EvaluationSpec, ForgettingSpec

    spec = EvaluationSpec(max_examples=4, max_new_tokens=2, forgetting=ForgettingSpec(enabled=False))
    heldout = dataset(tokenizer, tmp_path / "heldout", tokenizer.chat_template, eval_size=4).path
    report = evaluate_adapter(tiny_model_dir, ia3.adapter_dir, heldout, spec, published_dir=folder)
    alone = evaluate_adapter(tiny_model_dir, prefix.adapter_dir, heldout, spec)
    assert report.published.metrics["eval_loss"] == pytest.approx(alone.tuned.metrics["eval_loss"], abs=1e-6)
    assert report.tuned.metrics["eval_loss"] != report.published.metrics["eval_loss"]


# ---------------------------------------------------------------------------------------------
# a 4-bit base


def test_qlora_takes_ia3_and_adalora_on_a_4bit_base(tiny_model_dir, data, tmp_path):
    from loraflow.base_model import load_causal_lm
    from loraflow.merge import merge_adapter
    from loraflow.spec import QuantizationSpec

    for spec, layer in ((ADALORA, "SVDLinear4bit"), (IA3, "Linear4bit")):
        base = load_causal_lm(tiny_model_dir, quantization=QuantizationSpec(), compute_dtype="float32")
        model = attach_adapter(base, spec.model_copy(update={"method": "qlora"}), total_steps=10)
        adapted = {type(m).__name__ for n, m in model.named_modules() if n.endswith(("v_proj", "down_proj"))}
        assert adapted == {layer}, adapted  # PEFT's own layer over bitsandbytes' 4-bit weights

    qlora_ia3 = TrainingSpec(**{**SHORT, "method": "qlora", "dtype": "float32"}, adapter="ia3")
    result = train_adapter(qlora_ia3, tiny_model_dir, data.path, tmp_path / "adapter")
    assert result.trainable_params == 2 * (32 + 32 + 128)
    published = merge_adapter(
        tiny_model_dir, result.adapter_dir, tmp_path / "models", "v1", "float32", "# card\n"
    )
    assert published.merge_max_abs_diff <= 1e-3 and published.adapter_effect > 0


# ---------------------------------------------------------------------------------------------
# the planner


@pytest.mark.parametrize(
    "spec",
    [
        TrainingSpec(method="lora", lora=LoraSpec(target_modules="all-linear")),
        TrainingSpec(method="lora", adapter="adalora", lora=LoraSpec(target_modules="all-linear")),
        TrainingSpec(method="lora", adapter="ia3"),
        TrainingSpec(method="lora", adapter="prefix"),
        TrainingSpec(
            method="lora", adapter="prefix", prefix=PrefixSpec(projection=True, projection_hidden=48)
        ),
    ],
    ids=["lora", "adalora", "ia3", "prefix", "prefix_mlp"],
)
def test_the_planner_counts_the_trainable_parameters_peft_builds(spec, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from loraflow.plan import ModelShape, setup_from_training
    from loraflow.plan.memory import adapter_params
    from loraflow.train import count_parameters

    model = attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec, total_steps=100)
    planned = adapter_params(
        ModelShape.from_folder(tiny_model_dir), setup_from_training(spec, seq_len=64, device="cpu")
    )
    assert count_parameters(model)[0] == planned


def test_a_preference_plan_counts_two_sequences_per_pair_and_dpos_reference_forward(tiny_model_dir):
    from dataclasses import replace

    from loraflow.plan import ModelShape, estimate_memory, flops_per_token, setup_from_training

    shape = ModelShape.from_folder(tiny_model_dir)
    sft = setup_from_training(TrainingSpec(method="lora", batch_size=4), seq_len=64, device="cpu")
    dpo, orpo = (replace(sft, objective=o, trained_fraction=1.0) for o in ("dpo", "orpo"))
    # a pair is two sequences in one forward: the activations of twice the batch
    doubled = replace(sft, batch_size=8, trained_fraction=1.0)
    activations = estimate_memory(shape, doubled).total("activations")
    assert estimate_memory(shape, dpo).total("activations") == estimate_memory(shape, orpo).total(
        "activations"
    )
    assert estimate_memory(shape, orpo).total("activations") == activations
    # DPO's reference (the adapter disabled) adds a forward without gradients, and no second model
    extra = flops_per_token(shape, dpo).model - flops_per_token(shape, orpo).model
    head = shape.vocab_size * shape.hidden_size
    attention = 4 * shape.num_layers * shape.q_dim * 64 / 2
    assert extra == pytest.approx(2 * shape.quantizable_params + 2 * head + attention)
    assert estimate_memory(shape, dpo).total("weights") == estimate_memory(shape, sft).total("weights")
    assert "DPO on pairs" in estimate_memory(shape, dpo).setup.describe()


def _saved_bytes(layers: int, dtype, peft_config) -> int:
    """Bytes autograd keeps for the backward pass in a small Llama with `peft_config` (parameters
    excluded), padded batch of 2 x 48 tokens, through PEFT's own forward (a prefix is added there)."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    model = get_peft_model(model, peft_config)
    model.train()
    ids = torch.randint(0, 256, (2, 48))
    mask = torch.ones_like(ids)
    mask[0, 40:] = 0
    return autograd_saved_bytes(model, lambda: model(input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize("adapter", ["adalora", "ia3", "prefix"])
def test_a_layers_activation_terms_for_each_method_equal_what_autograd_saves(adapter):
    """One layer's terms against the bytes a real layer keeps (a three-layer model minus a two-layer
    one): IA3 keeps what its vectors multiply, a prefix lengthens keys and values, AdaLoRA keeps what
    LoRA at init_r keeps (plus each layer's A·E product, weight-sized, left out: under 2% here)."""
    import torch
    from peft import AdaLoraConfig, IA3Config, PrefixTuningConfig

    from loraflow.plan import ModelShape, Setup, layer_activation_terms

    peft_config, settings, dtype = {
        "adalora": (
            AdaLoraConfig(
                init_r=8, target_r=2, total_step=10, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
            ),
            dict(lora_r=8, target_modules=("q_proj", "v_proj"), lora_dropout=0.05),
            "float32",
        ),
        "ia3": (
            IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            dict(target_modules=("k_proj", "v_proj", "down_proj"), lora_dropout=0.0),
            "bfloat16",
        ),
        "prefix": (
            PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM"),
            dict(target_modules=(), lora_dropout=0.0, prefix_tokens=16),
            "float32",
        ),
    }[adapter]
    torch_dtype = getattr(torch, dtype)
    one_layer = _saved_bytes(3, torch_dtype, peft_config) - _saved_bytes(2, torch_dtype, peft_config)
    shape = ModelShape("small", 128, 320, 3, 4, 2, 32, 256, False)
    setup = Setup(
        method="lora", dtype=dtype, adapter=adapter, batch_size=2, seq_len=48, device="cpu", **settings
    )
    predicted = sum(layer_activation_terms(shape, setup).values()) * setup.tokens
    assert predicted == pytest.approx(one_layer, rel=0.02)
