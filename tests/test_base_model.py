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


def pickled_copy(tiny_model_dir, folder):
    """The tiny model's folder with its weights as PyTorch's pickle file instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickled_weights_are_refused_saying_why_and_what_to_do(tiny_model_dir, tmp_path):
    folder = pickled_copy(tiny_model_dir, tmp_path / "pickled")
    with pytest.raises(BaseModelError) as refused:
        resolve_base_model(BaseModelSpec(source=str(folder)), tmp_path / "store")
    message = str(refused.value)
    assert f"{folder} has no *.safetensors weights. It has pytorch_model.bin: pickle files" in message
    assert "can run arbitrary code when they are loaded" in message
    assert "model.save_pretrained(folder)" in message and "base_model.allow_pickle: true" in message
    assert not (tmp_path / "store").exists()  # nothing was unpickled or written


def test_pickled_weights_allowed_by_the_yaml_are_converted_once_to_safetensors(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = pickled_copy(tiny_model_dir, tmp_path / "pickled")
    spec = BaseModelSpec(source=str(folder), allow_pickle=True)
    resolved = resolve_base_model(spec, tmp_path / "store")
    assert resolved.converted_from == folder.resolve()
    assert resolved.path.is_relative_to(tmp_path / "store") and not list(resolved.path.glob("*.bin"))
    assert resolved.content_hash == model_content_hash(resolved.path)
    original = load_file(tiny_model_dir / "model.safetensors")
    converted = load_causal_lm(resolved.path).state_dict()
    assert all(torch.equal(converted[name], tensor) for name, tensor in original.items())
    assert load_tokenizer(resolved.path).chat_template == load_tokenizer(tiny_model_dir).chat_template

    weights = next(resolved.path.glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    again = resolve_base_model(spec, tmp_path / "store")
    assert (again.path, again.content_hash) == (resolved.path, resolved.content_hash)
    assert weights.stat().st_mtime_ns == written  # not converted a second time


def test_allow_pickle_on_the_builtin_model_is_refused_when_the_yaml_loads(tmp_path):
    from loraflow.spec import SpecError, load_spec

    path = tmp_path / "pipelines" / "p.yaml"
    path.parent.mkdir()
    path.write_text("data:\n  sources:\n    - path: x.jsonl\nbase_model:\n  allow_pickle: true\n")
    with pytest.raises(SpecError, match=r"base_model \(line 4\): allow_pickle is for a local folder"):
        load_spec(path)


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
