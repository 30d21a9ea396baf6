"""Packing: several tokenized examples per row of `max_seq_len`, none attending to another.

Rows are filled best-fit in decreasing order of length, which wastes little room and is
deterministic. Inside a row, each example keeps its own position ids (restarting at 0) and a
block-diagonal causal mask lets a token see only earlier tokens of its own example. Position ids
alone do not isolate examples under sdpa or eager attention in transformers 5.x; the 4D mask does
(packed logits then equal each example's logits run alone, which a test pins).

The first label of every example is masked too: in the model's shifted loss it would be predicted
from the previous example's last token.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from loraflow.formatting import IGNORE_INDEX


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    """Which example of the row each token belongs to (0, 1, ...)."""


def plan_rows(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Which examples (by index) go into each row, from their lengths alone.

    Best fit, longest first: each example goes into the row with the least room that still holds
    it (the earliest such row on a tie), found by bisection, so 100,000 examples pack in a second.
    An example is never split; one longer than `max_seq_len` is an error (drop or truncate it first).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row number), sorted
    for i in order:
        length = lengths[i]
        if length > max_seq_len:
            raise ValueError(f"example {i} has {length} tokens, more than max_seq_len {max_seq_len}")
        at = bisect.bisect_left(free, (length, -1))
        if at == len(free):
            bins.append([i])
            room, row = max_seq_len - length, len(bins) - 1
        else:
            room, row = free.pop(at)
            bins[row].append(i)
            room -= length
        if room > 0:
            bisect.insort(free, (room, row))
    return bins


def pack_examples(examples: list[dict], max_seq_len: int) -> list[PackedRow]:
    """Pack examples (dicts with `input_ids` and `labels`) into rows of at most `max_seq_len` tokens."""
    bins = plan_rows([len(example["input_ids"]) for example in examples], max_seq_len)
    return [_row([examples[i] for i in members]) for members in bins]


def planned_efficiency(lengths: list[int], max_seq_len: int) -> float:
    """The packing efficiency examples of these lengths would get, without building the rows."""
    rows = plan_rows(lengths, max_seq_len)
    return sum(lengths) / (len(rows) * max_seq_len) if rows else 0.0


def _row(members: list[dict]) -> PackedRow:
    input_ids, labels, positions, segments = [], [], [], []
    for segment, example in enumerate(members):
        n = len(example["input_ids"])
        input_ids += list(example["input_ids"])
        labels += [IGNORE_INDEX, *example["labels"][1:]]
        positions += list(range(n))
        segments += [segment] * n
    return PackedRow(input_ids=input_ids, labels=labels, position_ids=positions, segment_ids=segments)


def packing_efficiency(rows: list[PackedRow], max_seq_len: int) -> float:
    """Real tokens over the tokens of all rows at full length (1.0 is no padding at all)."""
    if not rows:
        return 0.0
    return sum(len(r.input_ids) for r in rows) / (len(rows) * max_seq_len)


def collate_packed(
    rows: list[PackedRow], pad_id: int, additive: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A batch of packed rows: ids, labels, position ids and a 4D block-diagonal causal mask.

    The mask is boolean (True: may attend), which sdpa takes; with `additive` a dtype, it is 0 where
    a token may attend and that dtype's lowest value elsewhere, which eager attention adds to its
    scores (it would add a boolean mask as 0/1, masking nothing). Padding attends only to itself,
    so no attention row is empty (an empty one gives NaN in sdpa).
    """
    width = max(len(r.input_ids) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segments = torch.full((batch, width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        position_ids[i, :n] = torch.tensor(row.position_ids)
        segments[i, :n] = torch.tensor(row.segment_ids)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    real = (segments >= 0)[:, :, None]
    mask = ((same & causal & real) | torch.eye(width, dtype=torch.bool))[:, None, :, :]
    if additive is not None:
        mask = torch.zeros(mask.shape, dtype=additive).masked_fill(~mask, torch.finfo(additive).min)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": mask,
    }


def collate_flat(rows: list[PackedRow]) -> dict[str, torch.Tensor]:
    """A batch of packed rows laid end to end in one row of shape (1, tokens), with position ids and no
    mask: the form flash-attention's variable-length kernel takes (each restart of the position ids
    begins a new sequence). For `attn_implementation: flash_attention_2` only: other kernels would
    let examples attend to each other."""
    input_ids = [t for row in rows for t in row.input_ids]
    labels = [t for row in rows for t in row.labels]
    position_ids = [t for row in rows for t in row.position_ids]
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
    }
