"""The training loop on a tiny Llama: what it saves beside the adapter, and packed batches."""

from __future__ import annotations

import hashlib
import json

import pytest

from loraflow.base_model import load_tokenizer
from loraflow.dataset import build_dataset, stored_template
from loraflow.spec import FormatSpec, LoraSpec, TrainingSpec
from loraflow.templates import NAMED_TEMPLATES
from loraflow.train import train_adapter


def dataset(tokenizer, folder, template: str, n: int = 24, **format_settings):
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
    fmt = FormatSpec(**{"eval_size": 0.2, "max_seq_len": 128, **format_settings})
    return build_dataset(rows, tokenizer, fmt, template, "tok", folder)


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


def lora_spec(**overrides) -> TrainingSpec:
    settings = dict(
        method="lora",
        lora=LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        max_steps=6,
        batch_size=4,
        learning_rate=5e-3,
        log_every=1,
    )
    return TrainingSpec(**{**settings, **overrides})


def test_the_loss_on_trained_tokens_equals_the_models_own(tokenizer, tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from loraflow.dataset import load_split
    from loraflow.formatting import collate
    from loraflow.train import targets_of, token_loss_sum

    rows = load_split(dataset(tokenizer, tmp_path, tokenizer.chat_template).path, "train")[:4]
    batch = collate(rows, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ours = token_loss_sum(model, batch) / targets_of(rows, packed=False)
        theirs = model(**batch).loss
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)


def test_an_interrupted_run_resumes_to_the_same_adapter_bit_for_bit(tokenizer, tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    spec = lora_spec(lora=LoraSpec(r=4, alpha=8, dropout=0.1), checkpoint_every=2, max_steps=6)
    straight = train_adapter(spec, tiny_model_dir, data.path, tmp_path / "straight")

    def crash_at_step_3(figures: dict) -> None:
        if figures["step"] == 3:
            raise KeyboardInterrupt("the machine went away")

    with pytest.raises(KeyboardInterrupt):
        train_adapter(spec, tiny_model_dir, data.path, tmp_path / "resumed", progress=crash_at_step_3)
    checkpoints = tmp_path / "resumed.checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-2"]
    # the Trainer's checkpoint, loadable without unpickling arbitrary objects, and loraflow's marker
    optimizer = torch.load(checkpoints / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert optimizer["state"]
    marker = json.loads((checkpoints / "checkpoint-2" / "loraflow_checkpoint.json").read_text())
    assert marker["figures"]["step"] == 2 and len(marker["figures"]["loss_curve"]) == 2
    assert not list(checkpoints.rglob("*.bin"))  # no pickled training arguments either

    resumed = train_adapter(spec, tiny_model_dir, data.path, tmp_path / "resumed")
    assert resumed.resumed_from_step == 2
    assert resumed.loss_curve == straight.loss_curve
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not checkpoints.exists()  # removed once the adapter is saved


def test_gradient_accumulation_follows_the_loss_curve_of_one_batch_of_the_same_size(
    tokenizer, tiny_model_dir, tmp_path
):
    """Two batches of 2 accumulated train as one batch of 4. Two ranks of 2 do too: through torchrun
    and the trainer resource, in tests/test_trainer_modes.py."""
    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template, n=40)
    one = train_adapter(lora_spec(batch_size=4), tiny_model_dir, data.path, tmp_path / "one")
    accumulated = train_adapter(
        lora_spec(batch_size=2, gradient_accumulation_steps=2),
        tiny_model_dir,
        data.path,
        tmp_path / "accumulated",
    )
    reference = [loss for _, loss in one.loss_curve]
    assert [loss for _, loss in accumulated.loss_curve] == pytest.approx(reference, abs=1e-5)


def test_a_target_module_the_model_lacks_names_the_ones_it_has(tokenizer, tiny_model_dir, tmp_path):
    from loraflow.train import TrainingError

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    spec = lora_spec(lora=LoraSpec(target_modules=["query_key_value"]))
    with pytest.raises(TrainingError, match=r"target_modules \['query_key_value'\].*named .*q_proj"):
        train_adapter(spec, tiny_model_dir, data.path, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_loss_that_turns_nan_at_the_first_step_says_what_to_change(tokenizer, tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))
    weights[name] = torch.full_like(weights[name], float("inf"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    from loraflow.train import TrainingError

    with pytest.raises(
        TrainingError, match=r"the loss became nan at step 1 .*Lower training.learning_rate.*No checkpoint"
    ):
        train_adapter(lora_spec(), broken, data.path, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


class NanAfter:
    """A fault: once armed, every decoder layer's output is NaN (as after an fp16 overflow).

    A global forward hook, so it reaches whatever model the training engine builds."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.armed = False

    def progress(self, figures: dict) -> None:
        if figures["step"] == self.step:
            self.armed = True

    def __enter__(self):
        import torch

        def poison(module, args, output):
            if not self.armed or not type(module).__name__.endswith("DecoderLayer"):
                return None
            if isinstance(output, tuple):
                return (output[0] * float("nan"), *output[1:])
            return output * float("nan")

        self._handle = torch.nn.modules.module.register_module_forward_hook(poison)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def test_a_loss_that_turns_nan_after_a_checkpoint_keeps_it_and_a_rerun_resumes_from_it(
    tokenizer, tiny_model_dir, tmp_path
):
    from loraflow.train import TrainingError

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    spec = lora_spec(checkpoint_every=2, max_steps=6)
    with NanAfter(step=3) as fault, pytest.raises(TrainingError) as raised:
        train_adapter(spec, tiny_model_dir, data.path, tmp_path / "adapter", progress=fault.progress)
    message = str(raised.value)
    assert "the loss became nan at step 4" in message
    assert (
        "The checkpoint at step 2 is kept; re-materializing with the same settings resumes from it" in message
    )
    assert not (tmp_path / "adapter").exists()
    assert [p.name for p in (tmp_path / "adapter.checkpoints").iterdir()] == ["checkpoint-2"]

    resumed = train_adapter(spec, tiny_model_dir, data.path, tmp_path / "adapter")
    straight = train_adapter(spec, tiny_model_dir, data.path, tmp_path / "straight")
    assert resumed.resumed_from_step == 2
    assert resumed.loss_curve == straight.loss_curve


def test_a_checkpoint_written_under_other_settings_is_never_resumed(
    tokenizer, tiny_model_dir, tmp_path, caplog
):
    import logging

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template)
    first = lora_spec(checkpoint_every=2, max_steps=6)

    def stop_at_step_3(figures: dict) -> None:
        if figures["step"] == 3:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        train_adapter(first, tiny_model_dir, data.path, tmp_path / "adapter", progress=stop_at_step_3)
    assert (tmp_path / "adapter.checkpoints" / "checkpoint-2").is_dir()

    other = lora_spec(checkpoint_every=2, max_steps=6, learning_rate=1e-3)
    with caplog.at_level(logging.INFO, logger="loraflow"):
        fresh = train_adapter(other, tiny_model_dir, data.path, tmp_path / "adapter")
    assert fresh.resumed_from_step == 0
    assert "belongs to other settings; not resuming from it" in caplog.text
    reference = train_adapter(other, tiny_model_dir, data.path, tmp_path / "reference")
    assert fresh.loss_curve == reference.loss_curve


@pytest.mark.parametrize("format_settings", [{}, {"train_on_inputs": True}], ids=["answers", "every_token"])
def test_a_packed_step_trains_on_the_same_loss_as_the_padded_step_over_the_same_examples(
    tokenizer, tiny_model_dir, tmp_path, format_settings
):
    """One optimizer step over the whole train split, packed and padded: the losses are equal only
    if packed examples neither attend to each other nor train on each other's last token."""
    from loraflow.dataset import load_split
    from loraflow.packing import pack_examples

    data = dataset(tokenizer, tmp_path / "datasets", tokenizer.chat_template, **format_settings)
    train = load_split(data.path, "train")
    rows = pack_examples(train, 128)
    assert len(rows) < len(train) / 2  # several examples share every row
    step = dict(max_steps=1, checkpoint_every=None)
    padded = train_adapter(
        lora_spec(batch_size=len(train), **step), tiny_model_dir, data.path, tmp_path / "a"
    )
    packed = train_adapter(
        lora_spec(batch_size=len(rows), **step), tiny_model_dir, data.path, tmp_path / "b", pack_to=128
    )
    assert packed.examples_seen == padded.examples_seen == len(train)
    assert packed.loss_curve[0][1] == pytest.approx(padded.loss_curve[0][1], abs=1e-5)
