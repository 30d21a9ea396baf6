"""Every `pipelines/*.yaml` becomes one asset group, keyed and named after the file.

    dagster dev -m pipelines.definitions

A broken YAML stops the whole code location from loading, with one message that names every
broken file and key. Loading the others and hiding the broken one would silently stop its
schedule and its data checks; a load error is shown on the UI's front page instead, and the
fix is one edit away.

Environment: LORAFLOW_PIPELINES (folder of YAML files, default: this folder), LORAFLOW_HOME
(the artifact store and warehouse, default: .loraflow in the project root), LORAFLOW_DEPLOYMENT
(a resources YAML such as deploy/resources.yaml; unset: the embedded defaults) and HF_TOKEN (the
token the `hub` resource uploads with; read only by runs that upload, for pipelines with
publish.hub_repo).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dagster import DagsterInvalidDefinitionError, Definitions, ScheduleDefinition

from assets import pipeline_assets, source_partitions
from loraflow.spec import PipelineSpec, SpecError, load_specs
from pipelines.deployment import deployment_resources
from pipelines.paths import default_home, default_pipelines_dir
from pipelines.schedules import build_automation_sensor, build_retrain_schedule, retrain_job
from pipelines.sensors import build_source_sensor


def load_pipelines(folder: Path) -> list[PipelineSpec]:
    """The specs of every YAML in `folder`; raises one SpecError naming every broken file."""
    specs, errors = load_specs(folder)
    if errors:
        raise SpecError(
            f"{len(errors)} pipeline file(s) in {folder} cannot be loaded; fix them and reload:\n\n"
            + "\n\n".join(str(e) for e in errors)
        )
    return specs


def pipeline_resources(home: Path) -> dict:
    """The resources every pipeline shares: those the YAML named by LORAFLOW_DEPLOYMENT describes
    (deploy/resources.yaml for a cluster), else the embedded defaults, storing everything under `home`."""
    return deployment_resources(home)


def build_definitions(pipelines_dir: Path, home: Path) -> Definitions:
    """Definitions for every pipeline YAML in `pipelines_dir`, storing everything under `home`."""
    specs = load_pipelines(pipelines_dir)
    groups = ", ".join(f"{spec.name} ({len(spec.partitions())} source files)" for spec in specs)
    print(
        f"loraflow: {len(specs)} pipeline group(s) from {pipelines_dir}: {groups or 'none'}", file=sys.stderr
    )
    jobs = {spec.name: retrain_job(spec) for spec in specs}
    return Definitions(
        assets=[asset for spec in specs for asset in pipeline_assets(spec)],
        jobs=list(jobs.values()),
        schedules=[schedule_of(spec, jobs[spec.name], pipelines_dir) for spec in specs if spec.schedule.cron],
        sensors=[
            sensor
            for spec in specs
            for sensor in (build_source_sensor(spec, source_partitions(spec)), build_automation_sensor(spec))
        ],
        resources=pipeline_resources(home),
    )


def schedule_of(spec: PipelineSpec, job, pipelines_dir: Path) -> ScheduleDefinition:
    """The retrain schedule; a cron string Dagster cannot read is a spec error naming the key."""
    try:
        return build_retrain_schedule(spec, job)
    except DagsterInvalidDefinitionError as err:
        raise SpecError(
            f"{pipelines_dir / spec.name}.yaml: schedule.cron {spec.schedule.cron!r} is not a cron string Dagster "
            f"accepts ({err}); e.g. '0 3 * * 1' for Mondays at 03:00"
        ) from None


defs = build_definitions(default_pipelines_dir(), default_home())
