"""Batches: pad sequences, and the collates for windows, instruction examples and classification.

Collate pads (or packs) and masks, nothing else. Padded positions have attention 0 and, where
there are labels, label -100 (`IGNORE_INDEX`), so neither the pad id nor the padding length
matters. Packed instruction batches put several examples in a row instead, kept apart by
position ids that restart at 0 (`collate_packed_instruction_batch`).
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


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Indices of the sequences in each row: first-fit decreasing, no row longer than `row_tokens`.

    Longest first, each into the first row with room: few rows, nearly full (within 11/9 of the
    optimum, Johnson 1973). Deterministic: ties keep the batch order.
    """
    too_long = [n for n in lengths if n > row_tokens]
    if too_long:
        raise ValueError(f"a sequence of {max(too_long)} tokens does not fit a packed row of {row_tokens} tokens")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(row_tokens)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate_packed_instruction_batch(
    batch: Sequence[Mapping[str, Any]], pad_token_id: int, row_tokens: int
) -> dict[str, torch.Tensor]:
    """The examples of `batch` packed padding-free: several per row, rows of at most `row_tokens`.

    Returns `input_ids`, `position_ids` and `labels`, each (R, T_row) with R <= len(batch). Each
    example's position ids restart at 0: that alone keeps the examples of a row apart (the model's
    mask, transformers' `create_causal_mask`, reads packed sequences from the position ids, as
    with `DataCollatorWithFlattening`), so there is no attention_mask. Each example's first label
    is -100, or the last token of the example before it would be trained to predict it; the
    padded batch never scores position 0 either, so both give the same loss over the same
    targets. Rows shorter than the longest are filled with `pad_token_id` as one more sequence
    (positions from 0, labels -100), attended by nothing else.

    Rows rather than one long sequence: the attention over a packed row is a full (T_row, T_row)
    product with a mask, so on CPU one row of every example would cost far more attention than
    the padding it saves.
    """
    rows = pack_rows([len(example["input_ids"]) for example in batch], row_tokens)
    ids, positions, labels = [], [], []
    for row in rows:
        ids.append([t for i in row for t in batch[i]["input_ids"]])
        positions.append([p for i in row for p in range(len(batch[i]["input_ids"]))])
        labels.append([IGNORE_INDEX if p == 0 else t for i in row for p, t in enumerate(batch[i]["labels"])])
    longest = max(len(r) for r in ids)
    tails = [list(range(longest - len(r))) for r in ids]  # each row's padding: one more sequence
    return {
        "input_ids": pad_sequences(ids, pad_token_id),
        "position_ids": torch.tensor([p + tail for p, tail in zip(positions, tails, strict=True)]),
        "labels": pad_sequences(labels, IGNORE_INDEX),
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
