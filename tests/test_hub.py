"""Uploading a published model folder to the Hub, tested against a local stand-in for the Hub's HTTP API."""

import base64
import hashlib
import json
import traceback
from pathlib import Path

import numpy as np
import pytest
from dagster import (
    AssetExecutionContext,
    DagsterInstance,
    DagsterInvalidConfigError,
    EnvVar,
    asset,
    materialize,
)
from fake_hub import FakeHub
from safetensors.numpy import save_file

from loraflow.hub import HubUploadError, upload_model
from resources import HubPublisher

TOKEN = "hf_test_0123456789abcdefghijklmnop"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # see fake_hub.py
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A small published-model folder: a model card, a config, safetensors weights, an adapter subfolder."""
    folder = tmp_path / "models" / "demo" / "0123456789abcdef"
    (folder / "adapter").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# demo\n\nTriage, one line.\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"lm_head.weight": np.arange(32, dtype=np.float32).reshape(4, 8)}, folder / "model.safetensors")
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upload_creates_a_private_repo_and_commits_every_file_once(hub, model_folder):
    result = upload_model(
        model_folder, "alice/triage", TOKEN, endpoint=hub.url, commit_message="demo 0123456789abcdef"
    )

    [created] = hub.created
    assert (created["organization"], created["name"], created["visibility"]) == ("alice", "triage", "private")
    [commit] = hub.commits
    header, *files = commit
    assert header == {"key": "header", "value": {"summary": "demo 0123456789abcdef", "description": ""}}
    # the weights go through LFS: their bytes are PUT once, the commit holds a pointer to them
    weights = (model_folder / "model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    assert hub.lfs_uploads == [oid] and hub.objects[oid] == weights
    pointers = [f["value"] for f in files if f["key"] == "lfsFile"]
    assert pointers == [{"path": "model.safetensors", "algo": "sha256", "oid": oid, "size": len(weights)}]
    inline = {
        f["value"]["path"]: base64.b64decode(f["value"]["content"]) for f in files if f["key"] == "file"
    }
    assert inline == {k: v for k, v in files_of(model_folder).items() if k != "model.safetensors"}
    assert hub.repos["alice/triage"] == files_of(model_folder)
    assert {r["authorization"] for r in hub.requests if r["method"] == "POST"} == {f"Bearer {TOKEN}"}
    assert result.repo_url == f"{hub.url}/alice/triage"
    assert result.commit_url == f"{hub.url}/alice/triage/commit/{result.commit_oid}"


def test_weights_the_hub_already_holds_are_committed_without_uploading_them_again(hub, model_folder):
    upload_model(model_folder, "alice/triage", TOKEN, endpoint=hub.url, commit_message="v1")
    (model_folder / "README.md").write_text("# demo\n\nA better card.\n")
    upload_model(model_folder, "alice/triage", TOKEN, endpoint=hub.url, commit_message="v2")

    assert len(hub.commits) == 2 and len(hub.lfs_uploads) == 1
    assert hub.repos["alice/triage"] == files_of(model_folder)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_names_the_repo_and_variable_but_not_the_token(hub, model_folder, status):
    hub.refuse_with = status
    with pytest.raises(HubUploadError) as raised:
        upload_model(model_folder, "alice/triage", TOKEN, endpoint=hub.url, commit_message="demo")

    message = str(raised.value)
    assert f"HTTP {status}" in message and "alice/triage" in message
    assert "Set HF_TOKEN to a token with write access" in message
    assert f"published locally at {model_folder}" in message
    assert TOKEN not in "".join(traceback.format_exception(raised.value)) + repr(raised.value)
    assert hub.commits == []


def test_unreachable_hub_says_the_model_is_published_locally(hub, model_folder):
    # nothing listens on port 9: the connection is refused, as on a machine without network
    with pytest.raises(HubUploadError, match="cannot reach the hub at http://127.0.0.1:9") as raised:
        upload_model(
            model_folder, "alice/triage", TOKEN, endpoint="http://127.0.0.1:9", commit_message="demo"
        )

    assert f"published locally at {model_folder}; the upload can be retried" in str(raised.value)
    assert TOKEN not in "".join(traceback.format_exception(raised.value))


def test_resource_reads_the_token_from_the_environment_and_never_shows_it(hub, model_folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    @asset
    def uploaded(context: AssetExecutionContext, hub_publisher: HubPublisher) -> str:
        context.log.info("uploading with %r", hub_publisher)
        commit = hub_publisher.upload(model_folder, "alice/triage", private=True, commit_message="demo")
        return commit.commit_oid

    instance = DagsterInstance.ephemeral()
    result = materialize(
        [uploaded],
        resources={"hub_publisher": HubPublisher(token=EnvVar("HF_TOKEN"), endpoint=hub.url)},
        instance=instance,
    )

    assert result.output_for_node("uploaded") == hashlib.sha1(hub.requests[-1]["body"]).hexdigest()
    assert {r["authorization"] for r in hub.requests if r["method"] == "POST"} == {f"Bearer {TOKEN}"}
    logged = [str(entry) for entry in instance.all_logs(result.run_id)]
    assert any("uploading with HubPublisher(" in line for line in logged)
    assert not [line for line in logged if TOKEN in line]
    assert TOKEN not in json.dumps(result.dagster_run.run_config)


def test_unset_token_variable_stops_only_runs_that_upload(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    resources = {"hub_publisher": HubPublisher(token=EnvVar("HF_TOKEN"))}

    @asset
    def trained() -> int:
        return 1

    @asset
    def uploaded(hub_publisher: HubPublisher) -> None:
        raise AssertionError("never reached: the run stops before its first step")

    assert materialize([trained], resources=resources).success
    with pytest.raises(DagsterInvalidConfigError, match="HF_TOKEN"):
        materialize([uploaded], resources=resources)
