"""`adapter`: LoRA/QLoRA training, bound to the "gpu" pool so one trains at a time."""

from dagster import AssetExecutionContext, AssetIn, DataVersion, MetadataValue, Output, asset

from assets.automation import conditions
from assets.keys import asset_key
from loraflow.artifacts import folder_sha256
from loraflow.manifests import AdapterManifest, BaseModelManifest, DatasetManifest
from loraflow.plan.memory import GIB
from loraflow.request import check_request_fits, plan_request
from loraflow.spec import PipelineSpec
from loraflow.tracking import Tracking
from loraflow.train import LOSS_CURVE, adapter_version
from resources import ArtifactStore, Trainer, TrainRequest

GPU_POOL = "gpu"


def loss_table(loss: list, evals: list, rows: int = 40) -> str:
    """Markdown: train (and eval) loss at up to `rows` evenly spaced steps, the last always included."""
    every = max(1, len(loss) // rows)
    shown = [point for i, point in enumerate(loss) if i % every == 0 or i == len(loss) - 1]
    by_step = dict(evals)
    lines = ["| step | train loss | training eval loss |", "|---|---|---|"]
    lines += [f"| {step} | {value:.4f} | {by_step.get(step, '')} |" for step, value in shown]
    return "\n".join(lines)


def tracking_metadata(run: dict) -> dict:
    """The tracked run as metadata: its backend, id and a link (MLflow: the run in `make mlflow`)."""
    if not run or run.get("backend") in (None, "none"):
        return {}
    metadata = {"tracking": run["backend"]}
    if run.get("run_id"):
        metadata["tracking_run_id"] = run["run_id"]
    if run.get("url"):
        metadata["tracking_run"] = MetadataValue.url(run["url"])
    if run.get("location"):
        metadata["tracking_store"] = run["location"]
    return metadata


def plan_metadata(estimate) -> dict:
    """The memory plan's figures (`plan_*`) and its itemized table."""
    return {**estimate.metadata(), "memory_plan": MetadataValue.md(estimate.table("GiB"))}


def build_adapter(spec: PipelineSpec):
    @asset(
        key=asset_key(spec, "adapter"),
        group_name=spec.name,
        kinds={"pytorch", "peft"},
        pool=GPU_POOL,
        ins={
            "training_dataset": AssetIn(asset_key(spec, "training_dataset")),
            "base_model": AssetIn(asset_key(spec, "base_model")),
        },
        code_version=spec.training_version(),
        automation_condition=conditions(spec)["adapter"],
        description=f"A {spec.training.method.upper()} adapter (r={spec.training.lora.r}) trained on the "
        "training split; safetensors in the artifact store.",
    )
    def adapter(
        context: AssetExecutionContext,
        training_dataset: DatasetManifest,
        base_model: BaseModelManifest,
        store: ArtifactStore,
        trainer: Trainer,
    ) -> Output[AdapterManifest]:
        pack_to = spec.format.max_seq_len if spec.format.packing else None
        version = adapter_version(
            spec.training, training_dataset.version, base_model.content_hash, pack_to, trainer.device_kind
        )
        adapter_dir = store.path("adapters", spec.name, version)
        tracking = Tracking(
            backend=spec.tracking,
            folder=str(store.path(spec.tracking)) if spec.tracking in ("mlflow", "tensorboard") else None,
            experiment=spec.name,
            run_name=version,
            tags={
                "pipeline": spec.name,
                "dataset_version": training_dataset.version,
                "base_model": base_model.source,
                "base_model_hash": base_model.content_hash,
            },
        )
        request = TrainRequest(
            training=spec.training,
            base_model_dir=base_model.path,
            dataset_dir=training_dataset.path,
            adapter_dir=str(adapter_dir),
            trust_remote_code=base_model.trust_remote_code,
            pack_to=pack_to,
            record={
                "pipeline": spec.name,
                "base_model": base_model.source,
                "base_model_hash": base_model.content_hash,
            },
            kubernetes=spec.kubernetes,
            plan=spec.plan,
            tracking=tracking,
            root=str(spec.root),
        )
        # Preflight: config.json and the dataset summary only, before any weight is loaded. A pod
        # checks its own GPU when it starts; here its estimate is only shown.
        if trainer.trains_on_this_machine:
            estimate = check_request_fits(request)
        else:
            estimate = plan_request(request, trainer.device_kind)
        if estimate is not None:
            context.log.info(
                f"memory plan: about {estimate.peak / GIB:.2f} GiB at peak ({estimate.setup.describe()})"
            )
        result = trainer.train(context, request)
        weights_hash = folder_sha256(adapter_dir, include=lambda file: file.suffix == ".safetensors")
        manifest = AdapterManifest(
            version=version,
            path=str(adapter_dir),
            weights_sha256=weights_hash,
            dataset_version=training_dataset.version,
            steps=result.steps,
            final_loss=result.final_loss,
            packing_efficiency=result.packing_efficiency,
            final_training_eval_loss=result.final_training_eval_loss,
            best_training_eval_loss=result.best_training_eval_loss,
        )
        return Output(
            manifest,
            data_version=DataVersion(weights_hash[:32]),
            metadata={
                **{k: v for k, v in manifest.metadata().items() if k != "final_loss"},
                "path": MetadataValue.path(manifest.path),
                "method": spec.training.method,
                "final_train_loss": result.final_loss,
                "tokens_per_second": result.tokens_per_second,
                "tokens_seen": result.tokens_seen,
                "wall_seconds": result.wall_seconds,
                "peak_memory_mb": result.peak_memory_mb,
                **(
                    {"peak_reserved_mb": result.peak_reserved_mb}
                    if result.peak_reserved_mb is not None
                    else {}
                ),
                "runtime": result.runtime,
                **tracking_metadata(result.tracking),
                "trainable_params": result.trainable_params,
                "trainable_percent": round(result.trainable_percent, 4),
                "resumed_from_step": result.resumed_from_step,
                "world_size": result.world_size,
                "packing": spec.format.packing,
                "loss_curve": MetadataValue.path(str(adapter_dir / LOSS_CURVE)),
                "loss_by_step": MetadataValue.md(loss_table(result.loss_curve, result.eval_curve)),
                **(plan_metadata(estimate) if estimate is not None else {}),
            },
        )

    return adapter
