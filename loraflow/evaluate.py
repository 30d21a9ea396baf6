"""Base versus tuned on the held-out split: loss on assistant tokens and greedy-generation scores.

Both models are scored on the same examples with the same code. The tuned model is the base
(loaded in full precision) with the adapter applied, which is exactly what publishing merges.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraflow.base_model import load_causal_lm
from loraflow.dataset import dataset_tokenizer, load_split
from loraflow.formatting import collate, render
from loraflow.spec import LOWER_IS_BETTER, EvaluationSpec
from loraflow.templates import end_of_turn

log = logging.getLogger(__name__)

METRICS = ("eval_loss", "perplexity", "exact_match", "token_f1", "format_match")


@dataclass
class ModelScores:
    metrics: dict[str, float]
    answers: list[str] = field(default_factory=list)


@dataclass
class EvalReport:
    examples: int
    base: ModelScores
    tuned: ModelScores
    references: list[str]
    prompts: list[str]

    def delta(self, metric: str) -> float:
        return self.tuned.metrics[metric] - self.base.metrics[metric]

    def improvement(self, metric: str) -> float:
        """How much better tuned is than base (positive is better, whatever the metric's direction).

        A metric that could not be computed (no conversations to generate from) counts as no
        improvement at all: minus infinity, so a gate on it fails rather than passes by accident.
        """
        if metric not in self.tuned.metrics:
            return -math.inf
        return -self.delta(metric) if metric in LOWER_IS_BETTER else self.delta(metric)

    def table(self) -> str:
        """A markdown table: metric, base, tuned, delta."""
        lines = ["| metric | base | tuned | delta |", "|---|---|---|---|"]
        for metric in self.base.metrics:
            b, t = self.base.metrics[metric], self.tuned.metrics[metric]
            lines.append(f"| {metric} | {b:.4f} | {t:.4f} | {t - b:+.4f} |")
        return "\n".join(lines)

    def samples(self, n: int = 5) -> str:
        """The first n examples with the reference and both answers, as markdown."""
        parts = []
        for i in range(min(n, len(self.prompts))):
            parts.append(
                f"**prompt**: {self.prompts[i][-300:]}\n\n- reference: `{self.references[i]}`\n"
                f"- base: `{self.base.answers[i][:300]}`\n- tuned: `{self.tuned.answers[i][:300]}`\n"
            )
        return "\n".join(parts)


def normalize_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """F1 over lower-cased word tokens (bag of words overlap)."""
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def assistant_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per trained (assistant) token over the rows."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += int((shift_labels != -100).sum())
    return total_loss / max(1, total_tokens)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for rendered prompts, batched with left padding; an answer ends at the
    template's end-of-turn token or at eos."""
    _, eot_id = end_of_turn(tokenizer)
    stops = sorted({t for t in (tokenizer.eos_token_id, eot_id) if t is not None})
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops,
        )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    tokenizer.padding_side = "right"
    return answers


def score(
    model,
    tokenizer,
    rows: list[dict],
    prompts: list[str],
    references: list[str],
    spec: EvaluationSpec,
    label: str,
) -> ModelScores:
    started = time.perf_counter()
    model.eval()
    loss = assistant_loss(model, rows, tokenizer.pad_token_id, spec.batch_size)
    answers = generate_answers(model, tokenizer, prompts, spec.max_new_tokens, spec.batch_size)
    metrics = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if answers:
        n = len(answers)
        metrics["exact_match"] = sum(a == r for a, r in zip(answers, references, strict=True)) / n
        metrics["token_f1"] = sum(token_f1(a, r) for a, r in zip(answers, references, strict=True)) / n
        if spec.format_regex is not None:
            pattern = re.compile(spec.format_regex)
            metrics["format_match"] = sum(bool(pattern.fullmatch(a)) for a in answers) / n
    log.info(
        "%s: %s (%d examples in %.1fs)",
        label,
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        n,
        time.perf_counter() - started,
    )
    return ModelScores(metrics=metrics, answers=answers)


def evaluate_adapter(
    base_model_dir: Path,
    adapter_dir: Path,
    dataset_dir: Path,
    spec: EvaluationSpec,
    trust_remote_code: bool = False,
) -> EvalReport:
    """Score the base model, then the same model with the adapter, on the held-out split."""
    from peft import PeftModel

    rows = load_split(dataset_dir, "eval")[: spec.max_examples]
    if not rows:
        raise ValueError(f"{dataset_dir}: the eval split is empty; raise format.eval_size or add data")
    tokenizer = dataset_tokenizer(base_model_dir, dataset_dir, trust_remote_code)
    # Generation needs a prompt and a reference answer: conversations have both, plain texts do not.
    chats = [row for row in rows if row["messages"] is not None]
    prompts = [render(tokenizer, row["messages"][:-1], add_generation_prompt=True) for row in chats]
    references = [row["messages"][-1]["content"] for row in chats]

    model = load_causal_lm(base_model_dir, dtype="float32", trust_remote_code=trust_remote_code)
    base = score(model, tokenizer, rows, prompts, references, spec, "base")
    model = PeftModel.from_pretrained(model, adapter_dir)
    tuned = score(model, tokenizer, rows, prompts, references, spec, "tuned")
    return EvalReport(examples=len(rows), base=base, tuned=tuned, references=references, prompts=prompts)
