"""Where pipelines and artifacts live: LORAFLOW_PIPELINES and LORAFLOW_HOME, or the project's defaults.

Kept apart from `pipelines.definitions` so that command-line tools can find them without loading
every pipeline's Dagster definitions.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_pipelines_dir() -> Path:
    """The folder of fine-tunes: LORAFLOW_PIPELINES, else pipelines/defs."""
    return Path(os.environ.get("LORAFLOW_PIPELINES", PROJECT_ROOT / "pipelines" / "defs"))


def pipeline_file(name: str, folder: Path | None = None) -> Path:
    """The file of the fine-tune `name`: `<folder>/<name>/defs.yaml`, else `<folder>/<name>.yaml`."""
    folder = default_pipelines_dir() if folder is None else folder
    component = folder / name / "defs.yaml"
    return (
        component if component.exists() or not (folder / f"{name}.yaml").exists() else folder / f"{name}.yaml"
    )


def default_home() -> Path:
    """The artifact store and warehouse folder: LORAFLOW_HOME, else .loraflow in the project root."""
    return Path(os.environ.get("LORAFLOW_HOME", PROJECT_ROOT / ".loraflow"))
