"""The training loop on a tiny Llama: what it saves beside the adapter, and packed batches."""

from __future__ import annotations

import hashlib
import json

from loraflow.base_model import load_tokenizer
from loraflow.dataset import build_dataset, stored_template
from loraflow.spec import FormatSpec, LoraSpec, TrainingSpec
from loraflow.templates import NAMED_TEMPLATES
from loraflow.train import train_adapter


def dataset(tokenizer, folder, template: str, n: int = 24):
    rows = [
        {
            "partition": "f.jsonl",
            "source_file": "f.jsonl",
            "record_index": i + 1,
            "sub_index": 0,
            "messages": json.dumps(
                [
                    {"role": "user", "content": f"Classify message {i}: " + "words " * (i % 7)},
                    {"role": "assistant", "content": f"label {i % 3}"},
                ]
            ),
            "text": None,
            "example_hash": hashlib.sha256(f"t{i}".encode()).hexdigest(),
        }
        for i in range(n)
    ]
    return build_dataset(rows, tokenizer, FormatSpec(eval_size=0.2, max_seq_len=128), template, "tok", folder)


TINY_LORA = TrainingSpec(
    method="lora", lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), max_steps=2, batch_size=4
)


def test_the_adapter_carries_the_template_it_was_trained_with(tokenizer, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = dataset(tokenizer, tmp_path / "datasets", NAMED_TEMPLATES["zephyr"])
    result = train_adapter(TINY_LORA, tiny_model_dir, data.path, tmp_path / "adapter")
    saved = load_tokenizer(result.adapter_dir)
    assert saved.chat_template == stored_template(data.path) == NAMED_TEMPLATES["zephyr"]
    assert load_tokenizer(tiny_model_dir).chat_template != saved.chat_template  # the base's own is untouched
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir
    )
    assert any("lora_B" in name for name, _ in model.named_parameters())
    assert result.packing_efficiency is None


def test_packed_training_counts_real_tokens_and_reports_efficiency(tokenizer, tiny_model_dir, tmp_path):
    import math

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    packed = train_adapter(TINY_LORA, tiny_model_dir, data.path, tmp_path / "packed", pack_to=128)
    assert 0.5 < packed.packing_efficiency <= 1.0
    assert math.isfinite(packed.final_loss)
    # every step takes batch_size rows of several examples: more examples per step than unpacked
    plain = train_adapter(TINY_LORA, tiny_model_dir, data.path, tmp_path / "plain")
    assert packed.examples_seen > plain.examples_seen
    assert packed.tokens_seen > plain.tokens_seen
