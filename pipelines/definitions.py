"""The code location: every `FineTune` component under `pipelines/defs/`, and the resources they share.

    dg dev                       # the UI and the daemon (make ui)
    dg check defs / dg list defs

Each `pipelines/defs/<name>/defs.yaml` becomes one asset group named after its folder. A broken
file stops the whole code location from loading, with a message that names the file, the key
and its line: loading the others and hiding the broken one would silently stop its automation and
its data checks; a load error is shown on the UI's front page instead, and the fix is one edit away.

Environment: LORAFLOW_PIPELINES (another folder of fine-tunes, `<name>/defs.yaml` or `<name>.yaml`
each, loaded with the same component; unset: pipelines/defs), LORAFLOW_HOME (the artifact store
and warehouse, default: .loraflow in the project root), LORAFLOW_DEPLOYMENT (a resources YAML such
as deploy/resources.yaml; unset: the embedded defaults) and HF_TOKEN (the token the `hub` resource
uploads with; read only by runs that upload, for pipelines with publish.hub_repo).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dagster import Definitions, load_from_defs_folder

from loraflow.spec import PipelineSpec, SpecError, load_specs
from pipelines.component import pipeline_definitions
from pipelines.deployment import deployment_resources
from pipelines.paths import PROJECT_ROOT, default_home


def load_pipelines(folder: Path) -> list[PipelineSpec]:
    """The specs of every fine-tune in `folder`; raises one SpecError naming every broken file."""
    specs, errors = load_specs(folder)
    if errors:
        raise SpecError(
            f"{len(errors)} pipeline file(s) in {folder} cannot be loaded; fix them and reload:\n\n"
            + "\n\n".join(str(e) for e in errors)
        )
    check_starts(specs, folder)
    return specs


def check_starts(specs: list[PipelineSpec], folder: Path) -> None:
    """Every `training.start_from` names a pipeline of the same code location, and no chain of them
    comes back to where it started."""
    names = {spec.name: spec for spec in specs}
    for spec in specs:
        seen, name = [spec.name], spec.training.start_from
        while name is not None:
            if name not in names:
                raise SpecError(
                    f"pipeline {spec.name!r}: training.start_from {name!r} is not a pipeline in {folder} "
                    f"(there are: {', '.join(sorted(names))}); name one of them, or remove start_from"
                )
            if name in seen:
                raise SpecError(
                    f"pipeline {spec.name!r}: training.start_from goes round in a circle ({' -> '.join([*seen, name])})"
                )
            seen.append(name)
            name = names[name].training.start_from


def pipeline_resources(home: Path) -> dict:
    """The resources every pipeline shares: those the YAML named by LORAFLOW_DEPLOYMENT describes
    (deploy/resources.yaml for a cluster), else the embedded defaults, storing everything under `home`."""
    return deployment_resources(home)


def build_definitions(pipelines_dir: Path, home: Path) -> Definitions:
    """The definitions of every fine-tune in a folder outside the project's defs (LORAFLOW_PIPELINES,
    tests), built by the same component code as `pipelines/defs`, storing everything under `home`."""
    specs = load_pipelines(pipelines_dir)
    _announce(specs, pipelines_dir)
    return Definitions.merge(
        *(pipeline_definitions(spec) for spec in specs), Definitions(resources=pipeline_resources(home))
    )


def project_definitions(home: Path) -> Definitions:
    """The project's own code location: Dagster's component loader over pipelines/defs."""
    defs = load_from_defs_folder(path_within_project=PROJECT_ROOT)
    folder = PROJECT_ROOT / "pipelines" / "defs"
    check_starts(load_specs(folder)[0], folder)
    return Definitions.merge(defs, Definitions(resources=pipeline_resources(home)))


def _announce(specs: list[PipelineSpec], folder: Path) -> None:
    groups = ", ".join(f"{spec.name} ({len(spec.partitions())} source files)" for spec in specs)
    print(f"loraflow: {len(specs)} pipeline group(s) from {folder}: {groups or 'none'}", file=sys.stderr)


def location_definitions() -> Definitions:
    folder = os.environ.get("LORAFLOW_PIPELINES")
    return build_definitions(Path(folder), default_home()) if folder else project_definitions(default_home())


defs = location_definitions()
