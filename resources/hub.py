"""The Hub publisher: uploads a published model folder to the Hugging Face Hub, or to a private hub."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from loraflow.hub import TOKEN_ENV_VAR, HubCommit, upload_model


class HubPublisher(ConfigurableResource):
    """Uploads published model folders, authenticated with a token from the environment.

    Configure it as `HubPublisher(token=EnvVar("HF_TOKEN"))`. Dagster reads the variable when a run
    that uses this resource starts and shows only its name in the UI and the run config. A run that
    uploads fails at its start, before any training, when the variable is unset; a run that does not
    use this resource never reads it, so pipelines without `publish.hub_repo` need no token.
    """

    token: str | None = Field(
        default=None,
        repr=False,  # the resolved value must not reach logs through the resource's repr
        description=f"The Hugging Face token, with write access; set it with EnvVar({TOKEN_ENV_VAR!r}).",
    )
    endpoint: str | None = Field(
        default=None,
        description="The hub's URL, for a private hub; unset: https://huggingface.co, or HF_ENDPOINT when set.",
    )

    def upload(self, folder: Path, repo_id: str, *, private: bool, commit_message: str) -> HubCommit:
        """Create `repo_id` if missing (private or not) and upload every file of `folder` in one commit."""
        return upload_model(
            Path(folder),
            repo_id,
            self.token or "",
            private=private,
            endpoint=self.endpoint,
            commit_message=commit_message,
            token_env_var=TOKEN_ENV_VAR,
        )
