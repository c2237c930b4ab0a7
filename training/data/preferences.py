"""Preference data for DPO: Alpaca records with a chosen and a rejected response → pairs of
rendered examples, one loss mask each, and the batches that score both in one forward pass.

A record is {instruction, input, chosen, rejected} (the book's instruction-data-with-preference.json
also carries `output`, its SFT answer, which DPO does not use), read by the one source opener
(`tokenization.corpus.read_records`) and checked by `training.data.instructions.validate_preference_record`.

Rendering is SFT's (`training.data.instructions.render_examples`): each response is rendered as the
`output` of its record, so the chosen example of a pair is exactly the SFT example that answers
with the chosen response — the one Alpaca template, the eos after the response, the prompt
(and later the padding) -100. Truncation follows SFT too: the prompt is never cut; a response
too long for `max_length` loses its end (and its eos), and is counted; a pair whose prompt
leaves no room for a response is dropped and counted, as is a pair whose two responses are the
same text (its DPO gradient is zero, and its reward accuracy is 0 by definition).

Batches (`collate_preference_batch`): the 2B sequences of B pairs are padded to one length and
stacked chosen first, `[chosen_0 … chosen_B-1, rejected_0 … rejected_B-1]`, so one forward pass
scores both responses of every pair (and a DDP step sees each pair whole).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from tokenization.corpus import read_records
from training.data.collate import collate_instruction_batch
from training.data.instructions import (
    InstructionDataError,
    RenderedExample,
    render_examples,
    validate_preference_record,
)

logger = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
# Dataset column of the reference model's summed response log-probabilities (precomputed reference).
REFERENCE_COLUMN = "reference_logps"


def load_preference_records(source: Any) -> list[dict[str, str]]:
    """Validated preference records from anything `read_records` reads (.json array, .jsonl, .csv,
    .parquet, a save_to_disk folder, a dataset name, a list of dicts). The first bad record stops
    the load with an InstructionDataError naming the file and record index."""
    return [validate_preference_record(r, where) for where, r in read_records(source, InstructionDataError)]


@dataclass(frozen=True)
class RenderedPair:
    chosen: RenderedExample
    rejected: RenderedExample

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def render_pairs(
    tokenizer: Any, records: Sequence[Mapping[str, str]], max_length: int | None = None
) -> list[RenderedPair | None]:
    """Each record's two responses rendered by SFT's `render_examples`, in one tokenizer batch;
    None for a pair whose prompt alone fills `max_length`."""
    as_sft = [{**record, "output": record[side]} for side in SIDES for record in records]
    rendered = render_examples(tokenizer, as_sft, max_length)
    chosen, rejected = rendered[: len(records)], rendered[len(records) :]
    return [
        RenderedPair(c, r) if c is not None and r is not None else None for c, r in zip(chosen, rejected, strict=True)
    ]


@dataclass(frozen=True)
class PreferenceDatasetStats:
    records: int
    pairs: int  # kept
    truncated: int  # pairs with a response cut to max_length (still in the dataset)
    too_long: int  # dropped: the prompt alone fills max_length
    identical: int  # dropped: chosen == rejected
    first_too_long: str | None = None  # where the first too-long pair is, for the message

    def __str__(self) -> str:
        text = (
            f"{self.pairs} of {self.records} preference pairs kept: {self.truncated} with a response truncated to "
            f"max_length, {self.too_long} dropped (prompt alone fills max_length), "
            f"{self.identical} dropped (chosen == rejected)"
        )
        return text + (f"; first too long: {self.first_too_long}" if self.first_too_long else "")


_PAIR_FEATURES = datasets.Features(
    {
        f"{side}_{column}": datasets.Sequence(datasets.Value("int32"))
        for side in SIDES
        for column in ("input_ids", "labels")
    }
)


def build_preference_dataset(
    records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int | None = None, what: str = "records"
) -> tuple[datasets.Dataset, PreferenceDatasetStats]:
    """A `datasets.Dataset` of rendered pairs (`chosen_input_ids`, `chosen_labels`,
    `rejected_input_ids`, `rejected_labels`) and what was kept, cut and dropped.

    `records` are validated preference records (`load_preference_records`). Raises
    InstructionDataError when no pair is left, naming `what` and why.
    """
    distinct = [r for r in records if r["chosen"] != r["rejected"]]
    rendered = render_pairs(tokenizer, distinct, max_length) if distinct else []  # the tokenizer fails on none
    kept = [pair for pair in rendered if pair is not None]
    first = next((i for i, pair in enumerate(rendered) if pair is None), None)
    stats = PreferenceDatasetStats(
        records=len(records),
        pairs=len(kept),
        truncated=sum(pair.truncated for pair in kept),
        too_long=len(rendered) - len(kept),
        identical=len(records) - len(distinct),
        first_too_long=None if first is None else _describe(distinct[first]),
    )
    if not kept:
        raise InstructionDataError(
            f"no preference pair of the {len(records)} {what} is left: {stats}. "
            + (f"Raise --max_length (at most the model's context length; now {max_length})." if stats.too_long else "")
        )
    if stats.truncated or stats.too_long or stats.identical:
        logger.warning("%s: %s", what, stats)
    rows = {
        f"{side}_{column}": [getattr(getattr(pair, side), column) for pair in kept]
        for side in SIDES
        for column in ("input_ids", "labels")
    }
    return datasets.Dataset.from_dict(rows, features=_PAIR_FEATURES), stats


def _describe(record: Mapping[str, str]) -> str:
    instruction = record["instruction"]
    return repr(instruction if len(instruction) <= 60 else instruction[:57] + "...")


def pairs_digest(*dataset_list: datasets.Dataset) -> str:
    """sha256 of every pair's ids and labels: what a precomputed reference was computed on."""
    digest = hashlib.sha256()
    for dataset in dataset_list:
        for column in _PAIR_FEATURES:
            for row in dataset[column]:
                digest.update(repr(row).encode())
    return digest.hexdigest()


def collate_preference_batch(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B rendered pairs → `input_ids`, `attention_mask`, `labels` (2B, T_max), chosen rows first
    (right-padded by `collate_instruction_batch`: padding has attention 0 and label -100), and,
    with a precomputed reference, `reference_logps` (2B,) float64 in the same row order."""
    rows = [
        {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]} for side in SIDES for pair in batch
    ]
    out = collate_instruction_batch(rows, pad_token_id)  # (2B, T_max) each
    if REFERENCE_COLUMN in batch[0]:
        out[REFERENCE_COLUMN] = torch.tensor(
            [pair[REFERENCE_COLUMN][i] for i in range(len(SIDES)) for pair in batch], dtype=torch.float64
        )
    return out
