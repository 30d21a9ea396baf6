"""Upload a published model folder to the Hugging Face Hub, or to a private hub, in one commit.

The local folder stays the published model: an upload that fails leaves it where it is and can
run again. The token is only ever sent in the Authorization header; no message this module writes
contains it, and the Hub's own error text is quoted with the token masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV_VAR = "HF_TOKEN"
"""The environment variable the upload token is read from (by the Dagster resource, not here)."""


class HubUploadError(RuntimeError):
    """An upload that did not happen; the message says why and what to do, and never holds the token."""


@dataclass(frozen=True)
class HubCommit:
    """Where an upload landed."""

    repo_url: str
    """The repository's page, e.g. `https://huggingface.co/alice/triage`."""

    commit_url: str
    """The commit's page: the uploaded files as of this commit."""

    commit_oid: str
    """The commit's git hash (40 hex digits)."""


def upload_model(
    folder: Path,
    repo_id: str,
    token: str,
    *,
    private: bool = True,
    revision: str = "main",
    endpoint: str | None = None,
    commit_message: str,
    token_env_var: str = TOKEN_ENV_VAR,
) -> HubCommit:
    """Create the model repository `repo_id` if missing, then upload every file of `folder` in one commit.

    `private` applies when the repository is created; an existing one keeps its visibility.
    `endpoint` unset means huggingface_hub's default (https://huggingface.co, or `HF_ENDPOINT`).
    `token_env_var` only names, in error messages, where the token came from.
    """
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    kept = f"The model is published locally at {folder}; the upload can be retried"
    if not files:
        raise HubUploadError(f"{folder}: no files to upload to {repo_id}; publish the model there first")
    if not token:
        raise HubUploadError(
            f"no Hugging Face token to upload to {repo_id}: set {token_env_var} to a token with write access. "
            f"{kept} once it is set."
        )

    api = HfApi(endpoint=endpoint, library_name="loraflow")
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=path)
        for path in files
    ]
    try:
        repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message, token=token, revision=revision
        )
    except HfHubHTTPError as err:
        status = err.response.status_code
        answer = _masked(err.server_message or "", token)
        answer = f": {answer}" if answer else ""
        # `from None`: the original exception holds the request, and the request holds the token
        if status in (401, 403):
            raise HubUploadError(
                f"the hub at {api.endpoint} refused the token for {repo_id} (HTTP {status}{answer}). "
                f"Set {token_env_var} to a token with write access to {repo_id} "
                f"({api.endpoint}/settings/tokens). {kept} once it is set."
            ) from None
        raise HubUploadError(
            f"the hub at {api.endpoint} refused the upload to {repo_id} (HTTP {status}{answer}). {kept}."
        ) from None
    except OfflineModeIsEnabled:
        raise HubUploadError(
            f"cannot upload to {repo_id}: HF_HUB_OFFLINE is set. {kept} with HF_HUB_OFFLINE unset."
        ) from None
    except httpx2.TransportError as err:
        reason = _masked(f"{type(err).__name__}: {err}".splitlines()[0], token)
        raise HubUploadError(
            f"cannot reach the hub at {api.endpoint} to upload to {repo_id} ({reason}). "
            f"{kept} when the hub is reachable."
        ) from None
    return HubCommit(repo_url=str(repo_url), commit_url=commit.commit_url, commit_oid=commit.oid)


def _masked(text: str, token: str) -> str:
    return text.replace(token, "***")
