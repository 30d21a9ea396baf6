"""`evaluation`: base vs tuned on the held-out split, and the gate that guards publishing."""

from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    MetadataValue,
    Output,
    asset,
)

from loraflow.artifacts import write_json_atomic, write_text_atomic
from loraflow.evaluate import evaluate_adapter
from loraflow.spec import PipelineSpec
from resources import ArtifactStore

GATE = "gate"


def build_evaluation(spec: PipelineSpec):
    key = AssetKey([spec.name, "evaluation"])
    gate = spec.evaluation.gate

    @asset(
        key=key,
        group_name=spec.name,
        kinds={"pytorch"},
        ins={
            "adapter": AssetIn(AssetKey([spec.name, "adapter"])),
            "training_dataset": AssetIn(AssetKey([spec.name, "training_dataset"])),
            "base_model": AssetIn(AssetKey([spec.name, "base_model"])),
        },
        code_version=spec.section_version("evaluation"),
        description="Base and tuned model side by side on held-out examples: loss and perplexity on assistant "
        "tokens, and greedy answers scored by exact match, token F1 and the format regex.",
        check_specs=[
            AssetCheckSpec(
                GATE,
                asset=key,
                blocking=True,
                description=f"The tuned model improves {gate.metric} by at least {gate.min_improvement} over the "
                "base; published_model runs only when this passes.",
            )
        ],
    )
    def evaluation(
        context: AssetExecutionContext,
        adapter: dict,
        training_dataset: dict,
        base_model: dict,
        store: ArtifactStore,
    ):
        report = evaluate_adapter(
            Path(base_model["path"]),
            Path(adapter["path"]),
            Path(training_dataset["path"]),
            spec.evaluation,
            base_model["trust_remote_code"],
        )
        report_dir = store.folder("reports", spec.name, adapter["version"])
        markdown = f"# {spec.name}: evaluation\n\n{report.table()}\n\n## Samples\n\n{report.samples()}\n"
        write_text_atomic(report_dir / "evaluation.md", markdown)
        manifest = {
            "adapter_version": adapter["version"],
            "examples": report.examples,
            "base": report.base.metrics,
            "tuned": report.tuned.metrics,
            "table": report.table(),
            "report": str(report_dir / "evaluation.md"),
        }
        write_json_atomic(report_dir / "evaluation.json", manifest)
        metric_values = {
            f"{side}_{name}": value
            for side in ("base", "tuned")
            for name, value in getattr(report, side).metrics.items()
        }
        yield Output(
            manifest,
            metadata={
                **metric_values,
                "examples": report.examples,
                "report": MetadataValue.path(str(report_dir / "evaluation.md")),
                "metrics": MetadataValue.md(report.table()),
                "samples": MetadataValue.md(report.samples()),
            },
        )
        improvement = report.improvement(gate.metric)
        passed = improvement >= gate.min_improvement
        yield AssetCheckResult(
            check_name=GATE,
            passed=passed,
            metadata={"metric": gate.metric, "improvement": improvement, "required": gate.min_improvement},
            description=None
            if passed
            else (
                f"{gate.metric}: the tuned model improves by {improvement:+.4f}, the gate needs "
                f"{gate.min_improvement:+.4f} (short by {gate.min_improvement - improvement:.4f}); not publishing"
            ),
        )

    return evaluation
