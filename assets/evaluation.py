"""`evaluation`: base vs tuned on the held-out split, the forgetting probe, and the gate that guards
publishing."""

from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    MetadataValue,
    Output,
    asset,
)

from assets.automation import conditions
from assets.keys import asset_key
from assets.training import GPU_POOL
from loraflow.artifacts import write_json_atomic, write_text_atomic
from loraflow.evaluate import evaluate_adapter
from loraflow.gate import describe_gate, gate_verdict
from loraflow.manifests import AdapterManifest, BaseModelManifest, DatasetManifest, EvaluationManifest
from loraflow.merge import latest_published, published_record
from loraflow.spec import PipelineSpec
from resources import ArtifactStore

GATE = "gate"


def build_evaluation(spec: PipelineSpec):
    key = asset_key(spec, "evaluation")
    gate = spec.evaluation.gate

    @asset(
        key=key,
        group_name=spec.name,
        # scores (or merges) a full-precision model on the training device: one at a time with training
        pool=GPU_POOL,
        kinds={"pytorch"},
        ins={
            "adapter": AssetIn(asset_key(spec, "adapter")),
            "training_dataset": AssetIn(asset_key(spec, "training_dataset")),
            "base_model": AssetIn(asset_key(spec, "base_model")),
        },
        code_version=spec.section_version("evaluation"),
        automation_condition=conditions(spec)["evaluation"],
        description="Base and tuned model side by side on held-out examples: loss and perplexity on assistant "
        "tokens, greedy answers scored by exact match, token F1, ROUGE-L and the format check, and the "
        "forgetting probe on general prompts.",
        check_specs=[
            AssetCheckSpec(
                GATE,
                asset=key,
                blocking=True,
                description=f"The tuned model {describe_gate(gate)}. published_model runs only when this passes.",
            )
        ],
    )
    def evaluation(
        context: AssetExecutionContext,
        adapter: AdapterManifest,
        training_dataset: DatasetManifest,
        base_model: BaseModelManifest,
        store: ArtifactStore,
    ):
        published = (
            latest_published(store.fetch_latest("models", spec.name)) if gate.must_beat_published else None
        )
        same_base = True
        if published is not None:
            same_base = published_record(published[1]).get("base_model_hash") == base_model.content_hash
            context.log.info(
                "comparing with the published version %s (%s)",
                published[0],
                "its adapter on this base" if same_base else "its merged weights: another base model",
            )
        report = evaluate_adapter(
            Path(base_model.path),
            Path(adapter.path),
            Path(training_dataset.path),
            spec.evaluation,
            base_model.trust_remote_code,
            published_dir=published[1] if published else None,
            published_version=published[0] if published else None,
            published_same_base=same_base,
            root=spec.root,
        )
        report_dir = store.folder("reports", spec.name, adapter.version)
        markdown = report.markdown(f"{spec.name}: evaluation of adapter {adapter.version}")
        write_text_atomic(report_dir / "evaluation.md", markdown)
        verdict = gate_verdict(report, gate)
        manifest = EvaluationManifest(
            adapter_version=adapter.version,
            examples=report.examples,
            base=report.base.metrics,
            tuned=report.tuned.metrics,
            published=report.published.metrics if report.published else None,
            forgetting_ratio=report.forgetting.ratio if report.forgetting else None,
            gate={"passed": verdict.passed, **verdict.figures, "failures": verdict.failures},
            table=report.table(),
            report=str(report_dir / "evaluation.md"),
        )
        write_json_atomic(report_dir / "evaluation.json", manifest.model_dump(mode="json"))
        metric_values = {
            f"{side}_{name}": value
            for side in ("base", "tuned")
            for name, value in getattr(report, side).metrics.items()
        }
        if report.forgetting is not None:
            metric_values["forgetting_ratio"] = report.forgetting.ratio
        yield Output(
            manifest,
            metadata={
                **metric_values,
                "examples": report.examples,
                "report": MetadataValue.path(str(report_dir / "evaluation.md")),
                "metrics": MetadataValue.md(report.table()),
                "examples_that_moved": MetadataValue.md(report.samples()),
                "forgetting": MetadataValue.md(report.forgetting_markdown()),
            },
        )
        yield AssetCheckResult(
            check_name=GATE,
            passed=verdict.passed,
            metadata=verdict.figures,
            description=None if verdict.passed else "; ".join(verdict.failures) + ". Not publishing.",
        )

    return evaluation
