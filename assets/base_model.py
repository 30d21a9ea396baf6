"""`base_model`: the model to fine-tune, as a local folder of safetensors, versioned by content."""

from dagster import AssetExecutionContext, DataVersion, MetadataValue, Output, asset

from assets.automation import conditions
from assets.keys import asset_key
from loraflow.base_model import resolve_base_model
from loraflow.manifests import BaseModelManifest
from loraflow.spec import PipelineSpec
from resources import ArtifactStore


def build_base_model(spec: PipelineSpec):
    @asset(
        key=asset_key(spec, "base_model"),
        automation_condition=conditions(spec)["base_model"],
        group_name=spec.name,
        kinds={"huggingface"},
        code_version=spec.section_version("base_model"),
        description=f"The base model `{spec.base_model.source}` as a local Hugging Face folder; "
        "its data version is a content hash of the weight, config and tokenizer files.",
    )
    def base_model(context: AssetExecutionContext, store: ArtifactStore) -> Output[BaseModelManifest]:
        resolved = resolve_base_model(spec.base_model, store.folder(), spec.root)
        context.log.info("base model %s (%s) at %s", resolved.source, resolved.kind, resolved.path)
        if resolved.converted_from is not None:
            context.log.warning(
                "converted from the pickle weights in %s (base_model.allow_pickle)", resolved.converted_from
            )
        manifest = BaseModelManifest(
            source=resolved.source,
            kind=resolved.kind,
            path=str(resolved.path),
            content_hash=resolved.content_hash,
            trust_remote_code=spec.base_model.trust_remote_code,
        )
        return Output(
            manifest,
            data_version=DataVersion(resolved.content_hash[:32]),
            metadata={**manifest.metadata(), "path": MetadataValue.path(manifest.path)},
        )

    return base_model
