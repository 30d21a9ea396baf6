"""`FineTune`: one fine-tune as a Dagster component, declared by one `pipelines/defs/<name>/defs.yaml`.

    dg scaffold defs pipelines.component.FineTune <name>    # a new fine-tune, every key documented
    dg check defs                                           # every file checked, errors with file, key, line
    dg list defs                                            # its assets, checks, sensors and conditions

The component's attributes are the pipeline spec (`loraflow.spec.PipelineAttributes`), checked by
loraflow's own loader so that a typo gets the same message, naming the file, the key path, its line
and the allowed keys, whether Dagster, `dg`, the command line or the training worker reads it.
Dagster is handed the file's attributes as they are; its schema is the spec's (`spec_json_schema`).
"""

from __future__ import annotations

from pathlib import Path

from dagster import Component, ComponentLoadContext, Definitions, Scaffolder, ScaffoldRequest, scaffold_with
from dagster._utils.schedules import is_valid_cron_string
from pydantic import BaseModel, ConfigDict

from assets import pipeline_assets, source_partitions
from loraflow.scaffold import scaffold_text
from loraflow.spec import COMPONENT_FILE, PipelineSpec, SpecError, load_spec
from pipelines.automation import automation_sensors, retrain_job
from pipelines.sensors import build_source_sensor

TYPE = "pipelines.component.FineTune"


class FineTuneFile(BaseModel):
    """What Dagster validates before the component loads: nothing, so that loraflow's loader, with its
    messages, is the one check. The keys are those of `loraflow.spec.PipelineAttributes`."""

    model_config = ConfigDict(extra="allow")


class FineTuneScaffolder(Scaffolder):
    """Writes `defs.yaml` for a new fine-tune: a data source to fill in and every other key commented
    out at its default, with what it does."""

    def scaffold(self, request: ScaffoldRequest) -> None:
        target = Path(request.target_path)
        target.mkdir(parents=True, exist_ok=True)
        path = target / COMPONENT_FILE
        if path.exists():
            raise FileExistsError(f"{path} exists; pick another name or edit it")
        depth = len(
            target.resolve().relative_to(Path(request.project_root or target).resolve() / "pipelines").parts
        )
        path.write_text(
            scaffold_text(target.name, request.type_name, schema="../" * depth + "finetune.schema.json")
        )


@scaffold_with(FineTuneScaffolder)
class FineTune(Component):
    """A fine-tune: raw files -> validated examples -> training dataset -> adapter -> evaluation ->
    published model, with its data checks, its gate, its source-file sensor and its automation."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return FineTuneFile

    @classmethod
    def load(cls, attributes: BaseModel | None, context: ComponentLoadContext) -> FineTune:
        path = context.path / COMPONENT_FILE if context.path.is_dir() else context.path
        return cls(load_spec(path, root=context.project_root))

    def build_defs(self, context: ComponentLoadContext | None = None) -> Definitions:
        return pipeline_definitions(self.spec)


def pipeline_definitions(spec: PipelineSpec) -> Definitions:
    """A pipeline's assets and checks, its source-file sensor, its automation sensors and its retrain
    job; resources are the code location's (`pipelines.definitions`)."""
    cron = spec.schedule.cron
    if cron is not None and not is_valid_cron_string(cron):
        raise SpecError(
            f"pipeline {spec.name!r}: schedule.cron {cron!r} is not a cron string Dagster accepts; "
            "e.g. '0 3 * * 1' for Mondays at 03:00"
        )
    return Definitions(
        assets=pipeline_assets(spec),
        jobs=[retrain_job(spec)],
        sensors=[build_source_sensor(spec, source_partitions(spec)), *automation_sensors(spec)],
    )
