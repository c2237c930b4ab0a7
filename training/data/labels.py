"""Text classification data: load (text, label) records, map label names to ids, tokenize, sample.

Labels are names (strings; integer labels in a file are read as their decimal text). The
`label2id` built here is what goes into the model config (`label2id` / `id2label`), so a saved
model predicts names, and new data is checked against the names the model was trained on.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch.utils.data import WeightedRandomSampler

from tokenization.corpus import read_records
from training.data.tasks import draw_distinct


class ClassificationDataError(ValueError):
    """A (text, label) record that cannot be used; the message names the file and record."""


@dataclass(frozen=True)
class ClassificationData:
    dataset: datasets.Dataset  # columns: text (str), label (int id)
    label2id: dict[str, int]

    @property
    def id2label(self) -> dict[int, str]:
        return {i: name for name, i in self.label2id.items()}


def _label_sort_key(name: str) -> tuple[int, int | str]:
    # "2" before "10": integer labels keep their numeric order, names sort alphabetically after.
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def _check_label2id(label2id: Mapping[str, int]) -> dict[str, int]:
    if sorted(label2id.values()) != list(range(len(label2id))):
        raise ClassificationDataError(f"label2id ids must be 0..{len(label2id) - 1}, each once; got {dict(label2id)}")
    return dict(label2id)


def _text_and_label(record: Any, where: str, text_column: str, label_column: str) -> tuple[str, str]:
    if not isinstance(record, Mapping):
        raise ClassificationDataError(
            f"{where}: expected an object with {text_column!r} and {label_column!r}, got {type(record).__name__}"
        )
    for column in (text_column, label_column):
        if record.get(column) is None:
            raise ClassificationDataError(
                f"{where}: {column!r} is missing (columns present: {', '.join(map(str, record))})"
            )
    text, label = record[text_column], record[label_column]
    if not isinstance(text, str) or not text.strip():
        raise ClassificationDataError(f"{where}: {text_column!r} must be a non-empty string, got {text!r}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        raise ClassificationDataError(
            f"{where}: {label_column!r} must be a non-empty string or an integer, got {label!r}"
        )
    return text, str(label).strip()


def load_classification_data(
    source: Any,
    text_column: str = "text",
    label_column: str = "label",
    label2id: Mapping[str, int] | None = None,
    split: str = "train",
) -> ClassificationData:
    """(text, label) data from anything `tokenization.corpus.read_records` reads: a .csv, .json
    (array) or .jsonl file, rows `datasets` reads (of a DatasetDict folder: its `split`), a
    `datasets.Dataset` or a list of dicts.

    Without `label2id` the label set is the one found in the data, sorted (numerically for
    integer labels). With it (e.g. a trained model's `config.label2id`), a label outside it is
    an error that lists the known labels.
    """
    rows = [
        (where, *_text_and_label(record, where, text_column, label_column))
        for where, record in read_records(source, ClassificationDataError, split)
    ]
    if label2id is None:
        label2id = {name: i for i, name in enumerate(sorted({label for _, _, label in rows}, key=_label_sort_key))}
    else:
        label2id = _check_label2id(label2id)
        unknown = [(where, label) for where, _, label in rows if label not in label2id]
        if unknown:
            names = sorted({label for _, label in unknown}, key=_label_sort_key)
            raise ClassificationDataError(
                f"{unknown[0][0]}: unknown label {unknown[0][1]!r} ({len(unknown)} records have labels not in "
                f"label2id: {', '.join(map(repr, names))}); known labels: {', '.join(map(repr, label2id))}"
            )
    dataset = datasets.Dataset.from_dict(
        {"text": [text for _, text, _ in rows], "label": [label2id[label] for _, _, label in rows]},
        features=datasets.Features({"text": datasets.Value("string"), "label": datasets.Value("int64")}),
    )
    return ClassificationData(dataset=dataset, label2id=label2id)


def tokenize_classification_dataset(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int | None = None, num_proc: int | None = None
) -> datasets.Dataset:
    """`input_ids` and `labels` columns from `text` and `label`.

    Texts longer than `max_length` keep their first tokens (the tokenizer's default truncation
    side); no special tokens are added, so the pooled last token is the text's own last token.
    """

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = tokenizer(
            batch["text"], add_special_tokens=False, truncation=max_length is not None, max_length=max_length
        )
        return {"input_ids": ids["input_ids"], "labels": batch["label"]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing")


def balanced_sampler(
    labels: Sequence[int], num_samples: int | None = None, seed: int | None = None
) -> WeightedRandomSampler:
    """Sample indices (with replacement) so that every class is drawn equally often on average.

    Each example is weighted by 1 / (its class count). `num_samples` defaults to the dataset
    size, so one "epoch" has the usual length.
    """
    if len(labels) == 0:
        raise ValueError("balanced_sampler needs at least one label")
    counts = Counter(int(label) for label in labels)
    weights = torch.tensor([1.0 / counts[int(label)] for label in labels], dtype=torch.double)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or len(labels), replacement=True, generator=generator)


# ---------------------------------------------------------------------------------------------
# Embedded demo data: the topic of a sentence follows from the one topic word it contains
# ---------------------------------------------------------------------------------------------

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "sheep", "tiger", "wolf", "owl", "duck", "lion", "goat"),
    "food": ("bread", "cake", "apple", "cheese", "soup", "rice", "jam", "plum", "egg", "honey"),
    "weather": ("rain", "snow", "wind", "storm", "fog", "sunshine", "cloud", "frost", "thunder", "hail"),
}
_TEMPLATES = (
    "we talked about the {word} {place} {time}",
    "there was {word} {place} {time}",
    "{time} the {word} {place} was {adj}",
    "she wrote a {adj} story about the {word}",
    "everyone noticed the {word} {place}",
)
_PLACES = (
    "by the river",
    "at the farm",
    "in the town",
    "near the school",
    "on the hill",
    "at the market",
    "in the garden",
    "by the sea",
)
_TIMES = ("this morning", "last night", "today", "on monday", "in the spring", "after lunch")
_ADJECTIVES = ("strange", "new", "big", "quiet", "small", "lovely")


def generate_classification_demo(
    n: int, seed: int, label_weights: Mapping[str, float] | None = None
) -> list[dict[str, str]]:
    """`n` distinct {"text", "label"} records; the label is the topic of the sentence's one topic word.

    Labels are drawn with `label_weights` (default: equal), e.g. {"animals": 8, "food": 1,
    "weather": 1} for an imbalanced set to try class-balanced sampling on. Deterministic in
    `seed` across Python processes.
    """
    weights = dict.fromkeys(TOPIC_WORDS, 1.0) if label_weights is None else dict(label_weights)
    unknown = set(weights) - set(TOPIC_WORDS)
    if unknown:
        raise ValueError(f"unknown demo labels {sorted(unknown)}; known labels: {', '.join(TOPIC_WORDS)}")
    names = [name for name in TOPIC_WORDS if weights.get(name, 0) > 0]
    if not names:
        raise ValueError(f"label_weights gives no label a positive weight: {weights}")
    rng = random.Random(seed)

    def draw(_: int) -> dict[str, str]:
        label = rng.choices(names, weights=[weights[name] for name in names])[0]
        text = rng.choice(_TEMPLATES).format(
            word=rng.choice(TOPIC_WORDS[label]),
            place=rng.choice(_PLACES),
            time=rng.choice(_TIMES),
            adj=rng.choice(_ADJECTIVES),
        )
        return {"text": text, "label": label}

    return draw_distinct(n, draw, lambda record: record["text"])
