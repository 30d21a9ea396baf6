"""`evaluation`: base vs tuned on the held-out split, the forgetting probe, and the gate that guards
publishing."""

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
from loraflow.evaluate import EvalReport, evaluate_adapter
from loraflow.merge import latest_published, published_record
from loraflow.spec import GateSpec, PipelineSpec
from resources import ArtifactStore

GATE = "gate"


def gate_verdict(report: EvalReport, gate: GateSpec) -> tuple[bool, dict, list[str]]:
    """Whether the tuned model passes every threshold, the figures, and one line per failed threshold."""
    failures = []
    improvement = report.improvement(gate.metric)
    figures = {"metric": gate.metric, "improvement": improvement, "required": gate.min_improvement}
    if improvement < gate.min_improvement:
        failures.append(
            f"{gate.metric}: the tuned model improves by {improvement:+.4f} over the base, the gate needs "
            f"{gate.min_improvement:+.4f} (short by {gate.min_improvement - improvement:.4f})"
        )
    if report.forgetting is not None:
        figures["forgetting_ratio"] = report.forgetting.ratio
    if gate.max_forgetting_ratio is not None:
        ratio = report.forgetting.ratio if report.forgetting is not None else float("inf")
        figures["max_forgetting_ratio"] = gate.max_forgetting_ratio
        if ratio > gate.max_forgetting_ratio:
            failures.append(
                f"forgetting: the tuned model's loss on the base's own answers to general prompts is {ratio:.2f}x "
                f"the base's, the gate allows {gate.max_forgetting_ratio:.2f}x (over by {ratio - gate.max_forgetting_ratio:.2f})"
            )
    if gate.must_beat_published and report.published is not None:
        over = report.improvement(gate.metric, over="published")
        figures["improvement_over_published"] = over
        figures["published_version"] = report.published_version
        if over < 0:
            failures.append(
                f"{gate.metric}: the tuned model is {-over:.4f} worse than the published version "
                f"{report.published_version} on the same examples"
            )
    return not failures, figures, failures


def build_evaluation(spec: PipelineSpec):
    key = AssetKey([spec.name, "evaluation"])
    gate = spec.evaluation.gate
    thresholds = [f"improves {gate.metric} by at least {gate.min_improvement} over the base"]
    if gate.max_forgetting_ratio is not None:
        thresholds.append(f"drifts at most {gate.max_forgetting_ratio}x on general prompts")
    if gate.must_beat_published:
        thresholds.append("is at least as good as the published version")

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
        "tokens, greedy answers scored by exact match, token F1, ROUGE-L and the format check, and the "
        "forgetting probe on general prompts.",
        check_specs=[
            AssetCheckSpec(
                GATE,
                asset=key,
                blocking=True,
                description=f"The tuned model {'; '.join(thresholds)}. published_model runs only when this passes.",
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
        published = latest_published(store.folder("models", spec.name)) if gate.must_beat_published else None
        same_base = True
        if published is not None:
            same_base = published_record(published[1]).get("base_model_hash") == base_model["content_hash"]
            context.log.info(
                "comparing with the published version %s (%s)",
                published[0],
                "its adapter on this base" if same_base else "its merged weights: another base model",
            )
        report = evaluate_adapter(
            Path(base_model["path"]),
            Path(adapter["path"]),
            Path(training_dataset["path"]),
            spec.evaluation,
            base_model["trust_remote_code"],
            published_dir=published[1] if published else None,
            published_version=published[0] if published else None,
            published_same_base=same_base,
            root=spec.root,
        )
        report_dir = store.folder("reports", spec.name, adapter["version"])
        markdown = report.markdown(f"{spec.name}: evaluation of adapter {adapter['version']}")
        write_text_atomic(report_dir / "evaluation.md", markdown)
        passed, figures, failures = gate_verdict(report, gate)
        manifest = {
            "adapter_version": adapter["version"],
            "examples": report.examples,
            "base": report.base.metrics,
            "tuned": report.tuned.metrics,
            "published": report.published.metrics if report.published else None,
            "forgetting_ratio": report.forgetting.ratio if report.forgetting else None,
            "gate": {"passed": passed, **figures, "failures": failures},
            "table": report.table(),
            "report": str(report_dir / "evaluation.md"),
        }
        write_json_atomic(report_dir / "evaluation.json", manifest)
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
            passed=passed,
            metadata=figures,
            description=None if passed else "; ".join(failures) + ". Not publishing.",
        )

    return evaluation
