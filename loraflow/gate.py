"""The evaluation gate: does the tuned model earn publishing?

The verdict is computed from an evaluation report and the YAML's `evaluation.gate` alone, so it
can be tested, and shown, without Dagster. Every threshold that fails gives one line saying by how
much; the figures behind the verdict have stable keys for the check's metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loraflow.evaluate import EvalReport
from loraflow.spec import PREFERENCE_METRICS, GateSpec


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    figures: dict = field(default_factory=dict)
    """metric, improvement, required, and when they apply forgetting_ratio, max_forgetting_ratio,
    improvement_over_published, published_version."""
    failures: list[str] = field(default_factory=list)
    """One sentence per failed threshold, with the measured figure and the margin."""


def describe_gate(gate: GateSpec) -> str:
    """What the gate asks of the tuned model, in words (the check's description)."""
    thresholds = [f"improves {gate.metric} by at least {gate.min_improvement} over the base"]
    if gate.max_forgetting_ratio is not None:
        thresholds.append(f"drifts at most {gate.max_forgetting_ratio}x on general prompts")
    if gate.must_beat_published:
        thresholds.append("is at least as good as the published version")
    return "; ".join(thresholds)


def gate_verdict(report: EvalReport, gate: GateSpec) -> GateVerdict:
    """Whether the tuned model passes every threshold of `gate`.

    - `min_improvement`: tuned minus base, or base minus tuned for a lower-is-better metric
      (eval_loss), must reach it; a metric the report lacks counts as no improvement at all.
    - `max_forgetting_ratio`: the forgetting probe's ratio must not exceed it; a report without a
      probe fails it (the drift is unknown).
    - `must_beat_published`: when a published version was scored, the tuned model must be at
      least as good on the metric.
    """
    failures = []
    improvement = report.improvement(gate.metric)
    figures: dict = {"metric": gate.metric, "improvement": improvement, "required": gate.min_improvement}
    if improvement < gate.min_improvement:
        short = gate.min_improvement - improvement
        failures.append(
            f"{gate.metric}: the tuned model improves by {improvement:+.4f} over the base, the gate needs "
            f"{gate.min_improvement:+.4f} (short by {short:.4f})"
            if math.isfinite(improvement)
            else f"{gate.metric}: not measured for this dataset ("
            + (
                "no preference pairs in the eval split"
                if gate.metric in PREFERENCE_METRICS
                else "no conversations to answer"
            )
            + "), so it cannot pass"
        )
    if report.forgetting is not None:
        figures["forgetting_ratio"] = report.forgetting.ratio
    if gate.max_forgetting_ratio is not None:
        ratio = report.forgetting.ratio if report.forgetting is not None else math.inf
        figures["max_forgetting_ratio"] = gate.max_forgetting_ratio
        if ratio > gate.max_forgetting_ratio:
            failures.append(
                f"forgetting: the tuned model's loss on the base's own answers to general prompts is {ratio:.2f}x "
                f"the base's, the gate allows {gate.max_forgetting_ratio:.2f}x "
                f"(over by {ratio - gate.max_forgetting_ratio:.2f})"
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
    return GateVerdict(passed=not failures, figures=figures, failures=failures)
