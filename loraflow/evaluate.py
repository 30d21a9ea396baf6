"""Base versus tuned on the held-out split, a forgetting probe, and the report people read.

Every model is scored on the same examples with the same code:

- loss and perplexity on the assistant's tokens (the trained ones);
- greedy answers, batched, scored against the reference answer by exact match, token F1 and
  ROUGE-L (the `rouge-score` package: words are lower-cased ASCII letters and digits), and by the
  pipeline's format check (a regex, or a JSON schema the parsed answer must satisfy);
- the forgetting probe: on general prompts outside the task, the base model answers greedily, and
  both models' loss on those answers is compared. Their ratio (tuned over base) says how far the
  tuned model drifted from what the base would say; 1.0 is no drift;
- on preference pairs, each model's margin: the summed log-probability of the chosen answer's
  trained tokens minus the rejected one's. `preference_accuracy` is the share of pairs with a
  positive margin and `preference_margin` its mean; `reward_accuracy` is the share of pairs whose
  margin is above the base's on the same pair (DPO's reward accuracy: the model moved towards the
  chosen answer relative to the base) and `reward_margin` the mean difference, so both are 0 for
  the base itself. The chosen answer is the reference of the generation metrics.

The tuned model is the base (loaded in full precision) with the adapter applied, which is exactly
what publishing merges. The published version, when asked for, is scored the same way.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraflow.adapters import adapter_method
from loraflow.base_model import load_causal_lm
from loraflow.dataset import dataset_tokenizer, load_split
from loraflow.formatting import IGNORE_INDEX, collate, render, tokenize_conversations
from loraflow.merge import MergeError, load_published_model
from loraflow.spec import LOWER_IS_BETTER, EvaluationSpec
from loraflow.templates import end_of_turn

log = logging.getLogger(__name__)

METRICS = ("eval_loss", "perplexity", "exact_match", "token_f1", "rouge_l", "format_match")
PAIR_METRICS = ("preference_accuracy", "preference_margin", "reward_accuracy", "reward_margin")
MOVERS = 10

GENERAL_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "What is the capital of Australia?",
    "Write a Python function that returns the factorial of n.",
    "What is 17 times 23?",
    "Give three tips for sleeping well.",
    "Translate 'good morning, how are you?' into French.",
    "Summarize the story of Romeo and Juliet in one sentence.",
    "Name the planets of the solar system in order from the sun.",
    "Write a short poem about autumn leaves.",
    "How does a refrigerator keep food cold?",
    "What is the difference between weather and climate?",
    "Suggest three names for a small bakery.",
)
"""Prompts outside any one fine-tune's task: facts, arithmetic, code, translation, writing."""


class EvaluationError(ValueError):
    """The evaluation cannot run as configured."""


@dataclass
class ModelScores:
    metrics: dict[str, float]
    answers: list[str] = field(default_factory=list)
    example_losses: list[float] = field(default_factory=list)
    """Mean loss per trained token of each eval example, in order."""
    pair_margins: list[float] = field(default_factory=list)
    """Each eval pair's log-probability of chosen minus rejected, in order (preference data)."""


@dataclass
class Forgetting:
    prompts: list[str]
    base_answers: list[str]
    tuned_answers: list[str]
    base_loss: float
    tuned_loss: float

    @property
    def ratio(self) -> float:
        return self.tuned_loss / self.base_loss if self.base_loss > 0 else math.inf


@dataclass
class EvalReport:
    examples: int
    base: ModelScores
    tuned: ModelScores
    references: list[str]
    prompts: list[str]
    rows: list[dict] = field(default_factory=list)
    published: ModelScores | None = None
    published_version: str | None = None
    forgetting: Forgetting | None = None

    def delta(self, metric: str) -> float:
        return self.tuned.metrics[metric] - self.base.metrics[metric]

    def improvement(self, metric: str, over: str = "base") -> float:
        """How much better tuned is than `over` (base or published), positive is better whatever the
        metric's direction.

        A metric that could not be computed (no conversations to generate from) counts as no
        improvement at all: minus infinity, so a gate on it fails rather than passes by accident.
        """
        other = self.base if over == "base" else self.published
        if other is None or metric not in self.tuned.metrics or metric not in other.metrics:
            return -math.inf
        delta = self.tuned.metrics[metric] - other.metrics[metric]
        return -delta if metric in LOWER_IS_BETTER else delta

    def table(self) -> str:
        """A markdown table: metric, base, tuned, delta (and the published version, when scored)."""
        header = "| metric | base | tuned | delta |"
        rule = "|---|---|---|---|"
        if self.published is not None:
            header += f" published ({self.published_version}) |"
            rule += "---|"
        lines = [header, rule]
        for metric in self.base.metrics:
            b, t = self.base.metrics[metric], self.tuned.metrics[metric]
            line = f"| {metric} | {b:.4f} | {t:.4f} | {t - b:+.4f} |"
            if self.published is not None:
                line += f" {self.published.metrics.get(metric, math.nan):.4f} |"
            lines.append(line)
        if self.forgetting is not None:
            f = self.forgetting
            lines.append(
                f"| forgetting (loss on base answers) | {f.base_loss:.4f} | {f.tuned_loss:.4f} | "
                f"x{f.ratio:.2f} |" + (" |" if self.published is not None else "")
            )
        return "\n".join(lines)

    def movers(self, n: int = MOVERS) -> tuple[list[int], list[int]]:
        """Indexes of the `n` examples whose loss improved most, and the `n` that got most worse."""
        change = [t - b for b, t in zip(self.base.example_losses, self.tuned.example_losses, strict=True)]
        order = sorted(range(len(change)), key=lambda i: change[i])
        improved = [i for i in order[:n] if change[i] < 0]
        regressed = [i for i in reversed(order[-n:]) if change[i] > 0]
        return improved, regressed

    def example_markdown(self, i: int) -> str:
        """One eval example: prompt, reference, both answers (when generated) and both losses."""
        row = self.rows[i]
        b, t = self.base.example_losses[i], self.tuned.example_losses[i]
        if row["messages"] is None:
            return f"- `{_clip(row['text'], 160)}`: loss {b:.3f} -> {t:.3f}"
        k = self._chat_index(i)
        prompt = row["messages"][-2]["content"] if len(row["messages"]) > 1 else ""
        return (
            f"- **{_clip(prompt, 200)}** (loss {b:.3f} -> {t:.3f})\n"
            f"  - reference: `{_clip(self.references[k], 200)}`\n"
            f"  - base: `{_clip(self.base.answers[k], 200)}`\n"
            f"  - tuned: `{_clip(self.tuned.answers[k], 200)}`"
        )

    def _chat_index(self, i: int) -> int:
        return sum(1 for row in self.rows[:i] if row["messages"] is not None)

    def samples(self) -> str:
        """Markdown: the examples that improved and regressed most."""
        improved, regressed = self.movers()
        parts = [f"### Improved most ({len(improved)})", *(self.example_markdown(i) for i in improved)]
        parts += [f"### Regressed most ({len(regressed)})", *(self.example_markdown(i) for i in regressed)]
        return "\n\n".join(parts)

    def forgetting_markdown(self, n: int = 3) -> str:
        if self.forgetting is None:
            return "The forgetting probe is off."
        f = self.forgetting
        lines = [
            f"On {len(f.prompts)} general prompts the tuned model's loss on the base model's own answers is "
            f"{f.tuned_loss:.3f} against the base's {f.base_loss:.3f}: ratio {f.ratio:.2f} (1.00 is no drift)."
        ]
        for prompt, base, tuned in list(zip(f.prompts, f.base_answers, f.tuned_answers, strict=True))[:n]:
            lines.append(f"- **{prompt}**\n  - base: `{_clip(base, 160)}`\n  - tuned: `{_clip(tuned, 160)}`")
        return "\n\n".join(lines)

    def markdown(self, title: str) -> str:
        """The whole report as one markdown document."""
        return (
            f"# {title}\n\n{self.examples} held-out examples.\n\n## Metrics\n\n{self.table()}\n\n"
            f"## Forgetting\n\n{self.forgetting_markdown()}\n\n## Examples\n\n{self.samples()}\n"
        )


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# metrics


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


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence of words)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]
    return sum(scores) / len(scores) if scores else 0.0


def answer_metrics(answers: list[str], references: list[str], matches_format=None) -> dict[str, float]:
    """Means over the answers: `exact_match` (equal strings, after stripping surrounding whitespace),
    `token_f1`, `rouge_l`, and `format_match` when there is a format check. Empty without answers."""
    if not answers:
        return {}
    n = len(answers)
    pairs = list(zip(answers, references, strict=True))
    metrics = {
        "exact_match": sum(a.strip() == r.strip() for a, r in pairs) / n,
        "token_f1": sum(token_f1(a, r) for a, r in pairs) / n,
        "rouge_l": rouge_l(answers, references),
    }
    if matches_format is not None:
        metrics["format_match"] = sum(bool(matches_format(a)) for a in answers) / n
    return metrics


def format_checker(spec: EvaluationSpec, root: Path | None = None):
    """A function answer -> bool from the spec's format check, or None when there is none."""
    if spec.format_regex is not None:
        pattern = re.compile(spec.format_regex)
        return lambda answer: bool(pattern.fullmatch(answer))
    if spec.format_json_schema is None:
        return None
    from jsonschema import Draft202012Validator

    schema = spec.format_json_schema
    if isinstance(schema, str):
        path = Path(schema) if root is None or Path(schema).is_absolute() else Path(root) / schema
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise EvaluationError(f"evaluation.format_json_schema: cannot read {path}: {err}") from None
    validator = Draft202012Validator(schema)

    def matches(answer: str) -> bool:
        try:
            return validator.is_valid(json.loads(answer))
        except json.JSONDecodeError:
            return False

    return matches


# ---------------------------------------------------------------------------------------------
# scoring


@torch.no_grad()
def token_losses(model, rows: list[dict], pad_id: int, batch_size: int) -> tuple[list[float], list[int]]:
    """Each row's summed cross-entropy over its trained tokens (minus its log-probability of them),
    and how many trained tokens it has."""
    sums, counts = [], []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, reduction="none", ignore_index=IGNORE_INDEX
        )
        sums += [float(s) for s in losses.sum(dim=1)]
        counts += [int(c) for c in (shift_labels != IGNORE_INDEX).sum(dim=1)]
    return sums, counts


def example_losses(model, rows: list[dict], pad_id: int, batch_size: int) -> tuple[list[float], float]:
    """Each row's mean cross-entropy per trained token, and the mean over all trained tokens."""
    return _means(*token_losses(model, rows, pad_id, batch_size))


def _means(sums: list[float], counts: list[int]) -> tuple[list[float], float]:
    """Per-row mean losses per trained token, and the mean over every trained token."""
    return [s / max(1, c) for s, c in zip(sums, counts, strict=True)], sum(sums) / max(1, sum(counts))


def pair_margins(
    model, rows: list[dict], chosen_losses: list[float], pad_id: int, batch_size: int
) -> list[float]:
    """Each preference pair's log-probability of the chosen answer minus the rejected one's, for the
    rows that are pairs; `chosen_losses` are the rows' summed losses (token_losses), already computed
    for eval_loss, so only the rejected sequences run again."""
    pairs = [i for i, row in enumerate(rows) if row.get("rejected_input_ids") is not None]
    rejected, _ = token_losses(
        model,
        [{"input_ids": rows[i]["rejected_input_ids"], "labels": rows[i]["rejected_labels"]} for i in pairs],
        pad_id,
        batch_size,
    )
    return [r - chosen_losses[i] for i, r in zip(pairs, rejected, strict=True)]


def pair_metrics(margins: list[float], base_margins: list[float]) -> dict[str, float]:
    """The preference metrics of one model from its margins and the base's on the same pairs."""
    if not margins:
        return {}
    gains = [m - b for m, b in zip(margins, base_margins, strict=True)]
    n = len(margins)
    return {
        "preference_accuracy": sum(m > 0 for m in margins) / n,
        "preference_margin": sum(margins) / n,
        "reward_accuracy": sum(g > 0 for g in gains) / n,
        "reward_margin": sum(gains) / n,
    }


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for rendered prompts, batched with left padding; an answer ends at the
    template's end-of-turn token or at eos."""
    _, eot_id = end_of_turn(tokenizer)
    stops = sorted({t for t in (tokenizer.eos_token_id, eot_id) if t is not None})
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
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
    finally:
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
    matches_format=None,
    base: ModelScores | None = None,
) -> ModelScores:
    """One model's metrics on the eval rows (and its answers to the conversations' prompts). On
    preference pairs, `base` is the base model's scores (None when scoring the base itself)."""
    started = time.perf_counter()
    model.eval()
    sums, counts = token_losses(model, rows, tokenizer.pad_token_id, spec.batch_size)
    per_row, loss = _means(sums, counts)
    answers = generate_answers(model, tokenizer, prompts, spec.max_new_tokens, spec.batch_size)
    metrics = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    metrics.update(answer_metrics(answers, references, matches_format))
    margins = pair_margins(model, rows, sums, tokenizer.pad_token_id, spec.batch_size)
    metrics.update(pair_metrics(margins, base.pair_margins if base is not None else margins))
    log.info(
        "%s: %s (%d examples in %.1fs)",
        label,
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        len(rows),
        time.perf_counter() - started,
    )
    return ModelScores(metrics=metrics, answers=answers, example_losses=per_row, pair_margins=margins)


def forgetting_prompts(spec: EvaluationSpec, root: Path | None = None) -> list[str]:
    """The probe's prompts: the YAML's file or list, else the built-in general prompts."""
    probe = spec.forgetting
    if probe.file is not None:
        path = Path(probe.file) if root is None or Path(probe.file).is_absolute() else Path(root) / probe.file
        if not path.is_file():
            raise EvaluationError(f"evaluation.forgetting.file: no such file {path}")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise EvaluationError(f"evaluation.forgetting.file: {path} has no prompts (one per line)")
        return prompts
    return list(probe.prompts) if probe.prompts else list(GENERAL_PROMPTS)


def _probe_rows(tokenizer, prompts: list[str], answers: list[str]) -> tuple[list[str], list[str], list[dict]]:
    """The prompts the base answered (an empty answer says nothing), and the rows to score on."""
    kept = [(p, a) for p, a in zip(prompts, answers, strict=True) if a]
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": a}] for p, a in kept]
    examples = tokenize_conversations(tokenizer, conversations)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    return [p for p, _ in kept], [a for _, a in kept], rows


def evaluate_adapter(
    base_model_dir: Path,
    adapter_dir: Path,
    dataset_dir: Path,
    spec: EvaluationSpec,
    trust_remote_code: bool = False,
    published_dir: Path | None = None,
    published_version: str | None = None,
    published_same_base: bool = True,
    root: Path | None = None,
) -> EvalReport:
    """Score the base model and the base with the adapter on the held-out split, and run the
    forgetting probe. With `published_dir` (a published version's folder), score that version too:
    its adapter on this base when it was trained on the same base, else its merged weights."""
    from peft import PeftModel

    rows = load_split(dataset_dir, "eval")[: spec.max_examples]
    if not rows:
        raise EvaluationError(f"{dataset_dir}: the eval split is empty; raise format.eval_size or add data")
    tokenizer = dataset_tokenizer(base_model_dir, dataset_dir, trust_remote_code)
    matches_format = format_checker(spec, root)
    # Generation needs a prompt and a reference answer: conversations have both, plain texts do not.
    chats = [row for row in rows if row["messages"] is not None]
    prompts = [render(tokenizer, row["messages"][:-1], add_generation_prompt=True) for row in chats]
    references = [row["messages"][-1]["content"] for row in chats]

    model = load_causal_lm(base_model_dir, dtype="float32", trust_remote_code=trust_remote_code)
    base = score(model, tokenizer, rows, prompts, references, spec, "base", matches_format)
    probe = None
    if spec.forgetting.enabled:
        general = forgetting_prompts(spec, root)
        general_rendered = [
            render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in general
        ]
        base_general = generate_answers(
            model, tokenizer, general_rendered, spec.forgetting.max_new_tokens, spec.batch_size
        )
        probe_prompts, probe_answers, probe_rows = _probe_rows(tokenizer, general, base_general)
        _, probe_base_loss = example_losses(model, probe_rows, tokenizer.pad_token_id, spec.batch_size)

    model = PeftModel.from_pretrained(model, adapter_dir, adapter_name="tuned")
    tuned = score(model, tokenizer, rows, prompts, references, spec, "tuned", matches_format, base)
    if spec.forgetting.enabled and not probe_rows:
        log.warning(
            "the base model answered none of the %d general prompts: forgetting not measured", len(general)
        )
    elif spec.forgetting.enabled:
        _, probe_tuned_loss = example_losses(model, probe_rows, tokenizer.pad_token_id, spec.batch_size)
        tuned_general = generate_answers(
            model,
            tokenizer,
            [
                render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
                for p in probe_prompts
            ],
            spec.forgetting.max_new_tokens,
            spec.batch_size,
        )
        probe = Forgetting(probe_prompts, probe_answers, tuned_general, probe_base_loss, probe_tuned_loss)
        log.info(
            "forgetting: loss on the base's answers %.4f -> %.4f (x%.2f)",
            probe_base_loss,
            probe_tuned_loss,
            probe.ratio,
        )

    published = None
    # the published adapter joins the tuned one on this base when PEFT can hold both (the same
    # method); otherwise the published version is loaded alone: merged weights, or its adapter on this base
    beside = (
        published_dir is not None
        and published_same_base
        and adapter_method(Path(published_dir) / "adapter") == adapter_method(Path(adapter_dir))
    )
    if beside:
        model.load_adapter(str(Path(published_dir) / "adapter"), adapter_name="published")
        model.set_adapter("published")
        published = score(
            model, tokenizer, rows, prompts, references, spec, "published", matches_format, base
        )
    elif published_dir is not None:
        del model
        try:
            other = load_published_model(
                Path(published_dir),
                Path(base_model_dir) if published_same_base else None,
                trust_remote_code=trust_remote_code,
            )
        except MergeError as err:
            raise EvaluationError(
                f"evaluation.gate.must_beat_published: {err}; it was trained on another base, so it cannot be "
                "scored here"
            ) from None
        published = score(
            other, tokenizer, rows, prompts, references, spec, "published", matches_format, base
        )
    return EvalReport(
        examples=len(rows),
        base=base,
        tuned=tuned,
        references=references,
        prompts=prompts,
        rows=rows,
        published=published,
        published_version=published_version,
        forgetting=probe,
    )
