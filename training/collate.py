"""Batches: pad sequences, and the collates for windows, instruction examples and classification.

Collate pads and masks, nothing else. Padded positions have attention 0 and, where there are
labels, label -100 (`IGNORE_INDEX`), so neither the pad id nor the padding length matters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """(B, T_max) long tensor, each row padded with `pad_value` on the given side."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            out[row, : len(seq)] = seq
        else:
            out[row, longest - len(seq) :] = seq
    return out


def collate_windows(batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Windows of T + 1 tokens → {"input_ids": [B, T], "shift_labels": [B, T]} (int64).

    shift_labels[:, t] is the target of input_ids[:, t] (the next token), the aligned-labels
    convention of transformers' `ForCausalLMLoss`: all T positions are scored.
    """
    windows = torch.stack([torch.as_tensor(example["input_ids"], dtype=torch.long) for example in batch])  # (B, T + 1)
    # contiguous: the loss flattens shift_labels with .view(-1)
    return {"input_ids": windows[:, :-1].contiguous(), "shift_labels": windows[:, 1:].contiguous()}


def collate_instruction_batch(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of rendered examples to the longest in the batch.

    Returns `input_ids`, `attention_mask` and `labels`, each (B, T_max); padded positions
    have attention 0 and label -100, so neither the pad id nor the padding length matters.
    Use with `functools.partial(collate_instruction_batch, pad_token_id=...)`.
    """
    ids = [example["input_ids"] for example in batch]
    return {
        "input_ids": pad_sequences(ids, pad_token_id),
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0),
        "labels": pad_sequences([example["labels"] for example in batch], IGNORE_INDEX),
    }


def collate_classification_batch(
    batch: Sequence[Mapping[str, Any]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` (B, T_max) padded on `padding_side`, and `labels` (B,).

    The model pools the last position whose attention_mask is 1, so either side works; right
    is the default, left is what batched generation uses.
    """
    ids = [example["input_ids"] for example in batch]
    return {
        "input_ids": pad_sequences(ids, pad_token_id, padding_side),
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, padding_side),
        "labels": torch.tensor([int(example["labels"]) for example in batch], dtype=torch.long),
    }
