"""Instruction (Alpaca-format) data: load and validate records, render them to ids and labels.

The loss mask is made in exactly one place, `assemble_example`; `render_examples` (template +
tokenizer) is the only caller, and `render_example`, `build_instruction_dataset` and the
loss-mask views all go through it.

Conventions
- Labels are UNSHIFTED (Hugging Face convention): `labels[i] = input_ids[i]` where the loss
  applies and -100 elsewhere; the model shifts by one inside its loss. So the first response
  token is predicted from the last prompt token, and the closing `<|endoftext|>` is a target:
  the model learns to stop.
- The prompt and the response are tokenized SEPARATELY and concatenated (as the book and
  nanochat do). At generation time the prompt is tokenized on its own and the model continues
  from its last token, so separate tokenization makes the training prompt ids exactly the ids
  the model sees at inference. With GPT-2 pre-tokenization this usually equals tokenizing the
  joined text anyway, because the Alpaca prompt ends in "\\n" and a newline followed by a
  non-space character is a pre-token of its own (a response that itself starts with a newline
  is the exception: joined, the two newlines could merge into one token).
- `max_length` truncates from the END of the response. A truncated response loses its closing
  `<|endoftext|>` too: the text was cut mid-answer, and teaching the model to stop there would
  teach it to stop early. An example whose prompt leaves no room for even one response token
  (`len(prompt) >= max_length`) is skipped, since it has nothing to learn from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from modeling_minigpt.files import pyplot
from tokenization.alpaca import format_example, format_prompt
from tokenization.corpus import read_records
from tokenization.pretokenize import readable
from training.data.collate import IGNORE_INDEX
from training.data.windows import split_indices

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


class InstructionDataError(ValueError):
    """A record that cannot be trained on; the message names the file and record index."""


# ---------------------------------------------------------------------------------------------
# Reading and validating records
# ---------------------------------------------------------------------------------------------


def _string_field(record: Mapping[str, Any], key: str, where: str, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise InstructionDataError(f"{where}: {key!r} is missing")
        return ""
    if not isinstance(value, str):
        raise InstructionDataError(f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r}")
    if required and not value.strip():
        raise InstructionDataError(f"{where}: {key!r} is empty")
    return value


def validate_instruction_record(record: Any, where: str) -> dict[str, str]:
    """The record as {'instruction', 'input', 'output'} strings, or InstructionDataError.

    `instruction` and `output` must be non-blank strings; `input` may be missing, None or "".
    Other keys are dropped.
    """
    if not isinstance(record, Mapping):
        raise InstructionDataError(
            f"{where}: expected an object with 'instruction' and 'output', got {type(record).__name__}"
        )
    return {
        "instruction": _string_field(record, "instruction", where, required=True),
        "input": _string_field(record, "input", where, required=False),
        "output": _string_field(record, "output", where, required=True),
    }


# What makes a record a preference pair (DPO data) rather than an instruction example.
PREFERENCE_KEYS = ("chosen", "rejected")


def is_preference_record(record: Any) -> bool:
    """True for a record with a `chosen` or `rejected` response (the book's
    instruction-data-with-preference.json, TRL's preference format)."""
    return isinstance(record, Mapping) and any(record.get(key) is not None for key in PREFERENCE_KEYS)


def load_instruction_records(source: Any) -> list[dict[str, str]]:
    """Validated Alpaca records from anything `tokenization.corpus.read_records` reads (a .json
    array, .jsonl or .csv file, rows `datasets` reads, a list of dicts). The first bad record
    stops the load with an InstructionDataError naming the file and record index.

    A preference record (`is_preference_record`) is refused: SFT would train on its `output` and
    silently drop the preferences.
    """
    records = []
    for where, record in read_records(source, InstructionDataError):
        if is_preference_record(record):
            raise InstructionDataError(
                f"{where}: has 'chosen'/'rejected' responses: this is preference data, which SFT would drop "
                "(it trains on 'output' only). Tune on it with scripts/dpo.py, or remove those keys to fine-tune "
                "on 'output'."
            )
        records.append(validate_instruction_record(record, where))
    return records


@dataclass
class RecordSplits:
    """A fine-tuning job's training and held-out records, and where they came from."""

    train: list[dict[str, str]]
    heldout: list[dict[str, str]]  # keeps extra keys (the task `kind`) for per-kind scores
    description: str


def file_splits(
    load: Callable[[Any], list[dict[str, str]]],
    train_file: str,
    validation_file: str | None,
    validation_fraction: float,
    seed: int,
) -> RecordSplits:
    """The records of a fine-tuning job's files: `load(validation_file)` held out, or else a
    seeded `validation_fraction` of `load(train_file)`."""
    records = load(train_file)
    name = Path(train_file).name
    if validation_file is not None:
        return RecordSplits(records, load(validation_file), name)
    kept, held = split_indices(len(records), validation_fraction, seed)
    description = f"{name} (seeded {validation_fraction:.0%} held out)"
    return RecordSplits([records[i] for i in kept], [records[i] for i in held], description)


def validate_preference_record(record: Any, where: str) -> dict[str, str]:
    """The record as {'instruction', 'input', 'chosen', 'rejected'} strings, or InstructionDataError.

    The rules of `validate_instruction_record`, with two responses instead of `output` (an
    `output`, the book's SFT answer, may be there and is dropped, like any other key).
    """
    if not isinstance(record, Mapping):
        raise InstructionDataError(
            f"{where}: expected an object with 'instruction', 'chosen' and 'rejected', got {type(record).__name__}"
        )
    if not is_preference_record(record):
        raise InstructionDataError(
            f"{where}: no 'chosen' and 'rejected' responses: this is not preference data "
            "(instruction data with 'output' trains with scripts/sft.py)"
        )
    return {
        "instruction": _string_field(record, "instruction", where, required=True),
        "input": _string_field(record, "input", where, required=False),
        **{key: _string_field(record, key, where, required=True) for key in PREFERENCE_KEYS},
    }


# ---------------------------------------------------------------------------------------------
# Rendering: the single place where the loss mask is made
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedExample:
    input_ids: list[int]
    labels: list[int]  # unshifted; IGNORE_INDEX where no loss applies
    truncated: bool  # the response was cut to fit max_length (and lost its closing eos)


def assemble_example(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    eos_token_id: int,
    max_length: int | None = None,
    mask_prompt: bool = True,
) -> RenderedExample | None:
    """Prompt + response + eos as ids and labels; None when the prompt leaves no room for a response.

    With `mask_prompt=False` every token is a target (the comparison run without a response
    mask); padding added later by the collate is ignored either way.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    target = [*response_ids, eos_token_id]
    truncated = False
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            return None
        if len(target) > room:
            target, truncated = target[:room], True
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if mask_prompt else list(prompt_ids)
    return RenderedExample(input_ids=[*prompt_ids, *target], labels=prompt_labels + target, truncated=truncated)


def _eos_token_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; instruction data closes each response with one")
    return tokenizer.eos_token_id


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # No special tokens: the template is plain text and the eos is appended by assemble_example.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def render_examples(
    tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int | None = None, mask_prompt: bool = True
) -> list[RenderedExample | None]:
    """Alpaca records rendered with the project's template to (input_ids, labels), tokenized
    as one batch. None for a record whose prompt alone fills `max_length` (skipped)."""
    eos_token_id = _eos_token_id(tokenizer)
    pairs = [format_example(record) for record in records]
    prompt_ids = _encode(tokenizer, [prompt for prompt, _ in pairs])
    response_ids = _encode(tokenizer, [response for _, response in pairs])
    return [
        assemble_example(p, r, eos_token_id, max_length, mask_prompt)
        for p, r in zip(prompt_ids, response_ids, strict=True)
    ]


def render_example(
    tokenizer: Any, record: Mapping[str, Any], max_length: int | None = None, mask_prompt: bool = True
) -> RenderedExample | None:
    """One record: see `render_examples`."""
    return render_examples(tokenizer, [record], max_length, mask_prompt)[0]


def encode_prompt(tokenizer: Any, record: Mapping[str, Any]) -> list[int]:
    """The prompt ids a model is given at generation time: exactly the prompt part of
    `render_example(tokenizer, record).input_ids`."""
    return _encode(tokenizer, [format_prompt(record["instruction"], record.get("input"))])[0]


@dataclass(frozen=True)
class InstructionDatasetStats:
    records: int
    examples: int
    truncated: int  # responses cut to max_length (still in the dataset)
    skipped: int  # prompt alone >= max_length (not in the dataset)

    def __str__(self) -> str:
        return (
            f"{self.examples} of {self.records} instruction records kept: "
            f"{self.truncated} truncated to max_length, {self.skipped} skipped (prompt alone fills max_length)"
        )


_RENDERED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "truncated": datasets.Value("bool"),
    }
)


def build_instruction_dataset(
    records: Any,
    tokenizer: Any,
    max_length: int | None = None,
    mask_prompt: bool = True,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, InstructionDatasetStats]:
    """A `datasets.Dataset` with `input_ids` and `labels` columns, plus truncation/skip counts.

    `records` is anything `load_instruction_records` accepts (it is validated here too, so a
    bad record is reported with its index instead of failing deep inside the map).
    """
    rows = load_instruction_records(records)

    def render_batch(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        # A batched map may return fewer rows than it got: skipped examples simply vanish.
        kept = [e for e in render_examples(tokenizer, records, max_length, mask_prompt) if e is not None]
        return {
            "input_ids": [e.input_ids for e in kept],
            "labels": [e.labels for e in kept],
            "truncated": [e.truncated for e in kept],
        }

    string = datasets.Value("string")
    source = datasets.Dataset.from_list(
        rows, features=datasets.Features(instruction=string, input=string, output=string)
    )
    dataset = source.map(
        render_batch,
        batched=True,
        remove_columns=source.column_names,
        features=_RENDERED_FEATURES,  # stated, so a batch that skips every row still has the columns
        num_proc=num_proc,
        desc="Rendering instructions",
    )
    stats = InstructionDatasetStats(
        records=len(rows),
        examples=len(dataset),
        truncated=sum(dataset["truncated"]) if len(dataset) else 0,
        skipped=len(rows) - len(dataset),
    )
    if rows and not len(dataset):  # else an empty dataset reaches torch's sampler ("num_samples=0")
        raise InstructionDataError(
            f"no instruction example is left: {stats}. Raise --max_length (at most the model's context length; "
            f"now {max_length}) or shorten the prompts"
        )
    if stats.truncated or stats.skipped:
        logger.warning("%s", stats)
    return dataset.remove_columns("truncated"), stats


# ---------------------------------------------------------------------------------------------
# Inspecting the loss mask
# ---------------------------------------------------------------------------------------------


def _as_ids_and_labels(example: RenderedExample | Mapping[str, Any]) -> tuple[list[int], list[int]]:
    if isinstance(example, RenderedExample):
        return example.input_ids, example.labels
    return [int(i) for i in example["input_ids"]], [int(i) for i in example["labels"]]


def loss_mask_tokens(tokenizer: Any, example: RenderedExample | Mapping[str, Any]) -> list[tuple[str, bool]]:
    """(readable token, carries loss) for each position of an example.

    A position carries loss when it is a target of the shifted loss: its label is not -100 and
    it is not position 0 (nothing precedes the first token, so it is never predicted).
    """
    ids, labels = _as_ids_and_labels(example)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return [
        (readable(tok), i > 0 and label != IGNORE_INDEX)
        for i, (tok, label) in enumerate(zip(tokens, labels, strict=True))
    ]


def format_loss_mask(tokenizer: Any, example: RenderedExample | Mapping[str, Any], color: bool = True) -> str:
    """A text view of the loss mask: loss-carrying tokens in green (ANSI) or, with
    `color=False`, inside [[ ]]. Whitespace is shown as ␣ and ↵ (line breaks are kept)."""
    on, off = ("\033[1;42;30m", "\033[0m") if color else ("[[", "]]")
    parts: list[str] = []
    in_loss = False
    for text, loss in loss_mask_tokens(tokenizer, example):
        if loss != in_loss:
            parts.append(on if loss else off)
            in_loss = loss
        parts.append(text + ("\n" if text.endswith("↵") else ""))
    if in_loss:
        parts.append(off)
    return "".join(parts)


def _layout_tokens(texts: Sequence[str], line_width: int) -> tuple[list[tuple[float, int, float]], int]:
    """(x, line, width) in character cells for each token, wrapping at `line_width`; a token
    ending in a newline (shown as ↵) also ends its line. Returns the boxes and the line count."""
    pad, gap = 0.3, 0.3
    boxes, x, line = [], 0.0, 0
    for text in texts:
        width = len(text) + pad
        if x > 0 and x + width > line_width:
            x, line = 0.0, line + 1
        boxes.append((x, line, width))
        x += width + gap
        if text.endswith("↵"):
            x, line = 0.0, line + 1
    return boxes, line + (1 if x > 0 or not boxes else 0)


def loss_mask_figure(tokenizer: Any, example: RenderedExample | Mapping[str, Any], line_width: int = 80) -> Figure:
    """An example's tokens, each boxed and coloured by whether it carries loss.

    `line_width` is in characters; a token ending in a newline also ends the line.
    """
    from matplotlib.patches import Patch, Rectangle

    plt = pyplot()

    tokens = loss_mask_tokens(tokenizer, example)
    boxes, n_lines = _layout_tokens([text for text, _ in tokens], line_width)

    # Data units are character cells (x) and lines (y); the axes is sized so one cell is one
    # monospace glyph wide (DejaVu Sans Mono advances 0.602 em), so each box fits its text.
    font_size = 10
    cell, row, header = 0.61 * font_size / 72, 0.3, 0.45  # inches
    height = n_lines * row + header
    fig = plt.figure(figsize=((line_width + 1) * cell, height))
    ax = fig.add_axes((0.0, 0.0, 1.0, n_lines * row / height))
    ax.set_xlim(-0.5, line_width + 0.5)
    ax.set_ylim(n_lines, 0)
    ax.axis("off")
    colours = {True: "#7fd17f", False: "#e3e3e3"}
    for (text, loss), (x0, line, width) in zip(tokens, boxes, strict=True):
        ax.add_patch(
            Rectangle((x0, line + 0.1), width, 0.8, facecolor=colours[loss], edgecolor="#777777", linewidth=0.5)
        )
        ax.text(
            x0 + width / 2, line + 0.5, text, ha="center", va="center", family="DejaVu Sans Mono", fontsize=font_size
        )
    n_loss = sum(loss for _, loss in tokens)
    fig.text(0.0, 1.0, f"{len(tokens)} tokens, {n_loss} carry loss", va="top", fontsize=font_size + 1)
    fig.legend(
        handles=[
            Patch(facecolor=colours[True], label="loss (response + eos)"),
            Patch(facecolor=colours[False], label="no loss"),
        ],
        loc="upper right",
        bbox_to_anchor=(1.0, 1.0),
        ncol=2,
        fontsize=font_size - 1,
        frameon=False,
        borderaxespad=0.0,
    )
    return fig
