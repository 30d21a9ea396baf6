"""The contracts between assets: typed manifests stored as JSON and read back into their models,
a manifest that lost a field failing with the field's name, and one content hash for every version."""

from __future__ import annotations

import json

import pytest
from dagster import AssetKey, build_input_context, build_output_context

from loraflow.hashing import canonical_json, content_hash
from loraflow.manifests import MANIFESTS, AdapterManifest, BaseModelManifest
from resources import ManifestIOManager

BASE = BaseModelManifest(
    source="smollm2-135m-instruct", kind="builtin", path="/m", content_hash="ab" * 32, trust_remote_code=False
)


def test_a_manifest_goes_out_as_json_and_comes_back_as_its_model(tmp_path):
    io = ManifestIOManager(root=str(tmp_path))
    key = AssetKey(["triage", "base_model"])
    io.handle_output(build_output_context(asset_key=key), BASE)
    stored = json.loads((tmp_path / "manifests" / "triage" / "base_model.json").read_text())
    assert stored == BASE.model_dump(mode="json")
    loaded = io.load_input(build_input_context(asset_key=key))
    assert isinstance(loaded, BaseModelManifest) and loaded == BASE
    assert loaded.metadata() == stored  # every field is a scalar: all of them are shown


def test_a_manifest_missing_a_field_or_of_the_wrong_kind_fails_naming_it(tmp_path):
    io = ManifestIOManager(root=str(tmp_path))
    key = AssetKey(["triage", "base_model"])
    path = tmp_path / "manifests" / "triage" / "base_model.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({k: v for k, v in BASE.model_dump().items() if k != "path"}))
    with pytest.raises(
        ValueError, match=r"base_model\.json: the manifest of triage/base_model .*path: Field required"
    ):
        io.load_input(build_input_context(asset_key=key))
    # a stage with a manifest never writes a plain dict
    with pytest.raises(TypeError, match="triage/base_model must output a BaseModelManifest, not dict"):
        io.handle_output(build_output_context(asset_key=key), BASE.model_dump())
    with pytest.raises(FileNotFoundError, match="no manifest for triage/adapter; materialize it first"):
        io.load_input(build_input_context(asset_key=AssetKey(["triage", "adapter"])))


def test_every_stage_that_hands_something_on_has_a_manifest_whose_fields_are_documented():
    assert set(MANIFESTS) == {
        "base_model",
        "training_dataset",
        "adapter",
        "evaluation",
        "published_model",
        "hub_model",
    }
    with pytest.raises(ValueError, match="extra"):
        AdapterManifest(
            version="v", path="/a", weights_sha256="s", dataset_version="d", steps=1, final_loss=1.0, lr=1
        )


def test_one_content_hash_equal_for_equal_content_whatever_the_order():
    assert content_hash({"a": 1, "b": [1, 2]}) == content_hash({"b": [1, 2], "a": 1})
    assert content_hash({"a": 1}) != content_hash({"a": 2})
    assert len(content_hash("x")) == 16 and len(content_hash("x", length=20)) == 20
    assert content_hash("x", 64).startswith(content_hash("x"))
    assert canonical_json({"é": 1, "a": [1.5, None]}) == '{"a":[1.5,null],"é":1}'
    with pytest.raises(ValueError, match="1 to 64"):
        content_hash("x", 65)
