"""From validated rows to chat messages to token ids with a loss mask.

Rules, in one place (validation has already normalized every schema to messages or a text):
- The pipeline's system prompt goes first, unless the conversation has its own system turn.
- The text is rendered with the tokenizer's own chat template, so training sees exactly what
  serving with that template renders.
- Only assistant tokens carry labels, the assistant's end-of-turn token included (a model that
  never trains it never learns to stop). The mask comes from the tokenizer's character offsets
  over the rendered text, not from re-tokenizing pieces.
- A preference pair is two sequences, prompt + chosen and prompt + rejected; the prompt is never
  trained, and `train_turns` / `train_on_inputs` apply within each continuation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


class FormattingError(ValueError):
    """The chat template does not render the way loss masking needs."""


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation with the pipeline's system prompt first, unless it already has a system turn."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template applied to messages, as text."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of each assistant answer.

    A span starts after the template's generation prompt and ends after the end-of-turn marker
    (trailing whitespace after it is not trained).
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        # the conversation up to the last message is the whole text: no need to render it again
        upto = (text if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])).rstrip()
        if not text.startswith(prompt) or not text.startswith(upto) or len(upto) <= len(prompt):
            raise FormattingError(
                "the chat template does not render conversations incrementally (a prefix of the messages "
                "must render to a prefix of the text), so assistant tokens cannot be located"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_completion(tokenizer, text: str) -> TokenizedExample:
    """A plain text trained as a whole, ending in the end-of-sequence token so the model learns to stop."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return TokenizedExample(input_ids=ids, labels=list(ids))


def tokenize_with_mask(
    tokenizer, messages: list[dict], train_turns: str = "all", train_on_inputs: bool = False
) -> TokenizedExample:
    """Token ids of the rendered conversation; labels are the ids on trained spans, else IGNORE_INDEX.

    Trained spans: every assistant answer (`train_turns="all"`), only the last (`"last"`), or the
    whole text (`train_on_inputs=True`).
    """
    return tokenize_conversations(tokenizer, [messages], train_turns, train_on_inputs)[0]


def tokenize_conversations(
    tokenizer, conversations: list[list[dict]], train_turns: str = "all", train_on_inputs: bool = False
) -> list[TokenizedExample]:
    """`tokenize_with_mask` for many conversations, tokenized in one batch (the fast tokenizer's own
    threads do the work)."""
    if not conversations:
        return []
    rendered = [assistant_spans(tokenizer, messages) for messages in conversations]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for (text, spans), ids, offsets in zip(
        rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        if train_on_inputs:
            spans = [(0, len(text))]
        elif train_turns == "last":
            spans = spans[-1:]
        labels = _labelled(ids, offsets, spans)
        examples.append(TokenizedExample(input_ids=list(ids), labels=labels))
    return examples


def _labelled(ids, offsets, spans) -> list[int]:
    return [
        token_id if any(start < end_ and stop > start_ for start_, end_ in spans) else IGNORE_INDEX
        for token_id, (start, stop) in zip(ids, offsets, strict=True)
    ]


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as two sequences sharing the prompt's tokens: prompt + chosen, prompt + rejected."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    prompt_tokens: int
    """Leading tokens the two sequences share: the rendered prompt, up to its generation prompt."""


def tokenize_pairs(
    tokenizer,
    prompts: list[list[dict]],
    chosen: list[list[dict]],
    rejected: list[list[dict]],
    train_turns: str = "all",
    train_on_inputs: bool = False,
) -> list[TokenizedPair]:
    """Preference pairs rendered with the chat template: the prompt is never trained, and within each
    continuation the answers are (all of them, or the `last`, or with `train_on_inputs` every token
    after the prompt). Both sequences of a pair must begin with the same prompt tokens, which DPO's
    reward (a difference of the two sequences' log-probabilities) relies on."""
    if not prompts:
        return []
    texts, trained = [], []
    for prompt, *continuations in zip(prompts, chosen, rejected, strict=True):
        start = len(render(tokenizer, prompt, add_generation_prompt=True))
        for continuation in continuations:
            text, spans = assistant_spans(tokenizer, prompt + continuation)
            spans = [span for span in spans if span[0] >= start]
            if train_on_inputs:
                spans = [(start, len(text))]
            elif train_turns == "last":
                spans = spans[-1:]
            texts.append(text)
            trained.append((start, spans))
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    sequences = []
    for ids, offsets, (start, spans) in zip(
        encoded["input_ids"], encoded["offset_mapping"], trained, strict=True
    ):
        shared = sum(1 for _, stop in offsets if stop <= start)
        sequences.append(
            (TokenizedExample(input_ids=list(ids), labels=_labelled(ids, offsets, spans)), shared)
        )
    pairs = []
    for (good, good_shared), (bad, bad_shared) in zip(sequences[0::2], sequences[1::2], strict=True):
        shared = min(good_shared, bad_shared)
        if good.input_ids[:shared] != bad.input_ids[:shared]:
            raise FormattingError(
                "the two answers of a preference pair do not begin with the same prompt tokens under this chat "
                "template, so their log-probabilities cannot be compared"
            )
        pairs.append(TokenizedPair(chosen=good, rejected=bad, prompt_tokens=shared))
    return pairs


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked from attention and from the loss."""
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
