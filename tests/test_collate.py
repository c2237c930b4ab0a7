"""training/collate.py: padding and masks, and the targets every position gets."""

from __future__ import annotations

import pytest
import torch

from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM
from training.collate import (
    collate_classification_batch,
    collate_instruction_batch,
    collate_windows,
)


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
