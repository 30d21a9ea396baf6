"""`adapter`: LoRA/QLoRA training (SFT, DPO or ORPO), bound to the "gpu" pool so one trains at a time.

With `training.start_from`, the adapter also depends on the other pipeline's adapter: its latest
materialization is where the training starts, its version is part of this adapter's version, and
its own lineage is copied into this adapter's training record (and so into the model card).
"""

import json
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from assets.automation import conditions
from assets.keys import asset_key
from loraflow.artifacts import folder_sha256
from loraflow.hashing import content_hash
from loraflow.manifests import AdapterManifest, BaseModelManifest, DatasetManifest
from loraflow.plan.memory import GIB
from loraflow.request import check_request_fits, plan_request
from loraflow.spec import PipelineSpec
from loraflow.tracking import Tracking
from loraflow.train import LOSS_CURVE, TRAINING_RECORD, adapter_version
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


def start_adapter(context: AssetExecutionContext, key: AssetKey, base_model_hash: str) -> dict:
    """The adapter another pipeline published last (`training.start_from`): its folder, version and
    lineage, checked to be trained on the same base model."""
    event = context.instance.get_latest_materialization_event(key)
    if event is None or event.asset_materialization is None:
        raise Failure(
            f"training.start_from: {key.to_user_string()} has never been materialized; materialize that "
            "pipeline's adapter first (or the whole pipeline)"
        )
    metadata = event.asset_materialization.metadata
    folder = Path(metadata["path"].value)
    record_file = folder / TRAINING_RECORD
    if not record_file.is_file():
        raise Failure(
            f"training.start_from: {key.to_user_string()}'s adapter folder {folder} is gone; re-materialize it"
        )
    record = json.loads(record_file.read_text(encoding="utf-8"))
    if record.get("base_model_hash") != base_model_hash:
        raise Failure(
            f"training.start_from: {key.to_user_string()} was trained on base model {record.get('base_model')} "
            f"({str(record.get('base_model_hash'))[:12]}), this pipeline's base is another "
            f"({base_model_hash[:12]}); an adapter only fits the base it was trained on. Give both pipelines "
            "the same base_model"
        )
    return {
        "pipeline": key.path[0],
        "adapter_version": metadata["version"].value,
        "weights_sha256": metadata["weights_sha256"].value,
        "path": str(folder),
        "objective": record.get("training", {}).get("objective", "sft"),
        "adapter": record.get("training", {}).get("adapter", "lora"),
        "dataset_version": record.get("dataset_version"),
        "start_from": record.get("start_from"),
    }


def build_adapter(spec: PipelineSpec):
    start_key = asset_key(spec.training.start_from, "adapter") if spec.training.start_from else None

    @asset(
        key=asset_key(spec, "adapter"),
        group_name=spec.name,
        kinds={"pytorch", "peft"},
        pool=GPU_POOL,
        ins={
            "training_dataset": AssetIn(asset_key(spec, "training_dataset")),
            "base_model": AssetIn(asset_key(spec, "base_model")),
        },
        deps=[start_key] if start_key else [],
        code_version=spec.training_version(),
        automation_condition=conditions(spec)["adapter"],
        description=describe_adapter(spec),
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
        start = start_adapter(context, start_key, base_model.content_hash) if start_key else None
        if start is not None:
            version = content_hash([version, start["weights_sha256"]])
            context.log.info(
                f"starting from {start['pipeline']}'s adapter {start['adapter_version']} ({start['objective']})"
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
                **({"start_from": {k: v for k, v in start.items() if k != "path"}} if start else {}),
            },
            start_adapter_dir=start["path"] if start else None,
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
                "objective": spec.training.objective,
                "adapter_method": spec.training.adapter if start is None else start["adapter"],
                **({"started_from": f"{start['pipeline']} {start['adapter_version']}"} if start else {}),
                **(
                    {"reward_accuracy": result.reward_accuracy, "reward_margin": result.reward_margin}
                    if result.reward_accuracy is not None
                    else {}
                ),
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


def describe_adapter(spec: PipelineSpec) -> str:
    """The adapter asset's description in the UI."""
    training = spec.training
    shape = {
        "lora": f"LoRA (r={training.lora.r})",
        "adalora": f"AdaLoRA (rank {training.adalora.init_r} -> {training.adalora.target_r})",
        "ia3": "IA3",
        "prefix": f"prefix ({training.prefix.num_virtual_tokens} virtual tokens)",
    }[training.adapter]
    what = {
        "sft": "on the training split",
        "dpo": "with DPO on the preference pairs",
        "orpo": "with ORPO on the preference pairs",
    }
    base = "a 4-bit base (QLoRA)" if training.method == "qlora" else "the base"
    start = f", starting from {training.start_from}'s adapter" if training.start_from else ""
    return f"A {shape if not training.start_from else 'continued'} adapter on {base}, trained {what[training.objective]}{start}; safetensors in the artifact store."
