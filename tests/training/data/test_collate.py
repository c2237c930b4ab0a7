"""training/data/collate.py: padding and masks, the targets every position gets, and packed batches that
give the padded batch's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.data.collate import (
    IGNORE_INDEX,
    collate_classification_batch,
    collate_instruction_batch,
    collate_packed_instruction_batch,
    collate_windows,
    pack_rows,
)
from training.data.instructions import build_instruction_dataset
from training.data.tasks import make_task_splits


def test_collate_gives_every_position_its_next_token_as_shift_label():

    windows = [{"input_ids": list(range(i, i + 9))} for i in (10, 50)]
    batch = collate_windows(windows)
    assert batch["input_ids"].dtype == batch["shift_labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [list(range(10, 18)), list(range(50, 58))]
    assert batch["shift_labels"].tolist() == [list(range(11, 19)), list(range(51, 59))]

    torch.manual_seed(0)
    model = MiniGPTForCausalLM(MiniGPTConfig.from_preset("tiny", vocab_size=64, context_length=8)).eval()
    out = model(**batch)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), batch["shift_labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected)  # all 8 positions scored, none wasted


def test_collate_pads_right_to_the_longest_in_batch():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [1, 2, 3, 4, 9], "labels": [-100, -100, 3, 4, 9]},
    ]
    out = collate_instruction_batch(batch, pad_token_id=99)
    assert out["input_ids"].tolist() == [[5, 6, 7, 99, 99], [1, 2, 3, 4, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 3, 4, 9]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_pads_either_side():
    batch = [{"input_ids": [5, 6, 7], "labels": 1}, {"input_ids": [8], "labels": 0}]
    right = collate_classification_batch(batch, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [1, 0]
    left = collate_classification_batch(batch, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding side must be 'right' or 'left', got 'middle'"):
        collate_classification_batch(batch, pad_token_id=0, padding_side="middle")


# ----------------------------------------------------------------------------- packing


def test_rows_are_filled_longest_first_and_never_overflow():
    lengths = [5, 9, 3, 7, 2, 4]
    rows = pack_rows(lengths, row_tokens=10)
    assert rows == [[1], [3, 2], [0, 5], [4]]  # 9 | 7+3 | 5+4 | 2 (first fit, longest first)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    with pytest.raises(ValueError, match="a sequence of 11 tokens does not fit a packed row of 10 tokens"):
        pack_rows([3, 11], row_tokens=10)


def test_packed_rows_restart_positions_and_hide_each_first_label():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
        {"input_ids": [8, 9], "labels": [8, 9]},
    ]
    out = collate_packed_instruction_batch(batch, pad_token_id=99, row_tokens=6)
    assert set(out) == {"input_ids", "position_ids", "labels"}  # no attention_mask: positions mark the sequences
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 8, 9], [5, 6, 7, 99, 99, 99]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # padding: one more sequence
    assert out["labels"].tolist() == [[-100, -100, 3, 4, -100, 9], [-100, 6, 7, -100, -100, -100]]


def _task_examples(tokenizer, mask_prompt: bool, n: int = 12):
    records, _ = make_task_splits(n, 0, seed=3)
    dataset, _ = build_instruction_dataset(records, tokenizer, max_length=192, mask_prompt=mask_prompt)
    return [dataset[i] for i in range(n)]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_a_packed_batch_gives_the_loss_and_gradients_of_the_padded_batch(tiny_tokenizer, impl, mask_prompt):
    examples = _task_examples(tiny_tokenizer, mask_prompt)
    padded = collate_instruction_batch(examples, pad_token_id=tiny_tokenizer.pad_token_id)
    packed = collate_packed_instruction_batch(examples, pad_token_id=tiny_tokenizer.pad_token_id, row_tokens=512)
    assert packed["input_ids"].shape[0] < len(examples) // 2  # several examples per row
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    # the same targets: every label the padded batch scores, the packed batch scores once
    targets = lambda labels: sorted(labels[:, 1:][labels[:, 1:] != IGNORE_INDEX].tolist())  # noqa: E731
    assert targets(packed["labels"]) == targets(padded["labels"])

    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(
        "tiny",
        vocab_size=len(tiny_tokenizer),
        context_length=512,
        emb_dim=32,
        n_heads=2,
        n_layers=2,
        drop_rate=0.0,
        attn_implementation=impl,
    )
    model = MiniGPTForCausalLM(config).train()
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
