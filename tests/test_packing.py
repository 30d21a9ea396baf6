"""Packing: several examples per row, each attending only to itself."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config

from loraflow.formatting import IGNORE_INDEX
from loraflow.packing import (
    collate_flat,
    collate_packed,
    pack_examples,
    packing_efficiency,
    planned_efficiency,
)


def example(length: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (length,), generator=generator).tolist()
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]}


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=200)).eval()
    model.config._attn_implementation = "sdpa"
    return model


def test_packed_logits_equal_each_example_run_alone(tiny_llama):
    examples = [example(n, seed) for seed, n in enumerate((7, 12, 5, 9, 3, 11))]
    rows = pack_examples(examples, max_seq_len=24)
    assert len(rows) < len(examples)
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        packed = tiny_llama(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits
    seen = 0
    for r, row in enumerate(rows):
        start = 0
        for segment in sorted(set(row.segment_ids)):
            n = row.segment_ids.count(segment)
            ids = row.input_ids[start : start + n]
            with torch.no_grad():
                alone = tiny_llama(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[r, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
            seen += 1
    assert seen == len(examples)
    assert torch.isfinite(packed).all()  # padding rows attend to themselves: no NaN anywhere


def test_position_ids_alone_would_let_examples_see_each_other(tiny_llama):
    first, second = example(6, 1), example(6, 2)
    row = pack_examples([first, second], max_seq_len=12)[0]
    with torch.no_grad():
        leaky = tiny_llama(
            input_ids=torch.tensor([row.input_ids]), position_ids=torch.tensor([row.position_ids])
        ).logits
        alone = tiny_llama(input_ids=torch.tensor([row.input_ids[6:]])).logits
    assert (leaky[0, 6:] - alone[0]).abs().max() > 1e-3


def completion(length: int, seed: int) -> dict:
    """An example trained on every token (completion data, or train_on_inputs): labels = input ids."""
    ids = example(length, seed)["input_ids"]
    return {"input_ids": ids, "labels": list(ids)}


def test_examples_are_never_split():
    examples = [example(n, n) for n in (10, 10, 10, 4)]
    rows = pack_examples(examples, max_seq_len=16)
    assert sorted(sorted(r.segment_ids.count(s) for s in set(r.segment_ids)) for r in rows) == [
        [4, 10],
        [10],
        [10],
    ]
    assert packing_efficiency(rows, 16) == pytest.approx(34 / 48)
    with pytest.raises(ValueError, match="more than max_seq_len 8"):
        pack_examples([example(9, 0)], max_seq_len=8)


def test_the_first_token_of_every_packed_example_is_not_trained():
    # every label is trained: only packing can mask a segment's first one
    examples = [completion(n, n) for n in (5, 9, 3, 7, 6)]
    rows = pack_examples(examples, max_seq_len=16)
    assert any(len(set(row.segment_ids)) > 1 for row in rows)
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert [row.labels[i] for i in starts] == [IGNORE_INDEX] * len(starts)
        assert all(row.labels[i] == row.input_ids[i] for i in range(len(row.labels)) if i not in starts)


def test_packed_loss_sums_equal_each_example_run_alone_when_every_token_is_trained(tiny_llama):
    from loraflow.formatting import collate
    from loraflow.train import targets_of, token_loss_sum

    examples = [completion(n, seed) for seed, n in enumerate((8, 6, 10, 4, 7))]
    rows = pack_examples(examples, max_seq_len=20)
    assert len(rows) < len(examples)
    with torch.no_grad():
        # the model's own loss: mean over trained targets, the packed batch against each example alone
        packed = collate_packed(rows, pad_id=0)
        packed_mean = float(tiny_llama(**packed).loss)
        sums = [
            float(tiny_llama(**collate([e], pad_id=0)).loss) * (len(e["input_ids"]) - 1) for e in examples
        ]
        assert packed_mean == pytest.approx(
            sum(sums) / sum(len(e["input_ids"]) - 1 for e in examples), abs=1e-5
        )
        # the training path's loss: a sum over trained targets, packed rows against each example alone
        assert targets_of(rows, packed=True) == targets_of(examples, packed=False)
        alone = sum(float(token_loss_sum(tiny_llama, collate([e], pad_id=0))) for e in examples)
        assert float(token_loss_sum(tiny_llama, packed)) == pytest.approx(alone, rel=1e-5)


def test_planned_efficiency_matches_the_rows_it_would_build():
    examples = [example(n, n) for n in (10, 3, 7, 12, 5, 9, 2, 14)]
    rows = pack_examples(examples, max_seq_len=16)
    lengths = [len(e["input_ids"]) for e in examples]
    assert planned_efficiency(lengths, 16) == packing_efficiency(rows, 16)


def test_flat_batches_for_variable_length_attention_restart_positions_per_example():
    examples = [example(n, n) for n in (6, 4, 5)]
    rows = pack_examples(examples, max_seq_len=10)
    batch = collate_flat(rows)
    assert batch["input_ids"].shape == (1, 15) and "attention_mask" not in batch
    positions = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) == 3  # one sequence per example, whichever row it was packed in
    assert all(batch["labels"][0, i] == IGNORE_INDEX for i in starts)
