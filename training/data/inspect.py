"""Look at pretraining data: where a batch's windows come from, and how the tokens are spread.

    batch_composition(windows, indices, tokenizer)       -> a table, one row per window of a batch
    batch_composition_figure(table, context_length)     -> a Figure of where those windows lie
    token_frequencies(tokens, vocab_size)                -> count of every id in the token stream
    token_frequencies_figure(counts, tokenizer)          -> rank-frequency (log-log) + top tokens

Figures are written with `modeling_minigpt.files.save_figure`.

`windows` is a split of `training.data.windows.build_lm_datasets` (columns `input_ids`, `doc_id`,
`offset`); `tokens` is the output of `training.data.windows.tokenize_documents`, counted once per
token (windows overlap when stride < context_length, so they would count some tokens twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from modeling_minigpt.files import pyplot
from tokenization.pretokenize import readable
from training.data.windows import AnyDataset, iter_token_batches

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def batch_composition(
    windows: Dataset, indices: Sequence[int], tokenizer: PreTrainedTokenizerBase | None = None, preview_tokens: int = 8
) -> pd.DataFrame:
    """One row per window of the batch `indices` (e.g. a chunk of a sampler's order).

    Columns: `row` (position in the batch), `window` (index in `windows`), `doc_id`, `offset`
    (the window's first token in its document); with a tokenizer also `boundaries` (how many
    `<|endoftext|>` are among the window's inputs, i.e. where another document begins) and
    `preview` (its first `preview_tokens` tokens as text).
    """
    batch = windows.select(list(indices)).with_format("numpy")[:]
    table = pd.DataFrame(
        {"row": np.arange(len(indices)), "window": list(indices), "doc_id": batch["doc_id"], "offset": batch["offset"]}
    )
    if tokenizer is not None:
        inputs = np.asarray(batch["input_ids"])[:, :-1]  # (B, T): the last token is only a target
        table["boundaries"] = (inputs == tokenizer.eos_token_id).sum(axis=1)
        table["preview"] = [repr(tokenizer.decode(row[:preview_tokens].tolist())) for row in inputs]
    return table


def batch_composition_figure(table: pd.DataFrame, context_length: int) -> Figure:
    """Each window of the batch as a bar over the token offsets of its document, one colour per
    document (overlapping bars of one document show the stride)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(table) + 1.4))
    docs = list(dict.fromkeys(table["doc_id"].tolist()))
    colours = plt.get_cmap("tab20")
    for row in table.itertuples():
        colour = colours(docs.index(row.doc_id) % 20)
        ax.barh(
            row.row, context_length + 1, left=row.offset, height=0.7, color=colour, edgecolor="black", linewidth=0.4
        )
        end = row.offset + context_length + 1
        ax.text(end, row.row, f"  doc {row.doc_id}, tokens {row.offset}-{end - 1}", ha="left", va="center", fontsize=8)
    ax.set_yticks(
        table["row"], [f"row {r} (window {w})" for r, w in zip(table["row"], table["window"], strict=True)], fontsize=8
    )
    ax.invert_yaxis()
    ax.set_xlim(0, (table["offset"].max() + context_length + 1) * 1.3)  # room for the labels
    ax.set_xlabel("token offset within the document")
    ax.set_title(f"batch of {len(table)} windows of {context_length} + 1 tokens from {len(docs)} document(s)")
    return fig


def token_frequencies(tokens: AnyDataset, vocab_size: int, max_tokens: int | None = None) -> np.ndarray:
    """counts[id] = occurrences of each id in the token stream ([vocab_size] int64).

    `max_tokens` stops after about that many tokens (for a streaming corpus).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for ids, _, _ in iter_token_batches(tokens):
        if len(ids) and int(ids.max()) >= vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
        counts += np.bincount(ids, minlength=vocab_size)
        if max_tokens is not None and counts.sum() >= max_tokens:
            break
    return counts


def token_frequencies_figure(
    counts: np.ndarray, tokenizer: PreTrainedTokenizerBase | None = None, top_k: int = 20
) -> Figure:
    """Rank-frequency of the ids on log-log axes (with Zipf's 1/rank for reference) and a bar
    chart of the `top_k` most frequent tokens (their share of all tokens)."""
    plt = pyplot()
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no tokens were counted: the token stream is empty")
    order = np.argsort(counts)[::-1]
    used = order[counts[order] > 0]
    ranks = np.arange(1, len(used) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})

    left.loglog(ranks, counts[used], color="#1f77b4", label="observed")
    left.loglog(ranks, counts[used[0]] / ranks, color="gray", linestyle="--", label="Zipf: count(1) / rank")
    left.set_xlabel("rank")
    left.set_ylabel("occurrences")
    left.set_title(f"{total:,} tokens; {len(used):,} of {len(counts):,} ids occur")
    left.legend()

    top = used[:top_k][::-1]  # most frequent at the top of the bar chart
    right.barh(range(len(top)), 100 * counts[top] / total, color="#ff7f0e")
    right.set_yticks(range(len(top)), [_token_label(tokenizer, int(i)) for i in top], fontsize=8, family="monospace")
    right.set_xlabel("% of all tokens")
    right.set_title(f"top {len(top)} tokens: {100 * counts[top].sum() / total:.1f} % of all")
    fig.tight_layout()
    return fig


def _token_label(tokenizer: PreTrainedTokenizerBase | None, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token_id in tokenizer.all_special_ids:
        return f"{token} ({token_id})"
    try:
        return f"{readable(token)!r} ({token_id})"  # byte-level token: '␣the', '↵', ...
    except KeyError:  # not a byte-level vocabulary
        return f"{token!r} ({token_id})"
