"""`published_model`: the adapter merged into a full-precision base, with a model card and lineage."""

import subprocess
from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, AssetKey, DataVersion, MetadataValue, Output, asset

from loraflow.base_model import BUILTIN_HUB_IDS
from loraflow.merge import merge_adapter, publish_version
from loraflow.model_card import render_model_card
from loraflow.spec import PipelineSpec
from loraflow.validate import source_lineage
from resources import ArtifactStore, Warehouse


def code_version_of(root: Path) -> str:
    """The git commit of the project, marked dirty when it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def build_published_model(spec: PipelineSpec):
    @asset(
        key=AssetKey([spec.name, "published_model"]),
        group_name=spec.name,
        kinds={"safetensors"},
        ins={
            "adapter": AssetIn(AssetKey([spec.name, "adapter"])),
            "evaluation": AssetIn(AssetKey([spec.name, "evaluation"])),
            "training_dataset": AssetIn(AssetKey([spec.name, "training_dataset"])),
            "base_model": AssetIn(AssetKey([spec.name, "base_model"])),
        },
        code_version=spec.section_version("publish"),
        description=f"The adapter merged into the base in {spec.publish.dtype}, saved as safetensors with the "
        "tokenizer, chat template, the adapter on its own and a model card, under models/<pipeline>/<version>.",
    )
    def published_model(
        context: AssetExecutionContext,
        adapter: dict,
        evaluation: dict,
        training_dataset: dict,
        base_model: dict,
        store: ArtifactStore,
        warehouse: Warehouse,
    ) -> Output[dict]:
        with warehouse.connect() as con:
            sources = source_lineage(con, spec.name)
        card = render_model_card(
            pipeline=spec.name,
            description=spec.description,
            base_model=BUILTIN_HUB_IDS.get(base_model["source"], base_model["source"]),
            base_model_hash=base_model["content_hash"],
            license="apache-2.0",
            sources=sources,
            dataset_version=training_dataset["version"],
            training_config=spec.training.model_dump(mode="json"),
            code_version=code_version_of(spec.root),
            eval_table=evaluation["table"],
        )
        version = publish_version(Path(adapter["path"]), base_model["content_hash"], spec.publish.dtype)
        result = merge_adapter(
            Path(base_model["path"]),
            Path(adapter["path"]),
            store.folder("models", spec.name),
            version,
            spec.publish.dtype,
            card,
            base_model["trust_remote_code"],
        )
        if not result.weights_changed:
            raise RuntimeError("the merged model's logits equal the base's: the adapter changed nothing")
        context.log.info("published %s at %s", version, result.path)
        return Output(
            {"version": version, "path": result.path, "adapter_version": adapter["version"]},
            data_version=DataVersion(version),
            metadata={
                "path": MetadataValue.path(result.path),
                "version": version,
                "dtype": spec.publish.dtype,
                "reload_max_abs_diff": result.reload_max_abs_diff,
                "model_card": MetadataValue.md(card),
            },
        )

    return published_model
