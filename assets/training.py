"""`adapter`: LoRA/QLoRA training, bound to the "gpu" pool so one trains at a time."""

import hashlib
import json
from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, AssetKey, DataVersion, MetadataValue, Output, asset

from loraflow.artifacts import folder_sha256
from loraflow.spec import PipelineSpec
from resources import ArtifactStore, Trainer

GPU_POOL = "gpu"


def training_code_version(spec: PipelineSpec) -> str:
    """The training section plus the format settings that shape batches (packing, row length)."""
    batching = json.dumps([spec.format.packing, spec.format.max_seq_len])
    return hashlib.sha256((spec.section_version("training") + batching).encode()).hexdigest()[:16]


def build_adapter(spec: PipelineSpec):
    @asset(
        key=AssetKey([spec.name, "adapter"]),
        group_name=spec.name,
        kinds={"pytorch", "peft"},
        pool=GPU_POOL,
        ins={
            "training_dataset": AssetIn(AssetKey([spec.name, "training_dataset"])),
            "base_model": AssetIn(AssetKey([spec.name, "base_model"])),
        },
        code_version=training_code_version(spec),
        description=f"A {spec.training.method.upper()} adapter (r={spec.training.lora.r}) trained on the "
        "training split; safetensors in the artifact store.",
    )
    def adapter(
        context: AssetExecutionContext,
        training_dataset: dict,
        base_model: dict,
        store: ArtifactStore,
        trainer: Trainer,
    ) -> Output[dict]:
        pack_to = spec.format.max_seq_len if spec.format.packing else None
        run_key = json.dumps(
            [
                training_dataset["version"],
                base_model["content_hash"],
                spec.training.model_dump(mode="json"),
                pack_to,
            ],
            sort_keys=True,
        )
        version = hashlib.sha256(run_key.encode()).hexdigest()[:16]
        adapter_dir = store.path("adapters", spec.name, version)
        result = trainer.train(
            spec.training,
            Path(base_model["path"]),
            Path(training_dataset["path"]),
            adapter_dir,
            base_model["trust_remote_code"],
            pack_to,
        )
        weights_hash = folder_sha256(adapter_dir, include=lambda file: file.suffix == ".safetensors")
        manifest = {
            "version": version,
            "path": str(adapter_dir),
            "weights_sha256": weights_hash,
            "dataset_version": training_dataset["version"],
            "steps": result.steps,
            "final_loss": result.final_loss,
        }
        curve = "\n".join(f"| {step} | {loss:.4f} |" for step, loss in result.loss_curve)
        return Output(
            manifest,
            data_version=DataVersion(weights_hash[:32]),
            metadata={
                "path": MetadataValue.path(str(adapter_dir)),
                "method": spec.training.method,
                "steps": result.steps,
                "final_train_loss": result.final_loss,
                "tokens_per_second": result.tokens_per_second,
                "wall_seconds": result.wall_seconds,
                "peak_memory_mb": result.peak_memory_mb,
                "trainable_params": result.trainable_params,
                "trainable_percent": round(result.trainable_percent, 4),
                "packing": spec.format.packing,
                **(
                    {"packing_efficiency": result.packing_efficiency}
                    if result.packing_efficiency is not None
                    else {}
                ),
                "loss_curve": MetadataValue.md("| step | loss |\n|---|---|\n" + curve),
            },
        )

    return adapter
