"""Resolving `base_model.source`: built-in, local folder, hub id (offline), and what is refused."""

from __future__ import annotations

import shutil

import pytest

from loraflow.base_model import (
    BaseModelError,
    load_causal_lm,
    load_tokenizer,
    model_content_hash,
    resolve_base_model,
)
from loraflow.spec import BaseModelSpec


def test_builtin_is_converted_to_a_plain_safetensors_folder(builtin_model):
    from transformers import AutoModelForCausalLM

    assert builtin_model.kind == "builtin"
    assert (builtin_model.path / "model.safetensors").is_file()
    assert "quantization_config" not in (builtin_model.path / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(builtin_model.path, use_safetensors=True)
    assert model.config.num_hidden_layers == 30
    tokenizer = load_tokenizer(builtin_model.path)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered


def test_builtin_conversion_is_cached(builtin_model, store_root):
    weights = builtin_model.path / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = resolve_base_model(BaseModelSpec(source="smollm2-135m-instruct"), store_root)
    assert again.path == builtin_model.path
    assert again.content_hash == builtin_model.content_hash
    assert weights.stat().st_mtime_ns == written  # not converted a second time


def test_local_folder_resolves_and_hash_follows_content(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    resolved = resolve_base_model(BaseModelSpec(source=str(copy)), tmp_path / "store")
    assert resolved.kind == "local"
    assert resolved.content_hash == model_content_hash(tiny_model_dir)
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert model_content_hash(copy) != resolved.content_hash


def test_relative_local_folder_resolves_against_project_root(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "tiny")
    resolved = resolve_base_model(
        BaseModelSpec(source="models/tiny"), tmp_path / "store", project_root=tmp_path
    )
    assert resolved.path == (tmp_path / "models" / "tiny").resolve()


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(
        BaseModelError, match=r"no \*\.safetensors weights.*pytorch_model\.bin.*safetensors only"
    ):
        resolve_base_model(BaseModelSpec(source=str(folder)), tmp_path / "store")


def test_missing_local_folder_says_what_sources_are_allowed(tmp_path):
    with pytest.raises(BaseModelError, match=r"no such folder.*local Hugging Face folder.*hub id.*built-in"):
        resolve_base_model(BaseModelSpec(source="./models/nothing-here"), tmp_path)


def test_offline_hub_id_fails_fast_and_says_how_to_point_at_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BaseModelError) as error:
        resolve_base_model(BaseModelSpec(source="HuggingFaceTB/SmolLM2-360M-Instruct"), tmp_path)
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert "set base_model.source to that folder's path" in message
    assert "smollm2-135m-instruct" in message


def test_qlora_loading_quantizes_linear_layers_to_4bit(tiny_model_dir):
    import bitsandbytes as bnb

    from loraflow.spec import QuantizationSpec

    model = load_causal_lm(tiny_model_dir, quantization=QuantizationSpec())
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"


def test_unreachable_hub_fails_with_the_same_advice(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    # nothing listens there: the connection is refused, as on a machine without network
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(
        BaseModelError, match=r"cannot be downloaded.*set base_model\.source to that folder's path"
    ):
        resolve_base_model(BaseModelSpec(source="HuggingFaceTB/SmolLM2-360M-Instruct"), tmp_path)
